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
    max_prob down to 1/K). Fixed before any data is seen, as fixed-sequence testing requires."""
    grid = default_thresholds(rule, num_layers)
    if rule == "entropy":
        grid += [round(t, 1) for t in np.arange(grid[-1] + 0.1, math.log(num_labels), 0.1)]
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
    {"calibration_size"} for train-holdout). rows: for dev-half, the (calibration, reported) dev
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
    common = dict(glue_dir=glue_dir, tokenizer=tokenizer, max_seq_length=max_seq_length,
                  vocab_size=config.vocab_size)
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
                               split, {"seed": seed}, (cal_rows, rep_rows))
    train = data.load_split(task, "train", **common)
    tail = {k: v[-calibration_size:] for k, v in train.items()}
    return CalibrationSets((logits(tail), tail["labels"]), (logits(dev), dev["labels"]), split,
                           {"calibration_size": data.num_examples(tail)})


def make_policy(task: str, rule: str, max_drop: float, confidence: float | None, chosen: Mapping,
                tested: Sequence[Mapping], reported: Mapping, calibration_split: str, num_layers: int,
                **extra) -> dict:
    """The `exit_policy.json` dict (`extra`: e.g. the split's seed or size)."""
    keep = ("n", "disagreement", "drop", "saving", "bound", "p_value", "metric", "full_metric", "mean_exit_layer")
    row = lambda s: {k: s[k] for k in ("threshold", *keep) if k in s}
    return {
        "format": POLICY_FORMAT, "rule": rule, "threshold": chosen["threshold"], "max_drop": float(max_drop),
        "confidence": confidence, "task": task, "metric_name": metrics.metric_name(task), "num_layers": num_layers,
        "calibration_split": calibration_split, **extra,
        "calibration": {k: chosen.get(k) for k in keep},
        "reported": {k: reported[k] for k in keep if k in reported},
        "guarantee": guarantee(max_drop, confidence),
        "tested": [row(s) for s in tested],
    }


def guarantee(max_drop: float, confidence: float | None) -> str | None:
    if confidence is None:
        return None
    return (f"with probability >= {confidence:g} over the calibration draw (i.i.d. from the serving distribution), "
            f"the disagreement rate with the full model is at most {max_drop:g}%, so the expected accuracy drop is "
            f"at most {max_drop:g} points")


# ----------------------------------------------------------------------------------------------
# The policy file

def write_exit_policy(model_dir: str | os.PathLike, policy: Mapping, filename: str = POLICY_FILE) -> str:
    """Writes `model_dir/filename` atomically; touches nothing else in the directory."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{os.fspath(model_dir)}: no such directory")
    return atomic_write_text(os.path.join(os.fspath(model_dir), filename), json.dumps(policy, indent=2) + "\n")


def load_exit_policy(model_dir: str | os.PathLike) -> dict | None:
    """`model_dir/exit_policy.json` as a dict, None when absent; a file without a valid rule and
    threshold is a ValueError naming it."""
    path = os.path.join(os.fspath(model_dir), POLICY_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            policy = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(policy, dict) or "threshold" not in policy or policy.get("rule") not in EXIT_RULES:
        raise InputError(f"{path}: expected an object with 'rule' (one of {sorted(EXIT_RULES)}) and 'threshold'")
    try:
        check_threshold(policy["threshold"], policy["rule"])
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: {e}") from e
    return policy


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
    return "\n".join(lines)
