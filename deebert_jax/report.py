"""Summaries that join an evaluation sweep (`results.json`) with a latency run (`bench.json`)."""

from __future__ import annotations

from typing import Any, Mapping


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
    full = [(b, _bench_row(bench, b, "full", batch_size)) for b in ("jax", "torch")]
    if any(row for _, row in full):
        lines.append("full-depth forward: " + ", ".join(
            f"{b} {row['median_ms']:.2f} ms" for b, row in full if row))
    return "\n".join(lines)
