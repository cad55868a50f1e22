"""Exit rules side by side: each rule's calibrated threshold at each drop budget, measured on
examples it was not chosen on.

Everything is numpy over the all-ramp logits of `calibration.calibration_sets` ([L, N, K], one
forward pass for every rule and budget). For each rule and budget, `calibration.choose_threshold`
picks on the calibration examples (the largest layer saving within the budget, or a refusal) and
`calibration.threshold_stats` measures that threshold on the held-out examples. Each rule's
held-out trade-off curve (the never-exit threshold, then every candidate) goes with it for the plot.

The result (`compare_rules`) is one strict-JSON dict:
    task, metric_name, num_layers, num_labels, rules, budgets, confidence, n_calibration, n_held_out,
    full_metric {calibration, held_out},
    entries: one per rule x budget (rules outer): {rule, budget, refused, refusal, threshold,
        calibration {n, drop, saving, metric, full_metric, disagreement, mean_exit_layer[, bound, p_value]},
        held_out {the same, without bound and p_value}} (a refusal: threshold, calibration, held_out null),
    curves: {rule: [{threshold, drop, saving, metric, mean_exit_layer, disagreement} held-out, safe first]}.
Drops are points of the task metric below the full model (ramp L) on the same examples; savings
are 1 - mean exit layer / L.
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from deebert_jax.core.errors import InputError
from deebert_jax.evaluation import calibration
from deebert_jax.evaluation import metrics
from deebert_jax.inference.early_exit import EXIT_RULES
from deebert_jax.evaluation.sweep import default_thresholds
from deebert_jax.core.fileutil import atomic_write_bytes, atomic_write_text
from benchmarks.results import relative_paths

FORMAT = 1
DEFAULT_RULES = ("entropy", "max_prob", "patience")
DEFAULT_BUDGETS = (0.5, 1.0)
_STATS = ("n", "drop", "saving", "metric", "full_metric", "disagreement", "mean_exit_layer")
_REQUIRED = ("task", "metric_name", "num_layers", "rules", "budgets", "n_calibration", "n_held_out",
             "entries", "curves")


def check_rules(rules: Iterable[str]) -> list[str]:
    """Rule names -> the list without repeats (order kept); ValueError for an unknown or no rule."""
    rules = list(dict.fromkeys(r.strip() for r in rules if r.strip()))
    unknown = [r for r in rules if r not in EXIT_RULES]
    if unknown:
        raise InputError(f"unknown exit rule(s) {unknown}; expected some of {sorted(EXIT_RULES)}")
    if not rules:
        raise InputError(f"no exit rule given; expected some of {sorted(EXIT_RULES)}")
    return rules


def check_budgets(budgets: Iterable[float]) -> list[float]:
    """Budgets in points -> floats without repeats (order kept); ValueError for a negative,
    non-finite or missing one."""
    out = []
    for b in budgets:
        b = float(b)
        if not math.isfinite(b) or b < 0:
            raise InputError(f"budget {b:g} must be a number of points >= 0")
        if b not in out:
            out.append(b)
    if not out:
        raise InputError("no budget given (points of the task metric, e.g. 0.5,1.0)")
    return out


def curve_thresholds(rule: str, num_layers: int, num_labels: int) -> list[float]:
    """The never-exit threshold (the full model: drop 0, saving 0), then
    `calibration.candidate_thresholds`, safe to aggressive."""
    return [float(default_thresholds(rule, num_layers)[0])] + calibration.candidate_thresholds(
        rule, num_layers, num_labels)


def _stats(s: Mapping[str, Any], keys: Sequence[str] = _STATS) -> dict:
    return {k: s[k] for k in keys if k in s}


def compare_rules(task: str, calibration_set: tuple[np.ndarray, np.ndarray],
                  held_out_set: tuple[np.ndarray, np.ndarray], rules: Sequence[str] = DEFAULT_RULES,
                  budgets: Sequence[float] = DEFAULT_BUDGETS, confidence: float | None = None) -> dict:
    """Each rule's calibrated threshold at each budget and its held-out statistics (module docstring).

    calibration_set, held_out_set: ([L, n, K] logits, [n] labels), disjoint examples of one model.
    A budget no threshold fits gives an entry with `refused` true and the refusal message.
    """
    rules, budgets = check_rules(rules), check_budgets(budgets)
    calibration.check_budget(0.0, confidence)
    cal_logits, cal_labels = calibration_set
    held_logits, held_labels = held_out_set
    L, n_cal, K = cal_logits.shape
    if held_logits.shape[0] != L or held_logits.shape[2] != K:
        raise InputError(f"calibration logits {cal_logits.shape} and held-out logits {held_logits.shape} "
                         "disagree on layers or labels")
    if n_cal == 0 or held_logits.shape[1] == 0:
        raise InputError(f"need calibration and held-out examples, got {n_cal} and {held_logits.shape[1]}")
    entries, curves = [], {}
    for rule in rules:
        curve = [calibration.threshold_stats(task, held_logits, held_labels, t, rule)
                 for t in curve_thresholds(rule, L, K)]
        curves[rule] = [_stats(s, ("threshold", "drop", "saving", "metric", "mean_exit_layer", "disagreement"))
                        for s in curve]
        for budget in budgets:
            entry = {"rule": rule, "budget": budget, "refused": False, "refusal": None}
            try:
                chosen, _ = calibration.choose_threshold(task, cal_logits, cal_labels, budget, rule, confidence)
            except calibration.CalibrationError as e:
                entries.append({**entry, "refused": True, "refusal": str(e), "threshold": None,
                                "calibration": None, "held_out": None})
                continue
            held = calibration.threshold_stats(task, held_logits, held_labels, chosen["threshold"], rule)
            entries.append({**entry, "threshold": chosen["threshold"],
                            "calibration": _stats(chosen, _STATS + ("bound", "p_value")),
                            "held_out": _stats(held)})
    full = lambda z, y: metrics.compute_metrics(task, y, z[-1].argmax(-1))[metrics.metric_name(task)]
    return {"format": FORMAT, "task": task, "metric_name": metrics.metric_name(task), "num_layers": int(L),
            "num_labels": int(K), "rules": rules, "budgets": budgets, "confidence": confidence,
            "n_calibration": int(n_cal), "n_held_out": int(held_logits.shape[1]),
            "full_metric": {"calibration": full(cal_logits, cal_labels), "held_out": full(held_logits, held_labels)},
            "entries": entries, "curves": curves}


# ----------------------------------------------------------------------------------------------
# Table, plot, files

def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def table_rows(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, one row per rule x budget): rule, budget, threshold, calibration drop and saving,
    held-out drop, saving and metric, held-out mean exit layer; a refusal reads "refused"."""
    name = result["metric_name"]
    header = ["rule", "budget (points)", "threshold", "calibration drop", "calibration saving",
              "held-out drop", "held-out saving", f"held-out {name}", "mean exit layer"]
    rows = []
    for e in result["entries"]:
        if e["refused"]:
            rows.append([e["rule"], f"{e['budget']:g}", "refused"] + ["-"] * (len(header) - 3))
            continue
        cal, held = e["calibration"], e["held_out"]
        rows.append([e["rule"], f"{e['budget']:g}", f"{e['threshold']:g}", f"{cal['drop']:.2f}",
                     f"{100 * cal['saving']:.1f}%", f"{held['drop']:.2f}", f"{100 * held['saving']:.1f}%",
                     f"{100 * held['metric']:.2f}", f"{held['mean_exit_layer']:.2f}"])
    return header, rows


def format_markdown(result: Mapping[str, Any], plot: str | None = None, heading: str = "###") -> str:
    """One task's block: heading, command and split, the table, refusals, the plot (`plot`: its
    path relative to where the Markdown goes). Paths under the current directory in the command
    and the model directory are written relative to it."""
    name = result["metric_name"]
    split = result.get("calibration_split", "dev-half")
    conf = result.get("confidence")
    out = [f"{heading} {result['task']}: exit rules side by side", ""]
    if result.get("command"):
        model = f" (model `{relative_paths(result['checkpoint'])}`)" if result.get("checkpoint") else ""
        out.append(f"Command: `{relative_paths(result['command'])}`{model}  ")
    out += [f"Calibration ({split}): {result['n_calibration']} examples; held out: {result['n_held_out']} others. "
            f"Full model (ramp {result['num_layers']}) {name}: {100 * result['full_metric']['calibration']:.2f} "
            f"(calibration), {100 * result['full_metric']['held_out']:.2f} (held out). Each rule's threshold is the "
            f"largest layer saving whose calibration drop is within the budget"
            + (f" at {conf:g} confidence (Learn-then-Test)" if conf is not None else "")
            + "; the held-out columns are measured on examples it never saw. Drops in points of "
            f"{name} below the full model.", ""]
    out += _md_table(*table_rows(result))
    refusals = [e for e in result["entries"] if e["refused"]]
    if refusals:
        out += [""] + [f"- {e['rule']}, budget {e['budget']:g}: {e['refusal']}" for e in refusals]
    if plot:
        out += ["", f"![{result['task']}: exit rules side by side]({plot})"]
    return "\n".join(out) + "\n"


_BUDGET_MARKERS = ("*", "D", "^", "s", "P", "X")
_BUDGET_LINES = ("--", ":", "-.", (0, (1, 4)))


def render_plot(result: Mapping[str, Any]) -> bytes:
    """PNG bytes: held-out layer saving against held-out drop, one curve per rule (its thresholds,
    safe to aggressive), each budget's chosen threshold marked, a vertical line at each budget.
    Left: every threshold; right: the region of the budgets."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets, name = result["budgets"], result["metric_name"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # The right panel: from a little below 0 (early exit can gain) to three times the largest budget.
    drops = [p["drop"] for pts in result["curves"].values() for p in pts]
    zoom_right = 3 * max(max(budgets), 0.5)
    zoom_left = min(max(min(drops) - 0.1, -zoom_right), -0.25 * zoom_right)
    zoom_ys = [100 * p["saving"] for pts in result["curves"].values() for p in pts
               if zoom_left <= p["drop"] <= zoom_right] + [0.0]
    for ax in axes:
        for i, rule in enumerate(result["rules"]):
            pts = result["curves"][rule]
            color = colors[i % len(colors)]
            ax.plot([p["drop"] for p in pts], [100 * p["saving"] for p in pts], "o-", ms=3, color=color,
                    label=rule)
            for j, b in enumerate(budgets):
                for e in result["entries"]:
                    if e["rule"] == rule and e["budget"] == b and not e["refused"]:
                        ax.plot(e["held_out"]["drop"], 100 * e["held_out"]["saving"], ls="none", ms=11,
                                marker=_BUDGET_MARKERS[j % len(_BUDGET_MARKERS)], color=color, mec="black")
        for j, b in enumerate(budgets):
            ax.axvline(b, color="gray", lw=1, ls=_BUDGET_LINES[j % len(_BUDGET_LINES)], label=f"budget {b:g}")
            ax.plot([], [], ls="none", ms=9, marker=_BUDGET_MARKERS[j % len(_BUDGET_MARKERS)], color="white",
                    mec="black", label=f"chosen at budget {b:g}")
        ax.axvline(0, color="black", lw=0.5)
        ax.set(xlabel=f"held-out drop ({name}, points below the full model)", ylabel="held-out layer saving (%)")
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{result['task']}: every threshold, {result['n_held_out']} held-out examples", fontsize=10)
    axes[1].set_title("near the budgets (each threshold chosen on the calibration examples)", fontsize=10)
    axes[1].set_xlim(zoom_left, zoom_right)
    axes[1].set_ylim(-2, max(zoom_ys) * 1.1 + 2)
    axes[0].legend(loc="best", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_plot(result: Mapping[str, Any], path: str | os.PathLike) -> str:
    """`render_plot` written atomically to `path`."""
    return atomic_write_bytes(path, render_plot(result))


def to_json(result: Mapping[str, Any]) -> str:
    """Strict JSON (no NaN or Infinity)."""
    return json.dumps(result, indent=2, allow_nan=False) + "\n"


def write_outputs(result: Mapping[str, Any], out: str | os.PathLike, plot: str | os.PathLike | None = None,
                  markdown: str | os.PathLike | None = None) -> dict[str, str]:
    """Writes the JSON, and the plot and Markdown when asked -> {"json", "png"?, "markdown"?: path}.
    Everything is rendered before the first file is written; each file is replaced in one rename."""
    texts = {"json": (out, to_json(result))}
    if plot is not None:
        texts["png"] = (plot, render_plot(result))
    if markdown is not None:
        link = None
        if plot is not None:
            link = os.path.relpath(os.path.abspath(plot), os.path.dirname(os.path.abspath(markdown)))
        texts["markdown"] = (markdown, format_markdown(result, link))
    return {kind: (atomic_write_bytes(path, body) if isinstance(body, bytes) else atomic_write_text(path, body))
            for kind, (path, body) in texts.items()}


def load_comparison(path: str | os.PathLike) -> dict:
    """A `compare_rules` JSON file -> the dict; ValueError naming the file when it is not one."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(result, dict):
        raise InputError(f"{path}: not a rule comparison (expected a JSON object)")
    missing = [k for k in _REQUIRED if k not in result]
    if missing:
        raise InputError(f"{path}: not a rule comparison (no {', '.join(missing)}); "
                         "write one with python -m train.compare_rules")
    return result
