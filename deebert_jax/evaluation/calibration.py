"""Choosing an early-exit threshold from a drop budget, and the `exit_policy.json` it leaves.

Everything here is numpy over all-ramp logits computed once (`evaluation.all_ramp_logits`,
[L, N, K]): the exit of every example at every threshold is a function of those logits
(`exit_layers` runs `early_exit`'s exit update on them), so a whole threshold grid costs one
forward pass.

Two ways to choose, both over thresholds ordered from safe (never exit early) to aggressive:
- empirical (no confidence): the threshold with the largest layer saving whose drop of the task
  metric against the full model (ramp L) on the calibration examples is at most `max_drop` points;
- `confidence=1-delta` (Learn-then-Test, fixed-sequence testing): for each threshold in order,
  the null "the disagreement rate with ramp L exceeds alpha = max_drop / 100" is tested with the
  exact binomial p-value P(Binomial(n, alpha) <= k) (k disagreements among n), rejected when it is
  at most delta; testing stops at the first threshold not rejected. The choice is the largest
  saving among the rejected thresholds whose empirical metric drop is also within budget.
  Guarantee: if the calibration examples are i.i.d. draws from the distribution the model will
  serve, then with probability at least `confidence` over that draw, the chosen threshold's
  disagreement rate with the full model on that distribution is at most alpha, and so is its
  expected accuracy drop (accuracy can fall only on examples where the predictions differ).
  Nothing is guaranteed for F1 or MCC, or for the drop measured on one finite test set.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
from typing import Mapping, Sequence

import numpy as np

from deebert_jax.core.errors import DeeBertError, InputError
from deebert_jax.data import glue as data
from deebert_jax.evaluation import sweep as evaluation
from deebert_jax.evaluation import metrics
from deebert_jax.inference.early_exit import EXIT_RULES, check_threshold, exits_from_ramp_logits
from deebert_jax.evaluation.sweep import default_thresholds
from deebert_jax.core.fileutil import atomic_write_text

POLICY_FILE = "exit_policy.json"
POLICY_FORMAT = 1
CALIBRATION_SPLITS = ("dev-half", "train-holdout")


class CalibrationError(DeeBertError, ValueError):
    """No threshold saves layers within the budget; the message names the best one found."""


# ----------------------------------------------------------------------------------------------
# Exits from all-ramp logits

def exit_layers(ramp_logits: np.ndarray, threshold: float, rule: str = "entropy") -> np.ndarray:
    """[L, N, K] -> [N] int, the 1-based layer each example exits at: `early_exit`'s own exit
    update (`exits_from_ramp_logits`) over logits computed once, so a grid costs no model run."""
    check_threshold(threshold, rule)
    return np.asarray(exits_from_ramp_logits(np.asarray(ramp_logits, np.float32), np.float32(threshold), rule)
                      .exit_layer)


def exit_logits(ramp_logits: np.ndarray, exit_layer: np.ndarray) -> np.ndarray:
    """[L, N, K], [N] 1-based -> [N, K], each example's logits at its exit ramp."""
    return np.asarray(ramp_logits)[np.asarray(exit_layer) - 1, np.arange(len(exit_layer))]


def candidate_thresholds(rule: str, num_layers: int, num_labels: int) -> list[float]:
    """A fixed grid, ordered from safe to aggressive, without the never-exit threshold (identical
    to the full model by construction): the original sweep (`evaluation.default_thresholds`),
    extended for K > 2 labels in steps of 0.1 towards the rule's extreme (entropy up to ln K,
    max_prob down to 1/K); entropy also every 0.01 below ln K. Fixed before any data is seen, as
    fixed-sequence testing requires."""
    grid = default_thresholds(rule, num_layers)
    if rule == "entropy":
        grid += [round(t, 1) for t in np.arange(grid[-1] + 0.1, math.log(num_labels), 0.1)]
        # Fixed-sequence testing stops at the first threshold it cannot certify, so extra grid
        # points cost no confidence: entropy in steps of 0.01 (and four below 0.01), where the
        # sweep's grid jumps 0.01 -> 0.05 -> 0.1, a range off-ramps with fitted temperatures use.
        fine = [0.001, 0.0025, 0.005, 0.0075] + [round(0.01 * i, 2) for i in range(1, int(math.log(num_labels) / 0.01) + 1)]
        grid = sorted(set(grid) | set(fine))
    elif rule == "max_prob":
        grid += [round(t, 1) for t in np.arange(grid[-1] - 0.1, 1 / num_labels, -0.1)]
    return [float(t) for t in grid[1:]]


# ----------------------------------------------------------------------------------------------
# Binomial tail (no scipy)

def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space: log C(n, i) from math.lgamma, the terms with numpy."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = np.arange(k + 1, dtype=np.float64)
    # log C(n, i) = log C(n, k) + sum_{j=i}^{k-1} log((j + 1) / (n - j)): suffix sums, one lgamma triple
    steps = np.log((i[:-1] + 1) / (n - i[:-1]))
    log_choose = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                  + np.append(np.cumsum(steps[::-1])[::-1], 0.0))
    log_pmf = log_choose + i * math.log(p) + (n - i) * math.log1p(-p)
    top = log_pmf.max()
    return float(min(1.0, math.exp(top) * np.exp(log_pmf - top).sum()))


def binomial_upper_bound(k: int, n: int, confidence: float) -> float:
    """Clopper-Pearson one-sided upper confidence bound on a rate after k events in n trials:
    the largest p with P(Binomial(n, p) <= k) >= 1 - confidence (bisection, to 1e-10)."""
    if n <= 0 or k >= n:
        return 1.0
    delta = 1.0 - confidence
    lo, hi = k / n, 1.0
    while hi - lo > 1e-10:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if binomial_cdf(k, n, mid) >= delta else (lo, mid)
    return hi


# ----------------------------------------------------------------------------------------------
# Choosing a threshold

def threshold_stats(task: str, ramp_logits: np.ndarray, labels: np.ndarray, threshold: float,
                    rule: str = "entropy") -> dict:
    """Early exit at `threshold` against the full model on [L, N, K] logits and [N] labels.

    -> {threshold, n, disagreements, disagreement (rate of predictions that differ from ramp L's),
    metric, full_metric, drop (full_metric - metric, in points), mean_exit_layer, saving}.
    """
    L, n = ramp_logits.shape[:2]
    exit_layer = exit_layers(ramp_logits, threshold, rule)
    preds = exit_logits(ramp_logits, exit_layer).argmax(-1)
    full = ramp_logits[-1].argmax(-1)
    name = metrics.metric_name(task)
    metric = metrics.compute_metrics(task, labels, preds)[name]
    full_metric = metrics.compute_metrics(task, labels, full)[name]
    disagreements = int((preds != full).sum())
    return {"threshold": float(threshold), "n": int(n), "disagreements": disagreements,
            "disagreement": disagreements / n, "metric": metric, "full_metric": full_metric,
            "drop": 100.0 * (full_metric - metric), "mean_exit_layer": float(exit_layer.mean()),
            "saving": 1.0 - float(exit_layer.mean()) / L}


def check_budget(max_drop: float, confidence: float | None) -> None:
    if not math.isfinite(max_drop) or max_drop < 0:
        raise InputError(f"max_drop={max_drop} must be a number of points >= 0")
    if confidence is not None and not 0 < confidence < 1:
        raise InputError(f"confidence={confidence} must be in (0, 1)")


def choose_threshold(task: str, ramp_logits: np.ndarray, labels: np.ndarray, max_drop: float,
                     rule: str = "entropy", confidence: float | None = None,
                     thresholds: Sequence[float] | None = None) -> tuple[dict, list[dict]]:
    """-> (the chosen threshold's `threshold_stats`, every tested threshold's stats), see the
    module docstring. With `confidence`, stats also carry `p_value` and `bound` (the Clopper-
    Pearson upper bound on the disagreement rate). Raises CalibrationError when nothing saves
    layers within the budget."""
    check_budget(max_drop, confidence)
    L, n, K = ramp_logits.shape
    if n == 0:
        raise InputError("no calibration examples")
    if thresholds is None:
        thresholds = candidate_thresholds(rule, L, K)
    alpha, tested = max_drop / 100.0, []
    for t in thresholds:
        stats = threshold_stats(task, ramp_logits, labels, t, rule)
        stats["within_budget"] = stats["drop"] <= max_drop + 1e-9
        if confidence is not None:
            stats["p_value"] = binomial_cdf(stats["disagreements"], n, alpha) if alpha > 0 else 1.0
            stats["bound"] = binomial_upper_bound(stats["disagreements"], n, confidence)
            stats["rejected"] = stats["p_value"] <= 1.0 - confidence
        tested.append(stats)
        if confidence is not None and not stats["rejected"]:
            break   # fixed-sequence testing: the first null not rejected ends the sequence
    eligible = [s for s in tested if s["within_budget"] and s.get("rejected", True) and s["saving"] > 0]
    if eligible:
        return max(eligible, key=lambda s: s["saving"]), tested   # max keeps the safest of equals
    raise CalibrationError(_refusal(max_drop, confidence, n, tested))


def _refusal(max_drop, confidence, n, tested) -> str:
    level = f" at {confidence:.0%} confidence" if confidence is not None else ""
    saving = [s for s in tested if s["saving"] > 0] or tested
    not_rejected = [s for s in tested if not s.get("rejected", True)]
    best = not_rejected[0] if not_rejected else min(saving, key=lambda s: (s["drop"], -s["saving"]))
    if confidence is not None:
        found = (f"threshold {best['threshold']:g}: disagreement bound {best['bound']:.2%} on {n} examples "
                 f"(budget {max_drop / 100:.2%}), drop {best['drop']:.2f} points, saving {best['saving']:.1%}")
    else:
        found = f"threshold {best['threshold']:g}: drop {best['drop']:.2f} points, saving {best['saving']:.1%}"
    return (f"no threshold saves layers within a drop of {max_drop:g} points{level} on {n} calibration "
            f"examples (best: {found})")


def split_indices(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed seeded halving of n examples -> (calibration rows, reported rows), each sorted;
    the calibration half gets the odd one out."""
    order = np.random.default_rng(seed).permutation(n)
    half = (n + 1) // 2
    return np.sort(order[:half]), np.sort(order[half:])


@dataclasses.dataclass(frozen=True)
class CalibrationSets:
    """Every ramp's logits on the calibration and the reported examples, computed once.

    calibration, reported: ([L, n, K] float32 logits, [n] labels). split: one of
    CALIBRATION_SPLITS. extra: what the policy records about the split ({"seed"} for dev-half,
    {"calibration_size"} for train-holdout) and the model (`model_fingerprint`, `max_seq_length`). rows: for dev-half, the (calibration, reported) dev
    row indices, disjoint and sorted; None for train-holdout (the two come from different splits).
    """
    calibration: tuple[np.ndarray, np.ndarray]
    reported: tuple[np.ndarray, np.ndarray]
    split: str
    extra: dict
    rows: tuple[np.ndarray, np.ndarray] | None = None


def calibration_sets(config, params, task: str, tokenizer=None, *, split: str = "dev-half", seed: int = 0,
                     calibration_size: int = 1000, glue_dir: str | os.PathLike | None = None,
                     max_seq_length: int = 128, limit: int | None = None, batch_size: int = 32,
                     progress: bool = False) -> CalibrationSets:
    """The examples a threshold is chosen on and the ones it is reported on, as all-ramp logits.

    dev-half: a seeded half of dev (`split_indices`, `limit` first rows) calibrates, the other
    half is reported. train-holdout: the last `calibration_size` train rows calibrate, dev is
    reported (sound only when training did not see those rows).
    """
    if split not in CALIBRATION_SPLITS:
        raise InputError(f"unknown calibration split {split!r}; expected one of {list(CALIBRATION_SPLITS)}")
    from deebert_jax.weights.checkpoint import model_fingerprint

    common = dict(glue_dir=glue_dir, tokenizer=tokenizer, max_seq_length=max_seq_length,
                  vocab_size=config.vocab_size)
    # What the policy was calibrated on, so that loading it can refuse other weights or lengths.
    model = {"model_fingerprint": model_fingerprint(config, params), "max_seq_length": int(max_seq_length)}
    dev = data.load_split(task, "dev", limit=limit, **common)
    logits = lambda arrays: evaluation.all_ramp_logits(config, params, arrays, batch_size, progress=progress)
    if split == "dev-half":
        n = data.num_examples(dev)
        if n < 2:
            raise InputError(f"{task} dev: {n} example(s); the dev-half split needs at least 2")
        dev_logits = logits(dev)
        cal_rows, rep_rows = split_indices(n, seed)
        return CalibrationSets((dev_logits[:, cal_rows], dev["labels"][cal_rows]),
                               (dev_logits[:, rep_rows], dev["labels"][rep_rows]),
                               split, {"seed": seed, **model}, (cal_rows, rep_rows))
    train = data.load_split(task, "train", **common)
    tail = {k: v[-calibration_size:] for k, v in train.items()}
    return CalibrationSets((logits(tail), tail["labels"]), (logits(dev), dev["labels"]), split,
                           {"calibration_size": data.num_examples(tail), **model})


def check_clear_of_temperature_rows(model_dir: str | os.PathLike, calibration_size: int,
                                    flag: str = "--calibration-size") -> None:
    """train-holdout calibration of a model whose off-ramp temperatures were fitted on held-out
    rows (`training.json`): the last `calibration_size` training rows (`flag`) must not include
    them, or the thresholds tested would depend on the calibration draw (an InputError says how
    many fit)."""
    from deebert_jax.weights.checkpoint import TRAINING_FILE, ramp_temperature_record

    record = ramp_temperature_record(model_dir)
    if record is None:
        return
    clear = record["holdout"] - record["rows"]
    if calibration_size > clear:
        raise InputError(f"{flag} {calibration_size}: the off-ramp temperatures of {model_dir} were fitted "
                         f"on the first {record['rows']} of the last {record['holdout']} training rows "
                         f"({TRAINING_FILE}); calibrating on them would void the guarantee: use at most "
                         f"{flag} {clear}")


def make_policy(task: str, rule: str, max_drop: float, confidence: float | None, chosen: Mapping,
                tested: Sequence[Mapping], reported: Mapping, calibration_split: str, num_layers: int,
                **extra) -> dict:
    """The `exit_policy.json` dict (`extra`: e.g. the split's seed or size, `max_seq_length`, and
    `model_fingerprint` (`weights.checkpoint.model_fingerprint`), which loading checks)."""
    keep = ("n", "disagreement", "drop", "saving", "bound", "p_value", "metric", "full_metric", "mean_exit_layer")
    row = lambda s: {k: s[k] for k in ("threshold", *keep) if k in s}
    name = metrics.metric_name(task)
    return {
        "format": POLICY_FORMAT, "rule": rule, "threshold": chosen["threshold"], "max_drop": float(max_drop),
        "confidence": confidence, "task": task, "metric_name": name, "num_layers": num_layers,
        "calibration_split": calibration_split,
        "chosen_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), **extra,
        "calibration": {k: chosen.get(k) for k in keep},
        "reported": {k: reported[k] for k in keep if k in reported},
        "guarantee": guarantee(max_drop, confidence),
        "guarantee_scope": guarantee_scope(confidence, calibration_split, task, extra.get("calibration_size")),
        "tested": [row(s) for s in tested],
    }


def guarantee(max_drop: float, confidence: float | None) -> str | None:
    if confidence is None:
        return None
    return (f"with probability >= {confidence:g} over the calibration draw (i.i.d. from the serving distribution), "
            f"the disagreement rate with the full model is at most {max_drop:g}%, so the expected accuracy drop is "
            f"at most {max_drop:g} points")


def guarantee_scope(confidence: float | None, split: str, task: str, calibration_size: int | None = None) -> list[str]:
    """What the guarantee does and does not promise for this split and metric, one sentence each
    (written into the policy and printed by `train.calibrate`)."""
    if confidence is None:
        lines = ["no guarantee: the empirical choice is the best threshold on these calibration examples; "
                 "on other examples its drop can be larger (choose with --confidence for a guarantee)"]
    else:
        lines = [f"it holds over calibration draws: in at most {1 - confidence:.0%} of them is the chosen threshold "
                 "worse than the budget on the distribution they were drawn from"]
    if split == "dev-half":
        lines.append("population: examples distributed like the task's dev set (the reported half is a finite "
                     "sample of it: its drop can exceed the budget by chance)")
    else:
        rows = f"the last {calibration_size} training rows" if calibration_size else "the held-out training rows"
        lines.append(f"population: examples distributed like {rows}, which no training stage saw; inputs from "
                     "elsewhere are not covered" + (" (SST-2's training rows are phrases of the parse trees, its dev "
                                                   "rows whole sentences: dev is not that population, so the "
                                                   "drop reported on dev is a check, not the guarantee)"
                                                   if task.lower().replace("-", "") == "sst2" else ""))
    name = metrics.metric_name(task)
    if name == "accuracy":
        lines.append("metric: accuracy can fall only where predictions change, so a disagreement rate of at most "
                     "the budget bounds the expected accuracy drop")
    else:
        lines.append(f"metric: only the disagreement rate with the full model is bounded; {name} is not "
                     f"({name} is not an average over examples, a few changed predictions can move it more)")
    return lines


def calibration_size_needed(disagreements: int, max_drop: float, confidence: float, limit: int = 10 ** 7) -> int | None:
    """The fewest calibration examples with which a threshold showing `disagreements` of them is
    certified (exact binomial p-value <= 1 - confidence at rate max_drop / 100): the power of the
    test. None past `limit`."""
    alpha, delta = max_drop / 100.0, 1.0 - confidence
    if alpha <= 0:
        return None
    lo, hi = disagreements + 1, disagreements + 1
    while binomial_cdf(disagreements, hi, alpha) > delta:
        lo, hi = hi, hi * 2
        if hi > limit:
            return None
    while lo < hi:   # binomial_cdf(k, n, alpha) falls as n grows
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if binomial_cdf(disagreements, mid, alpha) > delta else (lo, mid)
    return lo


def format_power_table(max_drop: float, confidence: float, disagreements: Sequence[int] = (0, 1, 2, 5, 10, 20, 50)
                       ) -> str:
    """Markdown: for each k, the calibration size that certifies a threshold with k disagreements."""
    lines = [f"| disagreements k | calibration examples needed (budget {max_drop:g} points, confidence "
             f"{confidence:g}) | k / n |", "|---|---|---|"]
    for k in disagreements:
        n = calibration_size_needed(k, max_drop, confidence)
        lines.append(f"| {k} | {n if n else '-'} | {k / n:.2%} |" if n else f"| {k} | - | - |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The policy file

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
        from deebert_jax.weights.checkpoint import model_fingerprint

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


def format_summary(policy: Mapping) -> str:
    """A one-screen summary: the tested thresholds, the choice, and the reported split."""
    conf = policy["confidence"]
    level = f", confidence {conf:g}" if conf is not None else " (empirical, no guarantee)"
    lines = [f"{policy['task']}: rule {policy['rule']}, budget {policy['max_drop']:g} points of "
             f"{policy['metric_name']}{level}",
             f"{'threshold':>9}  {'disagree':>8}  {'bound':>7}  {'drop':>6}  {'saving':>7}"]
    for s in policy["tested"]:
        bound = f"{s['bound']:>7.2%}" if "bound" in s else f"{'-':>7}"
        mark = "  <- chosen" if s["threshold"] == policy["threshold"] else ""
        lines.append(f"{s['threshold']:>9.4g}  {s['disagreement']:>8.2%}  {bound}  {s['drop']:>6.2f}  "
                     f"{s['saving']:>7.1%}{mark}")
    cal, rep = policy["calibration"], policy["reported"]
    lines.append(f"calibration ({policy['calibration_split']}, {cal['n']} examples): threshold "
                 f"{policy['threshold']:g}, drop {cal['drop']:.2f} points, saving {cal['saving']:.1%}, "
                 f"disagreement {cal['disagreement']:.2%}")
    lines.append(f"reported ({rep['n']} other examples): {policy['metric_name']} {rep['metric']:.4f} vs "
                 f"{rep['full_metric']:.4f} full, drop {rep['drop']:.2f} points, saving {rep['saving']:.1%}, "
                 f"disagreement {rep['disagreement']:.2%}")
    if policy.get("guarantee"):
        lines.append(f"guarantee: {policy['guarantee']}")
    for line in policy.get("guarantee_scope") or ():
        lines.append(f"  - {line}")
    if conf is not None and policy["max_drop"] > 0:
        k = certifiable_disagreements(cal["n"], policy["max_drop"], conf)
        lines.append(f"power: with {cal['n']} calibration examples " +
                     (f"a threshold passes with at most {k} disagreements ({k / cal['n']:.2%})" if k is not None
                      else f"no threshold can pass (even 0 disagreements need "
                           f"{calibration_size_needed(0, policy['max_drop'], conf)})")
                     + "; docs/calibration.md gives the sizes for more")
    return "\n".join(lines)


def certifiable_disagreements(n: int, max_drop: float, confidence: float) -> int | None:
    """The most disagreements among n calibration examples with which a threshold still passes;
    None when even 0 does not."""
    alpha, delta = max_drop / 100.0, 1.0 - confidence
    if alpha <= 0 or binomial_cdf(0, n, alpha) > delta:
        return None
    k = 0
    while k + 1 < n and binomial_cdf(k + 1, n, alpha) <= delta:
        k += 1
    return k
