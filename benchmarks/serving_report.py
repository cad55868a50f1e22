"""The serving benchmark's report: the markdown table with its capacities and targets, and the
latency-against-load plot, beside the JSON (`benchmarks.serving.run`'s result)."""

from __future__ import annotations

import json
import os

def markdown(result: dict, command: str) -> str:
    env = result["environment"]
    lines = [f"```bash\n{command}\n```", "",
             f"Model `{result['model']}` ({result['layers']} layers), {result['threshold_note']}; JAX servers' "
             f"schedule: {result.get('schedule') or 'the default'}; one SST-2 dev "
             f"sentence per request, max length {result['max_seq_length']}; {result['duration_s']:g} s per rate "
             f"(at most {result['max_requests']} requests); SLO: p99 <= {result['slo_p99_ms']:g} ms, no errors. "
             f"{env['device']}; threads: {env['threads']}; load average before: {env['load_average_before']}, "
             f"after: {result.get('load_average_after')}.", "",
             "| offered req/s | mode | achieved req/s | p50 ms | p90 ms | p99 ms | errors | mean exit layer | "
             "accuracy | same as train.predict | load avg (1 min) before | load generator's cores |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    # By offered rate, the modes side by side (a mode's rows stop where it saturated; the 60% point
    # is measured last but belongs with its rate).
    modes = list(result["modes"])
    order = [(r["offered_rps"], modes.index(mode), i, mode, r) for mode, m in result["modes"].items()
             for i, r in enumerate(m["rows"])]
    for *_, mode, r in sorted(order, key=lambda x: x[:3]):
        load = r.get("load_average_before")
        lines.append(f"| {r['offered_rps']:g} | {result['modes'][mode]['name']} | {r['achieved_rps']:g} | "
                     f"{r['p50_ms']:g} | {r['p90_ms']:g} | {r['p99_ms']:g} | {r['errors']} | {r['mean_exit_layer']} | "
                     f"{r['accuracy']} | {r.get('same_as_predict')} | {load[0] if load else ''} | "
                     f"{r.get('loadgen_cores', '')} |")
    lines.append("")
    t = result["targets"]
    caps = ", ".join(f"{result['modes'][m]['name']}: {c} req/s" for m, c in t["capacity_rps"].items())
    lines.append(f"Capacity (highest offered rate with p99 <= {result['slo_p99_ms']:g} ms and no errors"
                 + (f"; the median of {result['repeats']} repeats of the sweep" if result.get("repeats", 1) > 1 else "")
                 + f"): {caps}.")
    spread = [_capacity_line(m["name"], m["capacity"]) for m in result["modes"].values() if m.get("capacity")]
    if spread:
        lines += ["", "| mode | capacity req/s (min-max) | interpolated req/s (min-max) | saturation req/s (min-max) |",
                  "|---|---|---|---|", *spread, ""]
    if "early_exit_vs_full_depth" in t:
        x = t["early_exit_vs_full_depth"]
        lines.append(f"- early exit / full depth capacity: {x['ratio']}x (layer saving {t['layer_saving']:.1%}; "
                     f"ideal {x['ideal']}x, target >= {x['target']}x: {'met' if x['ratio'] >= x['target'] else 'missed'})")
    for key, baseline in (("early_exit_vs_torch", "eager PyTorch"), ("early_exit_vs_onnxruntime", "ONNX Runtime")):
        if key in t:
            x = t[key]
            lines.append(f"- early exit / {baseline} capacity: {x['ratio']}x (target >= {x['target']:g}x: "
                         f"{'met' if x['ratio'] >= x['target'] else 'missed'})")
    if "shadow_cost" in t:
        x = t["shadow_cost"]
        lines.append(f"- capacity shadowing costs (early exit against early exit without shadow rows): {x['share']:.1%} "
                     f"(target <= {x['target']:.0%}: {'met' if x['share'] <= x['target'] else 'missed'})")
    if "median_at_60_percent" in t:
        x = t["median_at_60_percent"]
        lines.append(f"- median latency at {x['rate_rps']:g} req/s (60% of the full-depth capacity): early exit "
                     f"{x['early_exit_p50_ms']:g} ms vs full depth {x['full_depth_p50_ms']:g} ms = {x['ratio']}x "
                     f"(target <= 0.7x: {'met' if x['ratio'] <= 0.7 else 'missed'})")
    if t.get("early_exit_same_as_predict", {}).get("min") is not None:
        lines.append(f"- answers identical to train.predict's (label and exit layer), worst rate: "
                     f"{t['early_exit_same_as_predict']['min']:.2%}")
    return "\n".join(lines) + "\n"


def _capacity_line(name: str, capacity: dict) -> str:
    def cell(stat):
        if not stat:
            return "-"
        return f"{stat['median']:g} ({stat['min']:g}-{stat['max']:g})" if stat["min"] != stat["max"] else f"{stat['median']:g}"
    return (f"| {name} | {cell(capacity['capacity_rps'])} | {cell(capacity['interpolated_capacity_rps'])} | "
            f"{cell(capacity['saturation_rps'])} |")


def plot(result: dict, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, m in result["modes"].items():
        rows = sorted((r for r in m["rows"] if r["errors"] == 0 or r["achieved_rps"]), key=lambda r: r["offered_rps"])
        x = [r["offered_rps"] for r in rows]
        line, = ax.plot(x, [r["p99_ms"] for r in rows], marker="o", label=f"{m['name']}: p99")
        ax.plot(x, [r["p50_ms"] for r in rows], marker=".", linestyle="--", color=line.get_color(), label=f"{m['name']}: p50")
    ax.axhline(result["slo_p99_ms"], color="grey", linewidth=0.8, linestyle=":", label=f"SLO {result['slo_p99_ms']:g} ms")
    ax.set_xlabel("offered load (requests/s, Poisson)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title(f"{os.path.basename(result['model'])}: latency against load")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(result: dict, out_json: str, command: str) -> dict[str, str]:
    """JSON, markdown (`.md`) and plot (`.png`) beside each other -> their paths."""
    from deebert_jax.core.fileutil import atomic_write_text
    base = os.path.splitext(out_json)[0]
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    result = dict(result, command=command)
    paths = {"json": atomic_write_text(out_json, json.dumps(result, indent=2) + "\n"),
             "markdown": atomic_write_text(base + ".md", markdown(result, command)),
             "plot": plot(result, base + ".png")}
    return paths
