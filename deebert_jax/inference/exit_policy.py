"""A model directory's `exit_policy.json`: the exit rule and threshold chosen for it, and what they
were chosen on. The one place the file is written, read and checked (its fields' types; against
the weights, length and task it will run with).

It sits in `inference`, below `evaluation` (which chooses the threshold) and `training` (which
chooses one after stage 2), because serving and predicting read it too.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping, Sequence

from deebert_jax.core.errors import InputError
from deebert_jax.core.fileutil import atomic_write_text
from deebert_jax.inference.early_exit import EXIT_RULES, check_threshold
from deebert_jax.weights.checkpoint import model_fingerprint

POLICY_FILE = "exit_policy.json"
POLICY_FORMAT = 1


def write_exit_policy(model_dir: str | os.PathLike, policy: Mapping, filename: str = POLICY_FILE) -> str:
    """Writes `model_dir/filename` atomically; touches nothing else in the directory."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{os.fspath(model_dir)}: no such directory")
    return atomic_write_text(os.path.join(os.fspath(model_dir), filename), json.dumps(policy, indent=2) + "\n")


# Field -> (what it must be, test); checked like config.json's fields.
_POLICY_FIELDS = {
    "format": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "rule": (f"one of {', '.join(sorted(EXIT_RULES))}", lambda v: isinstance(v, str) and v in EXIT_RULES),
    "threshold": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
    "max_drop": ("a number >= 0", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0),
    "confidence": ("null or a number in (0, 1)",
                   lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1)),
    "num_layers": ("an integer >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "max_seq_length": ("an integer >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "task": ("a string", lambda v: isinstance(v, str)),
    "calibration_split": ("a string", lambda v: isinstance(v, str)),
    "model_fingerprint": ("a string", lambda v: isinstance(v, str)),
    "chosen_at": ("a string", lambda v: isinstance(v, str)),
}
_POLICY_REQUIRED = ("rule", "threshold")


def load_exit_policy(model_dir: str | os.PathLike, *, model: tuple | None = None, max_seq_length: int | None = None,
                     task: str | None = None) -> dict | None:
    """`model_dir/exit_policy.json` as a dict, None when absent. A file that is not a JSON object
    with a valid rule and threshold, whose fields have the wrong types, or that was calibrated on
    something else than what is asked (`model`: the (config, params) it will run with, compared
    by `model_fingerprint` and layer count; `max_seq_length`; `task`) is an InputError naming it."""
    path = os.path.join(os.fspath(model_dir), POLICY_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            policy = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(policy, dict) or any(k not in policy for k in _POLICY_REQUIRED):
        raise InputError(f"{path}: expected an object with 'rule' (one of {sorted(EXIT_RULES)}) and 'threshold'")
    for field, (expected, ok) in _POLICY_FIELDS.items():
        if field in policy and not ok(policy[field]):
            raise InputError(f"{path}: \"{field}\" is {json.dumps(policy[field])}, expected {expected}")
    try:
        check_threshold(policy["threshold"], policy["rule"])
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: {e}") from e
    again = "choose a threshold for this one with python -m train.calibrate, or move the file away"
    if model is not None:
        config, params = model
        if policy.get("num_layers", config.num_hidden_layers) != config.num_hidden_layers:
            raise InputError(f"{path}: calibrated on a {policy['num_layers']}-layer model, this one has "
                             f"{config.num_hidden_layers}; {again}")
        here = model_fingerprint(config, params) if "model_fingerprint" in policy else None
        if here is not None and policy["model_fingerprint"] != here:   # hashing every weight: once
            raise InputError(f"{path}: calibrated on other weights (model_fingerprint {policy['model_fingerprint']}, "
                             f"these weights {here}); {again}")
    if task is not None and "task" in policy and _task_key(policy["task"]) != _task_key(task):
        raise InputError(f"{path}: calibrated for task {policy['task']}, not {task}; {again}")
    if max_seq_length is not None and policy.get("max_seq_length", max_seq_length) != max_seq_length:
        raise InputError(f"{path}: calibrated at max_seq_length {policy['max_seq_length']}, this run uses "
                         f"{max_seq_length}: pass --max-seq-length {policy['max_seq_length']}, or calibrate again "
                         f"at {max_seq_length}")
    return policy


def _task_key(task: str) -> str:
    return task.lower().replace("-", "")


def describe_policy(policy: Mapping) -> str:
    """One line: how the policy's threshold was chosen (budget, confidence, split, when)."""
    level = (f"at confidence {policy['confidence']:g}" if policy.get("confidence") is not None
             else "empirical, no guarantee")
    parts = [f"budget {policy['max_drop']:g} points of {policy.get('metric_name', 'the metric')} {level}"
             if "max_drop" in policy else "budget not recorded"]
    if policy.get("calibration_split"):
        size = policy.get("calibration_size") or (policy.get("calibration") or {}).get("n")
        parts.append(f"calibrated on {policy['calibration_split']}" + (f" ({size} examples)" if size else ""))
    if policy.get("task"):
        parts.append(f"task {policy['task']}")
    temps = policy.get("ramp_temperatures")
    if isinstance(temps, dict) and temps.get("rows"):
        parts.append(f"off-ramp temperatures fitted on {temps['rows']} other held-out rows")
    parts.append(f"chosen {policy['chosen_at']}" if policy.get("chosen_at") else "date not recorded")
    if "model_fingerprint" not in policy:
        parts.append("no model fingerprint (written before fingerprints; not checked against these weights)")
    return ", ".join(parts)


def with_policy_threshold(thresholds: Sequence[float], model_dir: str | os.PathLike | None,
                          rule: str = "entropy") -> list[float]:
    """A sweep (sorted safe to aggressive: entropy ascending, the other rules descending) plus the
    threshold of `model_dir/exit_policy.json` when that policy is for `rule`; else as given."""
    out = [float(t) for t in thresholds]
    policy = load_exit_policy(model_dir) if model_dir else None
    if policy is None or policy["rule"] != rule or float(policy["threshold"]) in out:
        return out
    return sorted(out + [float(policy["threshold"])], reverse=rule != "entropy")


def policy_length(model_dir: str | os.PathLike) -> int | None:
    """`exit_policy.json`'s max_seq_length when it is a positive integer (the policy itself is
    checked where its threshold is read), else None."""
    try:
        with open(os.path.join(os.fspath(model_dir), POLICY_FILE), encoding="utf-8") as f:
            value = json.load(f).get("max_seq_length")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None
