"""Latency benchmark: the same weights and the same inputs through JAX/XLA and eager PyTorch.

Cells are (backend, mode, batch size, threshold). Every cell runs the same sequence of batches
(run r uses batch r of the input pool), after its own warm-up. By default the cells are
*interleaved* (see `_run_cells`): backends alternate in blocks of rounds and a round runs every
cell of a backend once, so background load on a shared machine lands on every cell alike
instead of on whichever ran last. Times are wall-clock around a call that ends in `block_until_ready` (JAX) or returns host
data / `torch.cuda.synchronize()` (PyTorch). JAX compile time is the first call minus the
steady-state median, reported separately and never mixed into the run times.

`bench.json`: `{"device", "versions", "rows": [...]}` plus a header (threads, matmul rate,
model, inputs) and the targets of issue 5 checked from the rows; `validate` checks the schema.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

ROW_KEYS = ("backend", "mode", "batch_size", "seq_len", "threshold", "median_ms", "p90_ms",
            "mean_exit_layer", "compile_s")
BACKENDS = ("jax", "torch")
MODES = ("full", "early_exit")
DEFAULT_THRESHOLDS = (0.0, 0.01, 0.1, 0.3, 0.5, 0.7)
MIN_RUNS = 30
RANDOM_MODELS = ("bert-base", "minilm", "tiny")

# Issue 5 targets, checked (not asserted) from a run's rows.
P1_CPU, P1_GPU, P2_MAX, P3_MIN, P6_MAX_S = 0.7, 0.3, 1.05, 0.9, 10.0


class BenchmarkError(ValueError):
    """Bad benchmark input or a malformed result; the message names the value or key at fault."""


# ----------------------------------------------------------------------------------------------
# Threads, devices, versions, matmul rate

def set_thread_env(threads: int) -> None:
    """XLA's CPU intra-op pool reads PJRT_NPROC when its client starts: call before JAX runs anything."""
    if threads < 1:
        raise BenchmarkError(f"--threads={threads}: must be >= 1")
    os.environ["PJRT_NPROC"] = str(threads)
    os.environ["NPROC"] = str(threads)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def xla_cpu_threads() -> int | None:
    """Threads in XLA's CPU Eigen pool, counted from /proc (Linux), None where unknown."""
    task_dir = "/proc/self/task"
    if not os.path.isdir(task_dir):
        return None
    count = 0
    for tid in os.listdir(task_dir):
        with contextlib.suppress(OSError):
            with open(os.path.join(task_dir, tid, "comm")) as f:
                count += f.read().strip() == "tf_XLAEigen"
    return count or None


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def torch_device_for(jax_platform: str) -> str:
    """Both frameworks on the accelerator when both can reach it, else PyTorch on the CPU."""
    import torch
    if jax_platform == "gpu" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _sync_torch(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def matmul_gflops(backend: str, n: int = 1024, runs: int = 10, torch_device: str = "cpu") -> float:
    """Measured float32 [n, n] @ [n, n] rate, GFLOP/s (median of `runs`)."""
    if backend == "jax":
        import jax
        import jax.numpy as jnp
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
        f = jax.jit(lambda x: x @ x)
        call = lambda: f(a).block_until_ready()
    elif backend == "torch":
        import torch
        a = torch.randn(n, n, device=torch_device)
        def call():
            with torch.inference_mode():
                a @ a
            _sync_torch(torch_device)
    else:
        raise BenchmarkError(f"backend {backend!r}: expected one of {BACKENDS}")
    stats = time_calls(call, runs=runs, warmup=2)
    return 2.0 * n ** 3 / (stats.median_ms * 1e-3) / 1e9


def environment(threads: int, torch_device: str, probe_n: int | None = None) -> dict[str, Any]:
    """The header: device, thread counts, versions and measured matmul rates."""
    import jax
    import torch
    dev = jax.devices()[0]
    platform_name = dev.platform
    if platform_name == "cpu":
        device = f"cpu: {cpu_model()}, {available_cpus()} cores available"
    else:
        device = f"{platform_name}: {getattr(dev, 'device_kind', str(dev))}"
    n = probe_n or (1024 if platform_name == "cpu" else 4096)
    return {
        "device": device,
        "versions": versions(),
        "jax_platform": platform_name,
        "cpu_cores": available_cpus(),
        "torch_device": torch_device,
        "threads": {"requested": threads, "xla_cpu": xla_cpu_threads(), "torch": torch.get_num_threads()},
        "matmul_gflops": {"n": n, "dtype": "float32",
                          "jax": round(matmul_gflops("jax", n), 1),
                          "torch": round(matmul_gflops("torch", n, torch_device=torch_device), 1)},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average_before": load_average(),
    }


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on a shared machine shows up here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# ----------------------------------------------------------------------------------------------
# Timing

@dataclasses.dataclass
class Timing:
    times_ms: list[float]

    @property
    def median_ms(self) -> float:
        return float(np.median(self.times_ms))

    @property
    def p90_ms(self) -> float:
        return float(np.percentile(self.times_ms, 90))

    @property
    def mean_ms(self) -> float:
        return float(np.mean(self.times_ms))


def time_calls(call: Callable[[], Any], runs: int, warmup: int = 3) -> Timing:
    """Times `runs` calls of `call` (which must block until its result is ready) after `warmup`."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(times)


# ----------------------------------------------------------------------------------------------
# Inputs

def random_inputs(vocab_size: int, n: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n full-length rows of random token ids (no padding) [n, seq_len] int32."""
    rng = np.random.default_rng(seed)
    low = 1000 if vocab_size > 2000 else 1  # skip BERT's special and unused ids where there are any
    ids = rng.integers(low, vocab_size, size=(n, seq_len)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def batch_rows(n_examples: int, batch_size: int, index: int) -> np.ndarray:
    """Rows of batch `index`: the pool read in order, wrapping around."""
    return (index * batch_size + np.arange(batch_size)) % n_examples


def check_inputs(arrays: Mapping[str, np.ndarray], config) -> int:
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key not in arrays:
            raise BenchmarkError(f"inputs: missing array {key!r}")
    ids = arrays["input_ids"]
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise BenchmarkError(f"inputs: input_ids must be [N, S] with N > 0, got shape {ids.shape}")
    if ids.shape[1] > config.max_position_embeddings:
        raise BenchmarkError(f"inputs: seq_len {ids.shape[1]} exceeds max_position_embeddings "
                             f"{config.max_position_embeddings}")
    if ids.max() >= config.vocab_size or ids.min() < 0:
        raise BenchmarkError(f"inputs: token ids outside [0, {config.vocab_size})")
    return int(ids.shape[0])


# ----------------------------------------------------------------------------------------------
# Cells

@dataclasses.dataclass
class Cell:
    backend: str
    mode: str
    batch_size: int
    threshold: float | None
    call: Callable[[int], Any]              # batch index -> blocks until done, returns exit layers or None
    device: str = "cpu"
    times_ms: list[float] = dataclasses.field(default_factory=list)
    exit_layers: list[np.ndarray] = dataclasses.field(default_factory=list)
    first_call_s: float | None = None


def _jax_cells(config, params, batches, thresholds, rule, dtype, device, stacked_params=None,
               exit_aware: bool = False) -> list[Cell]:
    import jax
    from deebert_jax import modeling
    from deebert_jax.early_exit import early_exit_predict
    from deebert_jax.exit_aware import exit_aware_predict

    full = jax.jit(modeling.forward, static_argnums=(0,), static_argnames=("dtype",))

    def full_call(params):
        def call(r):
            b = batches[r]
            full(config, params, b["input_ids"], b["attention_mask"], b["token_type_ids"], dtype=dtype).block_until_ready()
        return call

    def exit_call(params, threshold, predict=early_exit_predict):
        def call(r):
            b = batches[r]
            res = predict(config, params, b["input_ids"], b["attention_mask"], b["token_type_ids"],
                          threshold, rule=rule, dtype=dtype)
            jax.block_until_ready(res)
            return res.exit_layer
        return call

    bs = int(batches[0]["input_ids"].shape[0])
    cells = [Cell("jax", "full", bs, None, full_call(params), device)]
    cells += [Cell("jax", "early_exit", bs, float(t), exit_call(params, float(t)), device) for t in thresholds]
    if exit_aware:
        cells += [Cell("jax", "exit_aware", bs, float(t), exit_call(params, float(t), exit_aware_predict), device)
                  for t in thresholds]
    if stacked_params is not None:
        # Ablation: the same functions on the stacked (training) layout.
        cells += [Cell("jax", "full_stacked", bs, None, full_call(stacked_params), device),
                  Cell("jax", "early_exit_stacked", bs, 0.0, exit_call(stacked_params, 0.0), device)]
    return cells


def _torch_cells(model, batches, thresholds, device) -> list[Cell]:
    import torch

    def full_call(r):
        b = batches[r]
        with torch.inference_mode():
            model.full_forward(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        _sync_torch(device)

    def exit_call(threshold):
        def call(r):
            b = batches[r]
            with torch.inference_mode():
                _, exit_layer = model.early_exit(b["input_ids"], b["attention_mask"], b["token_type_ids"],
                                                 threshold=threshold)
            _sync_torch(device)
            return exit_layer
        return call

    bs = int(batches[0]["input_ids"].shape[0])
    cells = [Cell("torch", "full", bs, None, full_call, device)]
    cells += [Cell("torch", "early_exit", bs, float(t), exit_call(float(t)), device) for t in thresholds]
    return cells


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _run_cells(cells: list[Cell], runs: int, warmup: int, schedule: str, progress, chunk: int = 10) -> None:
    # Warm-up: the first call of a JAX cell compiles; it is timed apart from the runs.
    for cell in cells:
        t0 = time.perf_counter()
        cell.call(0)
        cell.first_call_s = time.perf_counter() - t0
        for w in range(1, warmup):
            cell.call(w % runs)

    def one(cell, r):
        t0 = time.perf_counter()
        exit_layer = cell.call(r)
        cell.times_ms.append((time.perf_counter() - t0) * 1e3)
        if exit_layer is not None:
            cell.exit_layers.append(_to_numpy(exit_layer))
        progress.update(1)

    if schedule == "interleaved":
        # Backends take turns in blocks of `chunk` rounds, so slow drifts in background load hit
        # both; each block opens with one untimed call per cell, so the other framework's idle
        # threads and cache contents left behind are not timed. Within a block a round runs
        # every cell of the backend once (rotating order), which keeps early exit and the full
        # forward of one backend on equal footing.
        groups = [[c for c in cells if c.backend == b] for b in BACKENDS]
        groups = [g for g in groups if g]
        for start in range(0, runs, chunk):
            for group in groups:
                for cell in group:
                    cell.call(start)
                for r in range(start, min(start + chunk, runs)):
                    shift = r % len(group)
                    for cell in group[shift:] + group[:shift]:
                        one(cell, r)
    elif schedule == "blocked":
        for cell in cells:
            for r in range(runs):
                one(cell, r)
    else:
        raise BenchmarkError(f"schedule {schedule!r}: expected 'interleaved' or 'blocked'")


@dataclasses.dataclass
class BenchmarkSpec:
    batch_sizes: Sequence[int] = (1, 32)
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS
    runs: int = MIN_RUNS
    warmup: int = 3
    rule: str = "entropy"
    schedule: str = "interleaved"
    dtype: str = "float32"
    backends: Sequence[str] = BACKENDS
    # JAX params as served: "unstacked" (`modeling.unstack_params`, once, before timing) or the
    # stacked training layout.
    layout: str = "unstacked"
    # Also time JAX on the stacked layout (modes full_stacked, early_exit_stacked at threshold 0).
    ablation: bool = False
    # Also time JAX exit-aware batching (mode exit_aware, one row per threshold).
    exit_aware: bool = False

    def check(self) -> None:
        if self.runs < 1:
            raise BenchmarkError(f"runs={self.runs}: must be >= 1 (>= {MIN_RUNS} for reported numbers)")
        if self.warmup < 1:
            raise BenchmarkError(f"warmup={self.warmup}: must be >= 1 (the first call compiles)")
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise BenchmarkError(f"batch_sizes={list(self.batch_sizes)}: need positive integers")
        for t in self.thresholds:
            if not math.isfinite(float(t)) or float(t) < 0:
                raise BenchmarkError(f"threshold {t!r}: must be a finite number >= 0")
        unknown = sorted(set(self.backends) - set(BACKENDS))
        if unknown or not self.backends:
            raise BenchmarkError(f"backends={list(self.backends)}: expected a subset of {BACKENDS}")
        if self.dtype not in ("float32", "bfloat16"):
            raise BenchmarkError(f"dtype={self.dtype!r}: expected 'float32' or 'bfloat16'")
        if self.layout not in ("unstacked", "stacked"):
            raise BenchmarkError(f"layout={self.layout!r}: expected 'unstacked' or 'stacked'")
        if self.rule != "entropy" and "torch" in self.backends:
            raise BenchmarkError(f"rule={self.rule!r}: the PyTorch reference implements only 'entropy'")


def run_benchmark(config, params, arrays: Mapping[str, np.ndarray], spec: BenchmarkSpec, *,
                  torch_model=None, torch_device: str = "cpu", show_progress: bool = True) -> list[dict]:
    """Times every cell of `spec` on `arrays` (the input pool) -> rows (see the module docstring)."""
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm
    from deebert_jax import modeling

    spec.check()
    n = check_inputs(arrays, config)
    if "torch" in spec.backends and torch_model is None:
        raise BenchmarkError("torch backend requested but no torch model given")
    jax_dtype = jnp.bfloat16 if spec.dtype == "bfloat16" else jnp.float32
    stacked = jax.device_put(modeling.stack_params(params)) if spec.ablation else None
    if spec.layout == "unstacked":
        params = modeling.unstack_params(params)
    params = jax.device_put(params)
    jax_device = jax.devices()[0].platform
    seq_len = int(arrays["input_ids"].shape[1])
    L = config.num_hidden_layers
    rows: list[dict] = []
    per_batch_size = len(spec.backends) * (1 + len(spec.thresholds)) + (2 if spec.ablation and "jax" in spec.backends else 0)
    per_batch_size += len(spec.thresholds) if spec.exit_aware and "jax" in spec.backends else 0
    total = per_batch_size * len(spec.batch_sizes) * spec.runs
    progress = tqdm(total=total, desc="benchmark", unit="call", disable=not show_progress)
    for bs in spec.batch_sizes:
        bs = int(bs)
        index = [batch_rows(n, bs, r) for r in range(spec.runs)]
        cells: list[Cell] = []
        if "jax" in spec.backends:
            jbatches = [{k: jax.device_put(np.ascontiguousarray(arrays[k][rows_])) for k in
                         ("input_ids", "attention_mask", "token_type_ids")} for rows_ in index]
            cells += _jax_cells(config, params, jbatches, spec.thresholds, spec.rule, jax_dtype, jax_device, stacked,
                                spec.exit_aware)
        if "torch" in spec.backends:
            import torch
            tbatches = [{k: torch.from_numpy(np.ascontiguousarray(arrays[k][rows_])).long().to(torch_device)
                         for k in ("input_ids", "attention_mask", "token_type_ids")} for rows_ in index]
            cells += _torch_cells(torch_model, tbatches, spec.thresholds, torch_device)
        _run_cells(cells, spec.runs, spec.warmup, spec.schedule, progress)
        valid = [arrays["attention_mask"][rows_].sum(-1) > 0 for rows_ in index]
        rows += _rows_for(cells, valid, seq_len, L)
    progress.close()
    return rows


def typical_mean_ms(times_ms: Sequence[float], layers_run: Sequence[int]) -> float:
    """Mean cost over the runs, robust to load spikes: runs are grouped by how many layers the
    loop ran (which sets a run's cost), each group contributes its median, weighted by its size.

    On a quiet machine it is close to the plain mean; on a shared one a single stalled run no longer
    moves it.
    """
    times, groups = np.asarray(times_ms, float), np.asarray(layers_run)
    return float(sum(np.median(times[groups == g]) * np.mean(groups == g) for g in np.unique(groups)))


def _rows_for(cells: list[Cell], valid: list[np.ndarray], seq_len: int, L: int) -> list[dict]:
    rows = []
    ee_compile: dict[str, float] = {}
    for cell in cells:
        t = Timing(cell.times_ms)
        compile_s = None
        if cell.backend == "jax":
            # One compiled predictor serves every threshold (it is traced), so its compile is the
            # first early-exit cell's first call; later thresholds reuse it.
            key = cell.mode
            if key not in ee_compile:
                ee_compile[key] = max(0.0, cell.first_call_s - t.median_ms / 1e3)
            compile_s = round(ee_compile[key], 3)
        if cell.exit_layers:
            layers = np.concatenate([e[v] for e, v in zip(cell.exit_layers, valid)])
            mean_exit = float(layers.mean())
            histogram = np.bincount(layers.astype(int), minlength=L + 1)[1:L + 1].tolist()
            layers_run = [int(e[v].max()) if v.any() else 0 for e, v in zip(cell.exit_layers, valid)]
        else:
            mean_exit = float(L)
            histogram = None
            layers_run = [L] * len(cell.times_ms)
        rows.append({
            "backend": cell.backend, "mode": cell.mode, "batch_size": cell.batch_size, "seq_len": seq_len,
            "threshold": cell.threshold, "median_ms": round(t.median_ms, 4), "p90_ms": round(t.p90_ms, 4),
            "mean_exit_layer": round(mean_exit, 4), "compile_s": compile_s,
            "mean_ms": round(t.mean_ms, 4), "per_example_ms": round(t.median_ms / cell.batch_size, 4),
            "runs": len(cell.times_ms), "device": cell.device,
            "layer_saving": round(1.0 - mean_exit / L, 4),
            "typical_mean_ms": round(typical_mean_ms(cell.times_ms, layers_run), 4),
            "exit_histogram": histogram,   # examples leaving at layers 1..L, over all runs
        })
        rows[-1]["_exit_layers"] = cell.exit_layers
    # Realized wall-clock saving against the same backend's full forward over the same batches:
    # a ratio of mean times (a saving is about total time), each mean taken robustly (see
    # `typical_mean_ms`); the raw ratio of means is kept beside it.
    for row in rows:
        full = next(r for r in rows if r["backend"] == row["backend"] and r["mode"] == "full")
        row["wall_saving"] = round(1.0 - row["typical_mean_ms"] / full["typical_mean_ms"], 4)
        row["wall_saving_raw_mean"] = round(1.0 - row["mean_ms"] / full["mean_ms"], 4)
    # Same weights, same inputs: do the two backends send each example out at the same layer?
    for row in rows:
        if row["backend"] == "jax" and row["mode"] == "early_exit":
            twin = next((r for r in rows if r["backend"] == "torch" and r["mode"] == "early_exit"
                         and r["threshold"] == row["threshold"]), None)
            if twin is not None and twin["_exit_layers"]:
                a = np.concatenate([e[v] for e, v in zip(row["_exit_layers"], valid)])
                b = np.concatenate([e[v] for e, v in zip(twin["_exit_layers"], valid)])
                row["exit_agreement"] = round(float(np.mean(a == b)), 4)
    for row in rows:
        row.pop("_exit_layers")
    return rows


# ----------------------------------------------------------------------------------------------
# Targets, schema, outputs

def check_targets(result: Mapping[str, Any]) -> list[dict]:
    """Issue 5's targets P1, P2, P3, P6 evaluated on the rows (a report, not an assertion)."""
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
    if multithreaded_contention(result):
        for t in out:
            if t["target"] in ("P1",):
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
    for key in ("device", "versions", "rows"):
        if key not in result:
            raise BenchmarkError(f"bench.json: missing key {key!r}")
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
    warning = contention_warning(h)
    if warning:
        lines += ["", f"**Warning** {warning}"]
    if "model" in h:
        lines += ["", f"**Model** {h['model']} | **inputs** {h.get('inputs', '')} | **runs** {h.get('runs')} "
                      f"per cell, {h.get('schedule', '')} | **JAX params** {h.get('jax_params_layout', '')}, {h.get('dtype', '')} | **command** `{h.get('command', '')}`"]
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
    colors = {"jax": "tab:blue", "torch": "tab:orange"}
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
    with open(out_json, encoding="utf-8") as f:
        result = json.load(f)
    validate(result)
    result["targets"] = check_targets(result)
    return write_outputs(result, out_json)


def write_outputs(result: dict[str, Any], out_json: str) -> dict[str, str]:
    """Writes bench.json, the markdown table beside it (.md) and the plot (.png)."""
    validate(result)
    directory = os.path.dirname(os.path.abspath(out_json))
    os.makedirs(directory, exist_ok=True)
    stem = os.path.splitext(out_json)[0]
    paths = {"json": out_json, "markdown": stem + ".md", "png": stem + ".png"}
    tmp = out_json + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, out_json)
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(markdown(result))
    plot(result, paths["png"])
    return paths


# ----------------------------------------------------------------------------------------------
# Models

def random_model_config(name: str, num_labels: int = 2):
    """Shapes of a named model, for weights-free runs."""
    from deebert_jax.config import DeeBertConfig, tiny_config
    if name == "bert-base":
        return DeeBertConfig(num_labels=num_labels)
    if name == "minilm":
        return DeeBertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                             intermediate_size=1536, num_labels=num_labels)
    if name == "tiny":
        return tiny_config(num_labels=num_labels)
    raise BenchmarkError(f"--random-model {name!r}: expected one of {RANDOM_MODELS}")


def torch_twin(config, params, directory: str, device: str = "cpu", dtype: str = "float32"):
    """The same weights as an eager PyTorch DeeBERT: exported to `directory`, loaded strictly."""
    import torch
    from deebert_jax.convert import export_pytorch_checkpoint
    from deebert_jax.torch_reference import TorchDeeBert
    export_pytorch_checkpoint(config, params, directory)
    model = TorchDeeBert.from_pretrained(directory).to(device)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    return model.eval()
