"""Reading a latency result (`bench.json`): targets, schema, contention warning, table, plot.

`bench.json` is `{"device", "versions", "rows": [...]}` plus the header of
`bench_harness.environment` (threads, matmul rate, load average), the run's settings (model,
inputs, runs, command, JAX's `attention`: absent in older files, which ran "default") and `targets`,
the latency targets below checked from the rows.
`validate` checks the schema; `write_outputs` writes the JSON, a Markdown table and a plot.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

from deebert_jax.model.attention import ATTENTION_IMPLS
from deebert_jax.core.fileutil import atomic_write_text
from benchmarks.harness import BACKENDS, BenchmarkError
from benchmarks.precision import PRECISIONS

ROW_KEYS = ("backend", "mode", "batch_size", "seq_len", "threshold", "median_ms", "p90_ms",
            "mean_exit_layer", "compile_s")

# The latency targets, checked (not asserted) from a run's rows:
#   P1  JAX full forward / PyTorch full forward at batch 1: <= 0.7 on CPU, <= 0.3 on GPU;
#   P2  JAX early exit at threshold 0 / JAX full forward: <= 1.05 (the loop costs almost nothing);
#   P3  realized wall-clock saving / layer saving at batch 1: >= 0.9 (skipped layers are not paid for);
#   P6  the early-exit predictor compiles in under 10 s.
# P4 (exit-aware batching: realized saving >= 0.8 x layer saving) is measured by
# `train.benchmark_exit_aware`.
P1_CPU, P1_GPU, P2_MAX, P3_MIN, P6_MAX_S = 0.7, 0.3, 1.05, 0.9, 10.0
# Against ONNX Runtime at full depth, batch 1: our full depth no slower; early exit at the policy
# threshold at most 0.6x (the ideal at 52% layer saving is 0.48x).
ORT_FULL_MAX, ORT_EXIT_MAX = 1.0, 0.6


def check_targets(result: Mapping[str, Any]) -> list[dict]:
    """The latency targets P1, P2, P3, P6 (see above) evaluated on the rows (a report, not an assertion)."""
    rows = result["rows"]
    on_gpu = result.get("jax_platform", "cpu") != "cpu"
    out = []

    def find(**kw):
        return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]

    for jf in find(backend="jax", mode="full", batch_size=1):
        tf = find(backend="torch", mode="full", batch_size=1)
        if tf:
            limit = P1_GPU if on_gpu else P1_CPU
            ratio = jf["median_ms"] / tf[0]["median_ms"]
            out.append({"target": "P1", "what": f"jax full / torch full, batch 1, seq {jf['seq_len']}",
                        "value": round(ratio, 3), "limit": f"<= {limit}", "met": ratio <= limit})
    for jf in find(backend="jax", mode="full"):
        for e0 in find(backend="jax", mode="early_exit", batch_size=jf["batch_size"], threshold=0.0):
            ratio = e0["median_ms"] / jf["median_ms"]
            out.append({"target": "P2", "what": f"jax early_exit(0) / jax full, batch {jf['batch_size']}",
                        "value": round(ratio, 3), "limit": f"<= {P2_MAX}", "met": ratio <= P2_MAX})
    for backend in BACKENDS:
        for e in find(backend=backend, mode="early_exit", batch_size=1):
            if e["layer_saving"] >= 0.05:
                ratio = e["wall_saving"] / e["layer_saving"]
                out.append({"target": "P3", "what": f"{backend} wall / layer saving, batch 1, threshold {e['threshold']}",
                            "value": round(ratio, 3), "limit": f">= {P3_MIN}", "met": ratio >= P3_MIN})
    # Against what a CPU user deploys instead: ONNX Runtime at full depth, batch 1.
    for of in find(backend="onnxruntime", mode="full", batch_size=1):
        for jf in find(backend="jax", mode="full", batch_size=1):
            ratio = jf["median_ms"] / of["median_ms"]
            out.append({"target": "full vs onnxruntime", "what": "jax full / onnxruntime full, batch 1",
                        "value": round(ratio, 3), "limit": f"<= {ORT_FULL_MAX}", "met": ratio <= ORT_FULL_MAX})
        policy = result.get("policy_threshold")
        for e in find(backend="jax", mode="early_exit", batch_size=1, threshold=policy) if policy is not None else []:
            ratio = e["median_ms"] / of["median_ms"]
            out.append({"target": "early exit vs onnxruntime",
                        "what": f"jax early exit at the policy threshold {policy:g} / onnxruntime full, batch 1",
                        "value": round(ratio, 3), "limit": f"<= {ORT_EXIT_MAX}", "met": ratio <= ORT_EXIT_MAX})
    if multithreaded_contention(result):
        for t in out:
            if t["target"] in ("P1", "full vs onnxruntime", "early exit vs onnxruntime"):
                t["note"] = "machine was busy (see the warning): not evidence either way"
    seen = set()
    for e in find(backend="jax", mode="early_exit"):
        if e["batch_size"] not in seen and e["compile_s"] is not None:
            seen.add(e["batch_size"])
            out.append({"target": "P6", "what": f"predictor compile, batch {e['batch_size']}",
                        "value": e["compile_s"], "limit": f"< {P6_MAX_S} s", "met": e["compile_s"] < P6_MAX_S})
    return out


_ROW_TYPES = {"backend": str, "mode": str, "batch_size": int, "seq_len": int, "threshold": (float, int, type(None)),
              "median_ms": (float, int), "p90_ms": (float, int), "mean_exit_layer": (float, int),
              "compile_s": (float, int, type(None))}


def validate(result: Mapping[str, Any]) -> None:
    """Raises BenchmarkError naming the first key that breaks the `bench.json` schema."""
    if not isinstance(result, Mapping):
        raise BenchmarkError(f"bench.json: expected an object, found {type(result).__name__}")
    for key in ("device", "versions", "precision", "rows"):
        if key not in result:
            raise BenchmarkError(f"bench.json: missing key {key!r}")
    if result["precision"] not in PRECISIONS:
        raise BenchmarkError(f"bench.json: 'precision'={result['precision']!r}, expected one of {PRECISIONS}")
    # Files from before JAX's attention was a choice lack the key: they ran "default".
    if result.get("attention", "default") not in ATTENTION_IMPLS:
        raise BenchmarkError(f"bench.json: 'attention'={result['attention']!r}, expected one of {ATTENTION_IMPLS}")
    if not isinstance(result["device"], str) or not result["device"]:
        raise BenchmarkError("bench.json: 'device' must be a non-empty string")
    if not isinstance(result["versions"], Mapping) or not {"jax", "torch"} <= set(result["versions"]):
        raise BenchmarkError("bench.json: 'versions' must map at least 'jax' and 'torch' to versions")
    if not isinstance(result["rows"], list) or not result["rows"]:
        raise BenchmarkError("bench.json: 'rows' must be a non-empty list")
    for i, row in enumerate(result["rows"]):
        for key, types in _ROW_TYPES.items():
            if key not in row:
                raise BenchmarkError(f"bench.json: rows[{i}] lacks {key!r}")
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, types):
                raise BenchmarkError(f"bench.json: rows[{i}].{key}={value!r} has the wrong type")
        if row["backend"] not in BACKENDS:
            raise BenchmarkError(f"bench.json: rows[{i}].backend={row['backend']!r}, expected one of {BACKENDS}")
        if row["mode"] == "early_exit" and row["threshold"] is None:
            raise BenchmarkError(f"bench.json: rows[{i}] is early_exit without a threshold")
        for key in ("median_ms", "p90_ms"):
            if not (math.isfinite(row[key]) and row[key] > 0):
                raise BenchmarkError(f"bench.json: rows[{i}].{key}={row[key]!r} must be a positive time")
        if row["p90_ms"] < row["median_ms"]:
            raise BenchmarkError(f"bench.json: rows[{i}] has p90_ms < median_ms")
        if row["batch_size"] < 1 or row["seq_len"] < 1:
            raise BenchmarkError(f"bench.json: rows[{i}] batch_size and seq_len must be >= 1")


def contention_warning(result: Mapping[str, Any]) -> str | None:
    """A note when other work competed for the cores: eager PyTorch's OpenMP threads spin at
    barriers, so a multi-threaded PyTorch run on a busy machine stalls far more than XLA's pool."""
    loads = [x for key in ("load_average_before", "load_average_after") for x in (result.get(key) or [])[:1]]
    cores = result.get("cpu_cores")
    if not loads or not cores or max(loads) <= cores:
        return None
    busy = f"the 1-minute load average reached {max(loads)} on {cores} cores: other processes competed for the CPU"
    if (result.get("threads") or {}).get("requested") == 1:
        return (busy + "; at one thread per framework no barrier can stall, and the interleaved schedule "
                "spreads the slowdown over both backends, but absolute times are inflated.")
    return (busy + ", which inflates multi-threaded eager PyTorch (OpenMP threads spin at barriers) far "
            "more than XLA; compare backends on a quiet machine or at --threads 1.")


def multithreaded_contention(result: Mapping[str, Any]) -> bool:
    return bool(contention_warning(result)) and (result.get("threads") or {}).get("requested") != 1


def markdown(result: Mapping[str, Any]) -> str:
    """Header, one table row per cell, then the targets."""
    h = result
    th = h.get("threads", {})
    mm = h.get("matmul_gflops", {})
    lines = [
        f"**Device** {h['device']} | **threads** XLA {th.get('xla_cpu')}, torch {th.get('torch')} "
        f"(requested {th.get('requested')}) | **matmul** {mm.get('n')}^3 fp32: JAX {mm.get('jax')} GFLOP/s, "
        f"torch {mm.get('torch')} GFLOP/s | **load average** before {h.get('load_average_before')}, "
        f"after {h.get('load_average_after')}",
        "",
        "**Versions** " + ", ".join(f"{k} {v}" for k, v in h["versions"].items()),
    ]
    if h.get("xla_flags"):
        lines += ["", f"**XLA_FLAGS** `{h['xla_flags']}`"]
    if h.get("incomplete"):
        lines += ["", f"**Incomplete** {h['incomplete']}: the run stopped before its last batch size"]
    warning = contention_warning(h)
    if warning:
        lines += ["", f"**Warning** {warning}"]
    if "model" in h:
        lines += ["", f"**Model** {h['model']} | **inputs** {h.get('inputs', '')} | **runs** {h.get('runs')} "
                      f"per cell, {h.get('schedule', '')} | **precision** {h.get('precision', '')} on both sides | "
                      f"**JAX params** {h.get('jax_params_layout', '')}, {h.get('dtype', '')} | "
                      f"**JAX attention** {h.get('attention', 'default')} | **padding** {h.get('padding', 'pool')} | **command** `{h.get('command', '')}`"]
    lines += ["", "| backend | mode | batch | seq | threshold | median ms | p90 ms | per-example ms | "
                  "mean exit layer | layer saving | wall saving | compile s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, spec: "" if v is None else format(v, spec)
    for r in h["rows"]:
        lines.append(
            f"| {r['backend']} | {r['mode']} | {r['batch_size']} | {r['seq_len']} | {fmt(r['threshold'], 'g')} | "
            f"{r['median_ms']:.2f} | {r['p90_ms']:.2f} | {fmt(r.get('per_example_ms'), '.2f')} | "
            f"{r['mean_exit_layer']:.2f} | {fmt(r.get('layer_saving'), '.1%')} | {fmt(r.get('wall_saving'), '.1%')} | "
            f"{fmt(r['compile_s'], '.2f')} |")
    run_at = {(r["backend"], r["batch_size"]): r["run_at"] for r in h["rows"] if r.get("run_at")}
    if run_at:   # the seq column is the pool's length; these ran at others
        lines += [""] + [f"- {backend}, batch {bs}: {where}" for (backend, bs), where in run_at.items()]
    targets = h.get("targets") or []
    if targets:
        lines += ["", "| target | what | value | limit | met | note |", "|---|---|---|---|---|---|"]
        lines += [f"| {t['target']} | {t['what']} | {t['value']} | {t['limit']} | {'yes' if t['met'] else 'NO'} | "
                  f"{t.get('note', '')} |" for t in targets]
    return "\n".join(lines) + "\n"


def plot(result: Mapping[str, Any], path: str) -> str:
    """Per-example median latency against threshold, one line per backend and batch size.

    Thresholds sit at even spacing (sweeps bunch up near ln 2); each point is labelled with its
    mean exit layer, and dotted lines mark each backend's full forward.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    thresholds = sorted({r["threshold"] for r in rows if r["mode"] == "early_exit"})
    x_of = {t: i for i, t in enumerate(thresholds)}
    batch_sizes = sorted({r["batch_size"] for r in rows})
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = {"jax": "tab:blue", "torch": "tab:orange", "onnxruntime": "tab:green"}
    markers = ["o", "s", "^", "D"]
    for backend in BACKENDS:
        for k, bs in enumerate(batch_sizes):
            ee = sorted((r for r in rows if r["backend"] == backend and r["batch_size"] == bs
                         and r["mode"] == "early_exit"), key=lambda r: r["threshold"])
            if not ee:
                continue
            xs, ys = [x_of[r["threshold"]] for r in ee], [r["per_example_ms"] for r in ee]
            ax.plot(xs, ys, "-", marker=markers[k % len(markers)], color=colors[backend],
                    label=f"{backend} early exit, batch {bs}")
            for x, y, r in zip(xs, ys, ee):
                ax.annotate(f"{r['mean_exit_layer']:.1f}", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=6, color=colors[backend])
            for r in rows:
                if r["backend"] == backend and r["batch_size"] == bs and r["mode"] == "full":
                    ax.axhline(r["per_example_ms"], linestyle=":", color=colors[backend], alpha=0.6,
                               label=f"{backend} full forward, batch {bs}")
    ax.set_xticks(range(len(thresholds)), [f"{t:g}" for t in thresholds])
    ax.set_xlabel("entropy threshold (points labelled with the mean exit layer)")
    ax.set_ylabel("median latency per example (ms)")
    ax.set_yscale("log")
    model = str(result.get("model", "model"))
    model = model if len(model) < 60 else "..." + model[-57:]
    ax.set_title(f"{model}\n{result['device']}, threads {result.get('threads', {}).get('requested', '?')}",
                 fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render(out_json: str) -> dict[str, str]:
    """Re-derives the targets, table and plot of an existing bench.json (timings untouched)."""
    if os.path.isdir(out_json):
        raise BenchmarkError(f"{out_json}: is a directory; --render takes a bench.json file")
    if os.path.splitext(out_json)[1].lower() in (".md", ".png"):   # the table or plot would replace the JSON
        raise BenchmarkError(f"{out_json}: --render takes the bench.json; its .md and .png are written beside it")
    try:
        with open(out_json, encoding="utf-8") as f:
            result = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchmarkError(f"{out_json}: not a bench.json (not valid JSON: {e})") from None
    if not isinstance(result, dict):
        raise BenchmarkError(f"{out_json}: not a bench.json (expected a JSON object, found {type(result).__name__})")
    _precision_of_older_file(result, out_json)
    try:
        validate(result)
    except BenchmarkError as e:   # named by the file the user gave
        raise BenchmarkError(str(e).replace("bench.json: ", f"{out_json}: ", 1)) from None
    result["targets"] = check_targets(result)
    return write_outputs(result, out_json)


def _precision_of_older_file(result: dict, path: str) -> None:
    """A bench.json written before "precision" existed: on a CPU its "dtype" says it all (there is
    no TF32 there); elsewhere the two sides may have run different arithmetic, so it is refused."""
    if not isinstance(result, dict) or "precision" in result:
        return
    rows = result.get("rows") or []
    on_cpu = bool(rows) and all(isinstance(r, Mapping) and r.get("device") == "cpu" for r in rows)
    dtype = result.get("dtype", "float32")
    if not on_cpu or dtype not in ("float32", "bfloat16"):
        raise BenchmarkError(f"{path}: no 'precision' recorded and not a CPU run: its two sides may have used "
                             "different matmul precisions; re-run it with --precision")
    result["precision"] = "fp32" if dtype == "float32" else "bf16"
    result["precision_settings"] = {"name": result["precision"],
                                    "inferred": "from 'dtype' of a CPU run recorded before 'precision' existed"}


def write_outputs(result: dict[str, Any], out_json: str) -> dict[str, str]:
    """Writes bench.json, the markdown table beside it (.md) and the plot (.png)."""
    validate(result)
    stem = os.path.splitext(out_json)[0]
    paths = {"json": out_json, "markdown": stem + ".md", "png": stem + ".png"}
    atomic_write_text(out_json, json.dumps(result, indent=2, allow_nan=False))   # strict JSON
    atomic_write_text(paths["markdown"], markdown(result))
    plot(result, paths["png"])
    return paths


