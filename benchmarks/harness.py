"""The timing harness every benchmark command shares: the machine, the clock, the schedule.

Environment: threads, device, versions and a measured matmul rate, written into every result so
a number can be read against the machine that produced it. Timing: `timed` wraps one call that
blocks until its result is ready; `time_interleaved` runs named calls in turns, so slow drifts in
background load on a shared machine land on all of them alike instead of on whichever ran last;
`run_cells` is the same idea for the latency benchmark's cells (see `Cell`). Statistics:
`Timing` (median, p90, mean, min) and `typical_mean_ms`. Inputs: random token pools and batching.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import time
from typing import Any, Callable, Mapping, Sequence

from deebert_jax.core.errors import DeeBertError

import numpy as np

BACKENDS = ("jax", "torch", "onnxruntime")
DEFAULT_BACKENDS = ("jax", "torch")


class BenchmarkError(DeeBertError, ValueError):
    """Bad benchmark input or a malformed result; the message names the value or key at fault."""


# ----------------------------------------------------------------------------------------------
# Threads, devices, versions, matmul rate

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
    for name in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers", "onnxruntime"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def torch_device_for(jax_platform: str) -> str:
    """Both frameworks on the accelerator when both can reach it, else PyTorch on the CPU."""
    import torch
    if jax_platform == "gpu" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def sync_torch(device: str) -> None:
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
            sync_torch(torch_device)
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
    """Per-call wall times (ms) and, where measured, process CPU times (ms)."""
    times_ms: list[float]
    cpu_ms: list[float] | None = None

    @property
    def median_ms(self) -> float:
        return float(np.median(self.times_ms))

    @property
    def p90_ms(self) -> float:
        return float(np.percentile(self.times_ms, 90))

    @property
    def mean_ms(self) -> float:
        return float(np.mean(self.times_ms))

    @property
    def min_ms(self) -> float:
        """The fastest call (inf when none ran): the least disturbed by other load."""
        return float(min(self.times_ms, default=math.inf))

    @property
    def min_cpu_ms(self) -> float | None:
        return None if self.cpu_ms is None else float(min(self.cpu_ms, default=math.inf))


def timed(call: Callable[[], Any], cpu: bool = False) -> tuple[Any, float, float | None]:
    """One call of `call` (which must block until its result is ready) -> (its result, wall ms,
    process CPU ms or None)."""
    c = time.process_time() if cpu else 0.0
    t0 = time.perf_counter()
    result = call()
    wall = (time.perf_counter() - t0) * 1e3
    return result, wall, ((time.process_time() - c) * 1e3 if cpu else None)


def time_calls(call: Callable[[], Any], runs: int, warmup: int = 3) -> Timing:
    """Times `runs` calls of `call` (which must block until its result is ready) after `warmup`."""
    for _ in range(warmup):
        call()
    return Timing([timed(call)[1] for _ in range(runs)])


def time_interleaved(calls: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 1, *,
                     cpu: bool = False, on_round: Callable[[int], Any] | None = None) -> dict[str, Timing]:
    """Warms every call up `warmup` times (compilation), then runs `rounds` rounds of one call
    each, in turn, so that load from other processes on a shared machine falls on all alike.

    Each call must block until its result is ready. `cpu`: also record process CPU time (steadier
    than wall time on a busy machine). `on_round(r)` runs after round r (progress bars).
    -> {name: Timing} in the order of `calls`.
    """
    for call in calls.values():
        for _ in range(warmup):
            call()
    walls: dict[str, list[float]] = {name: [] for name in calls}
    cpus: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds):
        for name, call in calls.items():
            _, wall, cpu_ms = timed(call, cpu)
            walls[name].append(wall)
            if cpu:
                cpus[name].append(cpu_ms)
        if on_round is not None:
            on_round(r)
    return {name: Timing(walls[name], cpus[name] if cpu else None) for name in calls}


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


def check_input_pool(arrays: Mapping[str, np.ndarray], config) -> int:
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key not in arrays:
            raise BenchmarkError(f"inputs: missing array {key!r}")
    ids = arrays["input_ids"]
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise BenchmarkError(f"inputs: input_ids must be [N, S] with N > 0, got shape {ids.shape}")
    if ids.shape[1] > config.max_sequence_length:
        limit = (config.sequence_limit if config.model_type == "roberta"
                 else f"max_position_embeddings {config.max_position_embeddings}")
        raise BenchmarkError(f"inputs: seq_len {ids.shape[1]} exceeds {limit}")
    if ids.max() >= config.vocab_size or ids.min() < 0:
        raise BenchmarkError(f"inputs: token ids outside [0, {config.vocab_size})")
    return int(ids.shape[0])



# ----------------------------------------------------------------------------------------------
# The cell scheduler

@dataclasses.dataclass
class Cell:
    """One timed configuration: `call(r)` runs batch r, blocks until done, returns exit layers or None."""
    backend: str
    mode: str
    batch_size: int
    threshold: float | None
    call: Callable[[int], Any]
    device: str = "cpu"
    times_ms: list[float] = dataclasses.field(default_factory=list)
    exit_layers: list[np.ndarray] = dataclasses.field(default_factory=list)
    first_call_s: float | None = None
    # Runs whose batch shape is the first of its kind (batches cut to a length class): warmed up
    # before timing, so no compile lands in a timed run.
    warm_runs: tuple[int, ...] = ()


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def run_cells(cells: Sequence[Cell], runs: int, warmup: int, schedule: str, progress=None, chunk: int = 10) -> None:
    """Times `runs` calls of every cell (run r on batch r) into `cell.times_ms` / `cell.exit_layers`.

    "interleaved": backends take turns in blocks of `chunk` rounds, so slow drifts in background
    load hit both; each block opens with one untimed call per cell, so the other framework's idle
    threads and cache contents left behind are not timed. Within a block a round runs every cell
    of the backend once (rotating order), which keeps early exit and the full forward of one
    backend on equal footing. "blocked": each cell's runs back to back.
    """
    if schedule not in ("interleaved", "blocked"):
        raise BenchmarkError(f"schedule {schedule!r}: expected 'interleaved' or 'blocked'")
    # Warm-up: the first call of a JAX cell compiles; it is timed apart from the runs.
    for cell in cells:
        cell.first_call_s = timed(lambda: cell.call(0))[1] / 1e3
        for w in range(1, warmup):
            cell.call(w % runs)
        for r in cell.warm_runs:
            cell.call(r)

    def one(cell, r):
        exit_layer, wall, _ = timed(lambda: cell.call(r))
        cell.times_ms.append(wall)
        if exit_layer is not None:
            cell.exit_layers.append(_to_numpy(exit_layer))
        if progress is not None:
            progress.update(1)

    if schedule == "blocked":
        for cell in cells:
            for r in range(runs):
                one(cell, r)
        return
    groups = [g for g in ([c for c in cells if c.backend == b] for b in BACKENDS) if g]
    for start in range(0, runs, chunk):
        for group in groups:
            for cell in group:
                cell.call(start)
            for r in range(start, min(start + chunk, runs)):
                shift = r % len(group)
                for cell in group[shift:] + group[:shift]:
                    one(cell, r)



# ----------------------------------------------------------------------------------------------
# Statistics

def typical_mean_ms(times_ms: Sequence[float], layers_run: Sequence[int]) -> float:
    """Mean cost over the runs, robust to load spikes: runs are grouped by how many layers the
    loop ran (which sets a run's cost), each group contributes its median, weighted by its size.

    On a quiet machine it is close to the plain mean; on a shared one a single stalled run no longer
    moves it.
    """
    times, groups = np.asarray(times_ms, float), np.asarray(layers_run)
    return float(sum(np.median(times[groups == g]) * np.mean(groups == g) for g in np.unique(groups)))

