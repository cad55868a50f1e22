"""Host work per serving-engine step (`train.benchmark_engine_step`): what `serving.engine.Engine.step()`
costs besides the XLA programs it runs.

A step is one layer over one group of rows (`Engine.step`: the scheduler's pick, admitting new
rows on their layer 0, the jitted programs, the answers' callbacks). The engine here holds one
pool (`--length`), threshold 0 (every row runs every layer), and `rows` rows in flight: when the
pool has run dry, `rows` more are submitted, so the steps cycle through layer 0 (admitting
`rows` rows) to layer L - 1 (answering them). Two passes per row count, on the same warm engine:

- **wall**: `steps` calls of `Engine.step()` timed with `time.perf_counter`, nothing else running;
- **program**: `steps` more under the JAX profiler (host tracer on, Python tracer off), each
  step inside a `TraceAnnotation`; the program time of a step is the total of its outermost
  `ThunkExecutor::Execute` events: XLA's CPU runtime running the compiled program's operations,
  on whichever thread it runs them. Everything else inside the step is host work: on an
  accelerator the program runs on the device, and host work is what the engine's thread does
  besides, which a faster device would not shorten.

host work = wall - program. Figures per step kind (layer 0 with its admission, later layers)
are medians; the per-step figure is the mean of the L kinds' medians, the cost of one layer of a
row's path (its L steps). The profiled pass also splits the host work (medians of per-step
figures, so they need not add up exactly): the engine's Python (scheduler, argument building,
reading results, callbacks: the step's time outside its jitted calls) and in_calls (the jitted
calls' time outside the program), itself split into dispatch (JAX's side: argument parsing,
transfers to the device) and runtime (inside PJRT's execution of the program, `EXECUTE_EVENT`,
before its first operation and after its last: XLA's CPU runtime setting up each run; 0 where a
platform's trace has no such event). Tracing adds a little to each; the wall pass has none.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import tempfile
import time
from typing import Callable, Sequence

import numpy as np

PROGRAM_EVENT = "ThunkExecutor::Execute"
CALL_EVENT = "PjitFunction(call)"
EXECUTE_EVENT = "CommonPjRtLoadedExecutable::ExecuteHelperOnSingleDevice"
STEP_EVENT = "engine_step"
DEFAULT_POOL = 64
SPLIT = ("python", "in_calls", "dispatch", "runtime")   # host work inside the profiled steps (`step_breakdown`)


def build_engine(model: str = "tiny", length: int = 16, pool_size: int = DEFAULT_POOL):
    """A warmed-up `Engine` on random weights of `--random-model` shapes, threshold 0 (full depth)."""
    import jax

    from benchmarks.benchmarking import random_model_config
    from deebert_jax.model.modeling import init_params
    from deebert_jax.serving.engine import Engine

    config = random_model_config(model)
    engine = Engine(config, init_params(config, jax.random.PRNGKey(0)), [length], 0.0, "entropy",
                    pool_size=pool_size)
    engine.warm_up()
    return engine


def _row(config, length: int, seed: int = 0):
    from deebert_jax.serving.requests import Row
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, config.vocab_size, size=length).astype(np.int32)
    return Row(ids, np.ones(length, np.int32), np.zeros(length, np.int32), False)


def _stepper(engine, rows: int, length: int) -> Callable[[], int]:
    """-> a call to make before each `Engine.step()`: submits `rows` rows when the pool has run dry
    (outside what is timed) and returns the layer the step will run (they all move together)."""
    row, layer = _row(engine.config, length), [0]
    callbacks = [lambda logits, exit_layer: None] * rows

    def prepare() -> int:
        if not engine.scheduler.has_work():
            engine.submit([row] * rows, callbacks)
            layer[0] = 0
        layer[0] += 1
        return layer[0] - 1
    return prepare


def time_steps(engine, rows: int, length: int, steps: int) -> dict[int, list[float]]:
    """-> {layer: wall microseconds of each `Engine.step()` that ran it}."""
    prepare, walls = _stepper(engine, rows, length), {}
    for _ in range(steps):
        layer = prepare()
        start = time.perf_counter()
        engine.step()
        walls.setdefault(layer, []).append((time.perf_counter() - start) * 1e6)
    return walls


def _events(trace_dir: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"{trace_dir}: no *.trace.json.gz written by the profiler")
    events = []
    for path in paths:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            trace = json.load(f)
        events += [e for e in (trace["traceEvents"] if isinstance(trace, dict) else trace)
                   if e.get("ph") == "X" and "dur" in e]
    return events


def _union(intervals) -> list[tuple[float, float]]:
    """[(start, end)] -> the same time as disjoint sorted intervals."""
    out: list[list[float]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def _length(intervals) -> float:
    return float(sum(hi - lo for lo, hi in intervals))


def _overlap_intervals(a, b) -> list[tuple[float, float]]:
    """The time in both of two disjoint sorted interval lists, as disjoint sorted intervals."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _overlap(a, b) -> float:
    """Time in both of two disjoint sorted interval lists."""
    return _length(_overlap_intervals(a, b))


def step_breakdown(events: list[dict]) -> list[dict]:
    """Trace events -> per annotated step, in order, microseconds: wall; program (the time some
    `PROGRAM_EVENT` ran, on any thread); in_calls (the step's jitted calls on its thread while no
    program ran: parsing arguments, transfers, handing over, waiting for a worker); python (the
    rest: neither a jitted call nor a program); in_calls = dispatch + runtime, runtime the time
    inside PJRT's execution (`EXECUTE_EVENT`, on the step's thread) while no program ran.
    wall = program + in_calls + python."""
    steps = sorted((e for e in events if e["name"] == STEP_EVENT), key=lambda e: e["ts"])
    out = []
    for s in steps:
        lo, hi = s["ts"], s["ts"] + s["dur"]
        clip = lambda es: _union((max(lo, e["ts"]), min(hi, e["ts"] + e["dur"])) for e in es   # noqa: E731
                                 if e["ts"] < hi and e["ts"] + e["dur"] > lo)
        program = clip(e for e in events if e["name"] == PROGRAM_EVENT)
        calls = clip(e for e in events if e["name"] == CALL_EVENT and (e["pid"], e["tid"]) == (s["pid"], s["tid"]))
        executing = clip(e for e in events
                         if e["name"] == EXECUTE_EVENT and (e["pid"], e["tid"]) == (s["pid"], s["tid"]))
        p, c, both = _length(program), _length(calls), _overlap(program, calls)
        runtime = _overlap(executing, calls) - _overlap(executing, _overlap_intervals(program, calls))
        out.append({"wall": float(s["dur"]), "program": p, "in_calls": c - both, "python": s["dur"] - p - c + both,
                    "dispatch": c - both - runtime, "runtime": runtime})
    return out


def profile_steps(engine, rows: int, length: int, steps: int) -> dict[int, list[dict]]:
    """-> {layer: `step_breakdown` of each step that ran it}, `steps` steps under the profiler."""
    import jax

    prepare, layers = _stepper(engine, rows, length), []
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0   # Python function events would dwarf the engine's own host work
    with tempfile.TemporaryDirectory(prefix="deebert_engine_step_") as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=False, profiler_options=options):
            for _ in range(steps):
                layers.append(prepare())
                with jax.profiler.TraceAnnotation(STEP_EVENT):
                    engine.step()
        found = step_breakdown(_events(trace_dir))
    if len(found) != steps:
        raise RuntimeError(f"the trace holds {len(found)} annotated steps, {steps} ran")
    out: dict[int, list[dict]] = {}
    for layer, step in zip(layers, found):
        out.setdefault(layer, []).append(step)
    return out


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"median": round(float(np.median(values)), 1), "p90": round(float(np.percentile(values, 90)), 1)}


def measure(engine, rows: int, length: int, steps: int, warmup: int = 20) -> dict:
    """One row count: the wall pass, then the profiled pass -> the cell of the JSON `rows` list."""
    time_steps(engine, rows, length, warmup)
    walls = time_steps(engine, rows, length, steps)
    profiled = profile_steps(engine, rows, length, steps)
    kinds = {}
    for layer in sorted(walls):
        traced = profiled.get(layer, [])
        program = [t["program"] for t in traced] or [0.0]
        wall, prog = _stats(walls[layer]), _stats(program)
        kinds[str(layer)] = {
            "steps": len(walls[layer]), "wall_us": wall, "program_us": prog,
            "host_us": round(wall["median"] - prog["median"], 1),
            "split_us": {k: _stats([t[k] for t in traced] or [0.0])["median"] for k in SPLIT + ("wall",)}}
    mean = lambda key: round(float(np.mean([k[key]["median"] for k in kinds.values()])), 1)   # noqa: E731
    cell = {"rows": rows, "wall_us": mean("wall_us"), "program_us": mean("program_us"), "by_layer": kinds}
    cell["host_us"] = round(cell["wall_us"] - cell["program_us"], 1)
    cell["split_us"] = {k: round(float(np.mean([v["split_us"][k] for v in kinds.values()])), 1)
                        for k in SPLIT}
    return cell


def run(model: str = "tiny", rows: Sequence[int] = (1, 32), steps: int = 500, length: int = 16,
        pool_size: int = DEFAULT_POOL, progress: Callable[[str], None] | None = None) -> dict:
    """-> the benchmark's JSON (without the command line): environment and one cell per row count."""
    import jax

    from benchmarks.harness import load_average, xla_cpu_threads

    if max(rows) > pool_size:
        raise ValueError(f"--rows {max(rows)} is more than the pool's {pool_size} slots")
    load_before = load_average()
    start = time.perf_counter()
    engine = build_engine(model, length, pool_size)
    compile_s = time.perf_counter() - start
    cells = []
    for n in rows:
        cells.append(measure(engine, n, length, steps))
        if progress:
            progress(f"rows {n}: host {cells[-1]['host_us']} us a step")
    return {"model": model, "num_layers": engine.config.num_hidden_layers, "hidden_size": engine.config.hidden_size,
            "length": length, "pool_size": pool_size, "threshold": 0.0, "steps": steps,
            "bucket_sizes": list(engine.bucket_sizes), "jax": jax.__version__, "device": jax.devices()[0].device_kind,
            "threads": os.environ.get("PJRT_NPROC"), "xla_eigen_threads": xla_cpu_threads(), "warm_up_s": round(compile_s, 2),
            "load_average_before": load_before, "load_average_after": load_average(), "rows": cells}


def table(result: dict) -> str:
    """A short text table of `run`'s result (medians, microseconds a step)."""
    lines = [f"engine step, {result['model']} model ({result['num_layers']} layers, width {result['hidden_size']}), "
             f"length {result['length']}, pool {result['pool_size']}, {result['threads']} threads, "
             f"load average {result['load_average_before']} -> {result['load_average_after']}",
             f"{'rows':>5} {'wall':>8} {'program':>8} {'host':>8} {'python':>8} {'in calls':>8} "
             f"{'dispatch':>8} {'runtime':>8}   "
             "per layer: wall p90 / program / host"]
    for c in result["rows"]:
        per = "; ".join(f"L{int(k) + 1} {v['wall_us']['median']:.0f} p90 {v['wall_us']['p90']:.0f} / "
                        f"{v['program_us']['median']:.0f} / {v['host_us']:.0f}" for k, v in c["by_layer"].items())
        lines.append(f"{c['rows']:>5} {c['wall_us']:>8.0f} {c['program_us']:>8.0f} {c['host_us']:>8.0f} "
                     f"{c['split_us']['python']:>8.0f} {c['split_us']['in_calls']:>8.0f} "
                     f"{c['split_us']['dispatch']:>8.0f} {c['split_us']['runtime']:>8.0f}   {per}")
    return "\n".join(lines) + "\n"
