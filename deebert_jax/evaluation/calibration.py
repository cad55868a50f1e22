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

import datetime
import math
from typing import Mapping, Sequence

import numpy as np

from deebert_jax.core.errors import DeeBertError, InputError
from deebert_jax.evaluation import metrics
from deebert_jax.evaluation.binomial import binomial_cdf, binomial_upper_bound, certifiable_disagreements, \
    calibration_size_needed, format_power_table  # noqa: F401 (format_power_table: importable here, as before)
from deebert_jax.evaluation.calibration_sets import CALIBRATION_SPLITS, CalibrationSets, calibration_sets, \
    check_clear_of_temperature_rows, check_untrained_tail, split_indices  # noqa: F401 (importable here, as before)
from deebert_jax.evaluation.sweep import default_thresholds
from deebert_jax.inference.early_exit import check_threshold, exits_from_ramp_logits
# The policy file is read and written in one place; its names stay importable here, as before.
from deebert_jax.inference.exit_policy import POLICY_FILE, POLICY_FORMAT, describe_policy, load_exit_policy, \
    with_policy_threshold, write_exit_policy  # noqa: F401


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


