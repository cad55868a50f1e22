"""Summaries that join an evaluation sweep (`results.json`) with a latency run (`bench.json`)."""

from __future__ import annotations

import os
import re
import shlex
from typing import Any, Mapping

# Where a path may start: not inside a word or another path.
_PATH_START = r"(?<![\w.~/-])"
# What may follow a path in a command line: whitespace, a quote, a closing bracket, a separator.
_PATH_END = r"""[\s'"`),;]"""


def relative_paths(text: str, root: str | None = None, prefix: str = "") -> str:
    """`text` (a command line or a path) with every absolute path under `root` (default: the current
    directory) written relative to it, after `prefix`; other text is left alone.

    In /ckpt: "train.x --out /ckpt/workdirs/a --data /data" -> "train.x --out workdirs/a --data /data".
    """
    root = os.path.normpath(os.path.abspath(root or os.getcwd()))
    if root == os.sep:
        return text
    # Either the root, slashes and more of the path (-> that rest) or the root itself (-> ".").
    pattern = re.compile(_PATH_START + re.escape(root) + rf"(?:(/+)(?!{_PATH_END}|/|$)|/*(?={_PATH_END}|$))")
    return pattern.sub(lambda m: prefix if m.group(1) else (prefix.rstrip("/") or "."), text)


def portable_paths(value: Any, root: str | None = None) -> Any:
    """`value` (a string, or JSON-like lists and dicts of them) with absolute paths under `root`
    (default: the current directory) written relative to it, and those beside it as ../...: what
    a file kept in the repository may say of where things were."""
    if isinstance(value, str):
        root = os.path.normpath(os.path.abspath(root or os.getcwd()))
        return relative_paths(relative_paths(value, root), os.path.dirname(root), "../")
    if isinstance(value, list):
        return [portable_paths(v, root) for v in value]
    if isinstance(value, dict):
        return {k: portable_paths(v, root) for k, v in value.items()}
    return value


# Environment variables that change what a benchmark measures: a recorded command names those set.
MEASUREMENT_ENV = ("XLA_FLAGS", "JAX_DEFAULT_MATMUL_PRECISION", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "JAX_PLATFORMS")


def command_line(module: str, argv, env_vars=MEASUREMENT_ENV) -> str:
    """The command as a user would type it again: `VAR=value python -m module args`, with those of
    `env_vars` that are set, and paths under the current directory written relative to it."""
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in env_vars if os.environ.get(k)]
    return relative_paths(" ".join([*env, "python", "-m", module, *map(shlex.quote, argv)]))


def _bench_row(bench: Mapping[str, Any] | None, backend: str, mode: str, batch_size: int, threshold=None):
    for row in (bench or {}).get("rows", []):
        if (row["backend"], row["mode"], row["batch_size"]) == (backend, mode, batch_size) and (
                threshold is None or abs(float(row["threshold"]) - float(threshold)) < 1e-12):
            return row
    return None


def summary_rows(results: Mapping[str, Any], bench: Mapping[str, Any] | None = None,
                 batch_size: int = 1) -> list[dict]:
    """One row per swept threshold: the dev metric, layer saving and, where measured, latency.

    Latency is the benchmark's median per batch of `batch_size` for each backend's early exit at
    that threshold; thresholds the benchmark did not run get None.
    """
    final = results["per_ramp"][-1]["metric"]
    rows = []
    for point in results["sweep"]:
        t = point["threshold"]
        jax_row = _bench_row(bench, "jax", "early_exit", batch_size, t)
        torch_row = _bench_row(bench, "torch", "early_exit", batch_size, t)
        rows.append({
            "threshold": t,
            "metric": point["metric"],
            "metric_change": point["metric"] - final,
            "layer_saving": point["layer_saving"],
            "mean_exit_layer": point["mean_exit_layer"],
            "jax_ms": jax_row["median_ms"] if jax_row else None,
            "torch_ms": torch_row["median_ms"] if torch_row else None,
            "jax_wall_saving": jax_row.get("wall_saving") if jax_row else None,
        })
    return rows


def format_summary(results: Mapping[str, Any], bench: Mapping[str, Any] | None = None, batch_size: int = 1) -> str:
    """Plain-text table: threshold, metric (and its change), layer saving, JAX and PyTorch latency."""
    name = results["metric_name"]
    ms = lambda v: f"{v:9.2f}" if v is not None else f"{'-':>9}"
    pct = lambda v: f"{v:8.1%}" if v is not None else f"{'-':>8}"
    lines = [f"{results['task']} dev, {results['num_examples']} examples, {results['num_layers']} layers; "
             f"latency: median ms per batch of {batch_size}",
             f"{'threshold':>9}  {name:>8}  {'change':>7}  {'saving':>7}  {'exit layer':>10}  "
             f"{'JAX ms':>9}  {'torch ms':>9}  {'JAX wall saving':>15}"]
    for r in summary_rows(results, bench, batch_size):
        lines.append(f"{r['threshold']:>9g}  {r['metric']:>8.4f}  {100 * r['metric_change']:>+7.2f}  "
                     f"{r['layer_saving']:>7.1%}  {r['mean_exit_layer']:>10.2f}  {ms(r['jax_ms'])}  "
                     f"{ms(r['torch_ms'])}  {pct(r['jax_wall_saving']):>15}")
    full = [(b, _bench_row(bench, b, "full", batch_size)) for b in ("jax", "torch", "onnxruntime")]
    if any(row for _, row in full):
        lines.append("full-depth forward: " + ", ".join(
            f"{b} {row['median_ms']:.2f} ms" for b, row in full if row))
    return "\n".join(lines)


# The Hugging Face Flax GLUE example, bert-base-cased, 3 epochs: dev scores for context only.
REFERENCE_BERT_BASE = {"sst2": "accuracy 92.2", "mrpc": "F1 89.0", "rte": "accuracy 64.8", "qnli": "accuracy 90.8"}
# The accuracy/saving target on SST-2: at least this layer saving with at most this metric loss vs the
# final ramp.
TARGET_SAVING, TARGET_LOSS = 0.40, 0.010


def best_saving_within(results: Mapping[str, Any], max_loss: float) -> dict | None:
    """The sweep point with the largest layer saving whose metric is within `max_loss` of ramp L."""
    final = results["per_ramp"][-1]["metric"]
    ok = [p for p in results["sweep"] if final - p["metric"] <= max_loss + 1e-12]
    return max(ok, key=lambda p: p["layer_saving"]) if ok else None


def target_line(results: Mapping[str, Any], bold: str = "", policy: Mapping[str, Any] | None = None) -> str | None:
    """The headline: with `policy` (an exit_policy.json chosen on held-out rows), `held_out_line`,
    the target judged on it; without, `same_set_line`, which says the target is not judged.

    `bold`: the Markdown emphasis to wrap the numbers in ("**"), "" for plain text.
    """
    if policy is not None:
        return held_out_line(policy, bold)
    same = same_set_line(results, bold)
    return None if same is None else (same + " Target not judged: no threshold was chosen on held-out rows "
                                      "(config.calibration_holdout).")


def same_set_line(results: Mapping[str, Any], bold: str = "") -> str | None:
    """The sweep's largest saving within TARGET_LOSS of ramp L, labelled as what it is: chosen on
    the set it is measured on (optimistic)."""
    best = best_saving_within(results, TARGET_LOSS)
    if best is None:
        return None
    return (f"Same-set sweep (threshold chosen on the dev set it is measured on, so optimistic): largest "
            f"layer saving within {100 * TARGET_LOSS:.1f} point of the final ramp {bold}"
            f"{100 * best['layer_saving']:.1f}%{bold} at threshold {best['threshold']:g} "
            f"({results['metric_name']} {100 * best['metric']:.2f}).")


def held_out_line(policy: Mapping[str, Any], bold: str = "") -> str:
    """The threshold chosen on held-out rows (the policy), measured on dev, and the target judged on it."""
    rep, name = policy["reported"], policy.get("metric_name", "metric")
    level = (f", confidence {policy['confidence']:g}" if policy.get("confidence") is not None
             else ", empirical (no guarantee)")
    size = policy.get("calibration_size") or policy["calibration"]["n"]
    where = (f"{size} training rows no stage saw" if policy.get("calibration_split") == "train-holdout"
             else f"{size} {policy.get('calibration_split', '')} rows")
    met = rep["saving"] >= TARGET_SAVING and rep["drop"] <= 100 * TARGET_LOSS + 1e-9
    return (f"Held-out choice: {policy['rule']} threshold {policy['threshold']:g} chosen on {where} (budget "
            f"{policy['max_drop']:g} point{level}); on dev ({rep['n']} examples): {bold}{100 * rep['saving']:.1f}%"
            f"{bold} of layers saved, {name} {100 * rep['metric']:.2f} against {100 * rep['full_metric']:.2f} "
            f"(drop {rep['drop']:.2f} points), {100 * rep['disagreement']:.2f}% of predictions differ from the "
            f"final ramp. Target (>= {100 * TARGET_SAVING:.0f}% saved, <= {100 * TARGET_LOSS:.1f} point lost, "
            f"judged on this held-out choice): {bold}{'met' if met else 'not met'}{bold}.")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def ramp_pooling(cfg: Mapping[str, Any]) -> str:
    """What a run's off-ramps read, from its config ("" and runs before the field: "first")."""
    return (cfg.get("model") or {}).get("ramp_pooling") or "first"


def format_markdown_section(meta: Mapping[str, Any], results: Mapping[str, Any], bench: Mapping[str, Any],
                            pngs: Mapping[str, str], label: str = "") -> str:
    """One run's RESULTS.md section: setup, per-ramp metric, sweep, target, latency.

    Paths under the current directory in the commands and the label are written relative to it
    (run.json and bench.json record absolute ones).
    """
    task, name, L = results["task"], results["metric_name"], results["num_layers"]
    label = relative_paths(label)
    cfg = meta.get("config", {})
    final = results["per_ramp"][-1]["metric"]
    limit = cfg.get("train_limit", 0)
    pooling = ramp_pooling(cfg)
    holdout = cfg.get("calibration_holdout", 0)
    trained_on = (f"first {limit} training examples" if limit else
                  f"training set but its last {holdout} rows" if holdout else "full training set")
    temps = (meta.get("policy") or {}).get("ramp_temperatures")
    title = f"{task}: " + trained_on + \
        f", {'mean-pooled' if pooling == 'mean' else 'first-token'} off-ramps" + \
        (" with fitted temperatures" if temps else "") + (f" ({label})" if label else "")
    out = [f"## {title}", "",
           f"Command: `{relative_paths(meta['command'])}`"
           + (f" at commit `{meta['commit']}`" if meta.get("commit") else "") + "  ",
           f"Data: {portable_paths(str(meta.get('data', '?')))}; training examples: "
           + (f"first {limit}" if limit else f"all but the last {holdout}" if holdout else "all")
           + (f"; held out for the threshold: the last {holdout} training rows" if holdout else "")
           + f"; length {cfg.get('max_seq_length')}; epochs {cfg.get('stage1_epochs')} (stage 1) + "
             f"{cfg.get('stage2_epochs')} (stage 2); lr {cfg.get('learning_rate')} / {cfg.get('stage2_learning_rate')}; "
             f"batch {cfg.get('per_device_batch_size')} per device; seed {cfg.get('seed')}; "
             f"off-ramps read the {'mean of the real tokens' if pooling == 'mean' else 'first token'}"
             + (f" and learn ramp L's soft predictions (distillation, T {cfg.get('distill_temperature')}, "
                f"w {cfg.get('distill_weight')})" if cfg.get("offramp_loss") == "distill" else "")
             + (f"; off-ramp temperatures fitted to agree with ramp L on the first {temps['rows']} held-out rows "
                f"(the threshold chosen on the other {temps['holdout'] - temps['rows']}): "
                + ", ".join(f"{t:.3g}" for t in temps["temperatures"]) if temps else "") + ".  ",
           "Steps: " + "; ".join(f"`{relative_paths(s)}`" for s in meta.get("steps", [])) + "  ",
           *([f"JSON behind every number here: [{pngs['json']}/]({pngs['json']}/) (run.json, results.json, "
              f"bench.json)."] if pngs.get("json") else []), "",
           f"Final ramp (layer {L}) dev {name}: **{100 * final:.2f}** on {results['num_examples']} examples"
           + (f" (bert-base reference: {REFERENCE_BERT_BASE[task]})" if task in REFERENCE_BERT_BASE else ""), ""]
    out += _md_table(["layer"] + [str(r["layer"]) for r in results["per_ramp"]],
                     [[name] + [f"{100 * r['metric']:.2f}" for r in results["per_ramp"]]])
    out += ["", f"Threshold sweep on dev ({results.get('rule', 'entropy')}, mode {results.get('mode')}; "
                "every threshold measured on the same set, a curve, not a choice):", ""]
    out += _md_table(["threshold", name, "change (points)", "layer saving", "mean exit layer",
                      f"exit counts (layer 1..{L})"],
                     [[f"{p['threshold']:g}", f"{100 * p['metric']:.2f}", f"{100 * (p['metric'] - final):+.2f}",
                       f"{100 * p['layer_saving']:.1f}%", f"{p['mean_exit_layer']:.2f}",
                       " ".join(str(c) for c in p["exit_counts"])] for p in results["sweep"]])
    policy = meta.get("policy")
    if policy is not None:
        out += ["", held_out_line(policy, bold="**")]
    same = same_set_line(results)
    if same is not None:
        out += ["", same + ("" if policy is not None else " Target not judged: no threshold was chosen on "
                            "held-out rows (config.calibration_holdout).")]
    out += ["", f"![{task} trade-off]({pngs['tradeoff']})", "",
            f"Latency ({bench.get('device')}, threads {bench.get('threads')}"
            + (f", precision {bench['precision']} on both sides" if bench.get("precision") else "")
            + (f", 1-minute load average {bench['load_average_before'][0]:g} before it started"
               if bench.get("load_average_before") else "")
            + f"; `{relative_paths(bench.get('command', ''))}`):", ""]
    rows = sorted(bench["rows"], key=lambda r: (r["batch_size"], r["backend"], r["mode"] != "full", r["threshold"] or 0))
    out += _md_table(["backend", "mode", "batch", "threshold", "median ms", "p90 ms", "mean exit layer",
                      "wall saving"],
                     [[r["backend"], r["mode"], str(r["batch_size"]), ("-" if r["threshold"] is None else f"{r['threshold']:g}"), f"{r['median_ms']:.2f}",
                       f"{r['p90_ms']:.2f}", f"{r['mean_exit_layer']:.2f}",
                       f"{100 * r['wall_saving']:.1f}%" if r.get("wall_saving") is not None else "-"] for r in rows])
    out += ["", f"![{task} latency]({pngs['latency']})", ""]
    return "\n".join(out)
