"""Latency benchmark: the same weights and the same inputs through JAX/XLA and eager PyTorch.

Cells are (backend, mode, batch size, threshold). Every cell runs the same sequence of batches
(run r uses batch r of the input pool), after its own warm-up, on the harness's cell scheduler
(`bench_harness.run_cells`: by default interleaved, so background load on a shared machine lands
on every cell alike). Times are wall-clock around a call that ends in `block_until_ready` (JAX)
or returns host data / `torch.cuda.synchronize()` (PyTorch). JAX compile time is the first call
minus the steady-state median, reported separately and never mixed into the run times.

`run_benchmark` -> the rows of `bench.json`; `bench.report` checks, tabulates and plots them.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Callable, Mapping, Sequence

import numpy as np

from deebert_jax.data.lengths import SPACINGS, length_classes, padded_length
from benchmarks.harness import (BACKENDS, DEFAULT_BACKENDS, BenchmarkError, Cell, Timing, batch_rows, check_input_pool, run_cells,
                                      sync_torch, typical_mean_ms)

MODES = ("full", "early_exit")
# "own": each batch at its longest row, as ONNX Runtime runs: one compile per length, a diagnostic
# of what padding costs rather than how anyone serves.
PADDINGS = ("pool",) + SPACINGS + ("own",)
DEFAULT_THRESHOLDS = (0.0, 0.01, 0.1, 0.3, 0.5, 0.7)
MIN_RUNS = 30
RANDOM_MODELS = ("bert-base", "minilm", "tiny", "roberta-base")


def _jax_cells(config, params, batches, thresholds, rule, dtype, device, stacked_params=None,
               exit_aware: bool = False, attention: str = "default") -> list[Cell]:
    import jax
    from deebert_jax.model import inference_step
    from deebert_jax.inference.early_exit import early_exit_predict
    from deebert_jax.inference.exit_aware import exit_aware_predict

    full = jax.jit(inference_step.forward, static_argnums=(0,), static_argnames=("dtype", "attention_impl"))

    def full_call(params):
        def call(r):
            b = batches[r]
            full(config, params, b["input_ids"], b["attention_mask"], b["token_type_ids"], dtype=dtype,
                 attention_impl=attention).block_until_ready()
        return call

    def exit_call(params, threshold, predict=early_exit_predict):
        def call(r):
            b = batches[r]
            # The pool was checked once (`run_benchmark`): the timed call is the predictor alone.
            res = predict(config, params, b["input_ids"], b["attention_mask"], b["token_type_ids"],
                          threshold, rule=rule, dtype=dtype, validate_inputs=False, attention_impl=attention)
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
        sync_torch(device)

    def exit_call(threshold):
        def call(r):
            b = batches[r]
            with torch.inference_mode():
                _, exit_layer = model.early_exit(b["input_ids"], b["attention_mask"], b["token_type_ids"],
                                                 threshold=threshold)
            sync_torch(device)
            return exit_layer
        return call

    bs = int(batches[0]["input_ids"].shape[0])
    cells = [Cell("torch", "full", bs, None, full_call, device)]
    cells += [Cell("torch", "early_exit", bs, float(t), exit_call(float(t)), device) for t in thresholds]
    return cells


def _onnx_cells(onnx_session, batches, device) -> list[Cell]:
    def full_call(r):
        onnx_session.run(None, batches[r])

    cell = Cell("onnxruntime", "full", int(batches[0]["input_ids"].shape[0]), None, full_call, device)
    cell.call_lengths = [int(b["input_ids"].shape[1]) for b in batches]
    return [cell]


@dataclasses.dataclass
class BenchmarkSpec:
    batch_sizes: Sequence[int] = (1, 32)
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS
    runs: int = MIN_RUNS
    warmup: int = 3
    rule: str = "entropy"
    schedule: str = "interleaved"
    dtype: str = "float32"
    backends: Sequence[str] = DEFAULT_BACKENDS
    # JAX params as served: "unstacked" (`layouts.unstack_params`, once, before timing) or the
    # stacked training layout.
    layout: str = "unstacked"
    # Also time JAX on the stacked layout (modes full_stacked, early_exit_stacked at threshold 0).
    ablation: bool = False
    # Also time JAX exit-aware batching (mode exit_aware, one row per threshold).
    exit_aware: bool = False
    # JAX's self-attention core (`attention.ATTENTION_IMPLS`): "default", or `jax.nn.dot_product_attention`
    # with XLA's choice ("dot_product_attention") or cuDNN's fused kernel ("cudnn"). PyTorch is unchanged.
    attention: str = "default"
    # What JAX and PyTorch run each batch at: "pool" (the pool's padded length, every batch alike)
    # or its longest row padded to a length class (`data.lengths.SPACINGS`), as the server pads.
    # ONNX Runtime runs each batch at its own length whatever this says.
    padding: str = "pool"

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
        if self.padding not in PADDINGS:
            raise BenchmarkError(f"padding={self.padding!r}: expected one of {PADDINGS}")
        if self.layout not in ("unstacked", "stacked"):
            raise BenchmarkError(f"layout={self.layout!r}: expected 'unstacked' or 'stacked'")
        if "onnxruntime" in self.backends and self.dtype != "float32":
            raise BenchmarkError(f"dtype={self.dtype!r}: the onnxruntime baseline runs float32 only")
        if self.rule != "entropy" and "torch" in self.backends:
            raise BenchmarkError(f"rule={self.rule!r}: the PyTorch reference implements only 'entropy'")
        if self.attention != "default":   # the backend is asked only then (it starts JAX's backends)
            from deebert_jax.model.attention import attention_impl_problem
            problem = attention_impl_problem(self.attention, self.dtype)
            if problem:
                raise BenchmarkError(f"attention={self.attention!r}: {problem}")


def run_benchmark(config, params, arrays: Mapping[str, np.ndarray], spec: BenchmarkSpec, *,
                  torch_model=None, torch_device: str = "cpu", onnx_session=None, show_progress: bool = True,
                  on_batch_size_done: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Times every cell of `spec` on `arrays` (the input pool) -> rows (see the module docstring).

    After each batch size, a line on stderr says how long it took and what compiling cost, and
    `on_batch_size_done(rows so far)` runs (the CLI saves them: a run stopped later keeps them).
    """
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm
    from deebert_jax.model import layouts

    spec.check()
    n = check_input_pool(arrays, config)
    from deebert_jax.data.validation import check_model_inputs
    check_model_inputs(config, arrays["input_ids"], arrays["attention_mask"], arrays["token_type_ids"])
    if "torch" in spec.backends and torch_model is None:
        raise BenchmarkError("torch backend requested but no torch model given")
    if "onnxruntime" in spec.backends and onnx_session is None:
        raise BenchmarkError("onnxruntime backend requested but no ONNX Runtime session given")
    jax_dtype = jnp.bfloat16 if spec.dtype == "bfloat16" else jnp.float32
    stacked = jax.device_put(layouts.stack_params(params)) if spec.ablation else None
    if spec.layout == "unstacked":
        params = layouts.unstack_params(params)
    params = jax.device_put(params)
    jax_device = jax.devices()[0].platform
    seq_len = int(arrays["input_ids"].shape[1])
    L = config.num_hidden_layers
    rows: list[dict] = []
    per_batch_size = len(set(spec.backends) - {"onnxruntime"}) * (1 + len(spec.thresholds))
    per_batch_size += (1 if "onnxruntime" in spec.backends else 0) + (2 if spec.ablation and "jax" in spec.backends else 0)
    per_batch_size += len(spec.thresholds) if spec.exit_aware and "jax" in spec.backends else 0
    total = per_batch_size * len(spec.batch_sizes) * spec.runs
    progress = tqdm(total=total, desc="benchmark", unit="call", disable=not show_progress)
    for bs in spec.batch_sizes:
        bs = int(bs)
        started = time.perf_counter()
        index = [batch_rows(n, bs, r) for r in range(spec.runs)]
        run_lengths = _run_lengths(arrays["attention_mask"], index, spec.padding)
        cells: list[Cell] = []
        if "jax" in spec.backends:
            jbatches = [{k: jax.device_put(np.ascontiguousarray(arrays[k][rows_, :S])) for k in
                         ("input_ids", "attention_mask", "token_type_ids")} for rows_, S in zip(index, run_lengths)]
            cells += _jax_cells(config, params, jbatches, spec.thresholds, spec.rule, jax_dtype, jax_device, stacked,
                                spec.exit_aware, spec.attention)
        if "torch" in spec.backends:
            import torch
            tbatches = [{k: torch.from_numpy(np.ascontiguousarray(arrays[k][rows_, :S])).long().to(torch_device)
                         for k in ("input_ids", "attention_mask", "token_type_ids")} for rows_, S in zip(index, run_lengths)]
            cells += _torch_cells(torch_model, tbatches, spec.thresholds, torch_device)
        firsts = tuple(sorted({S: r for r, S in reversed(list(enumerate(run_lengths)))}.values()))
        for cell in cells:
            cell.warm_runs = firsts if spec.padding != "pool" else ()
        if "onnxruntime" in spec.backends:
            from benchmarks.onnx_engine import own_length   # each batch at its own length, as users run it
            cells += _onnx_cells(onnx_session, [own_length({k: arrays[k][rows_] for k in arrays}) for rows_ in index],
                                 "cpu")
        run_cells(cells, spec.runs, spec.warmup, spec.schedule, progress)
        valid = [arrays["attention_mask"][rows_].sum(-1) > 0 for rows_ in index]
        done = _rows_for(cells, valid, seq_len, L)
        for row in done:
            if row["backend"] != "onnxruntime" and spec.padding != "pool":
                how = "at its own length" if spec.padding == "own" else f"padded to a {spec.padding.replace('-', ' ')} length"
                row["run_at"] = f"each batch {how} (mean {np.mean(run_lengths):.1f} of {seq_len} tokens)"
            if row["backend"] == "onnxruntime":
                lengths = [c.call_lengths for c in cells if c.backend == "onnxruntime"][0]
                row["run_at"] = f"each batch's own length (mean {np.mean(lengths):.1f} of {seq_len} tokens)"
        rows += done
        compiles = ", ".join(f"{r['mode']} {r['compile_s']:.1f} s" for r in done
                             if r["backend"] == "jax" and r["compile_s"] is not None and r["threshold"] in (None, spec.thresholds[0]))
        progress.write(f"benchmark: batch {bs} timed in {time.perf_counter() - started:.1f} s (JAX compile: {compiles or 'none'})",
                       file=sys.stderr)
        if on_batch_size_done is not None:
            on_batch_size_done(list(rows))
    progress.close()
    return rows


def _run_lengths(attention_mask: np.ndarray, index, padding: str) -> list[int]:
    """The length each run's batch is cut to: the pool's, or its longest row's length class."""
    seq_len = int(attention_mask.shape[1])
    if padding == "pool":
        return [seq_len] * len(index)
    longest = [max(1, int(attention_mask[rows].sum(-1).max())) for rows in index]
    if padding == "own":
        return longest
    classes = length_classes(seq_len, padding)
    return [padded_length(n, classes) for n in longest]


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
# Models

def random_model_config(name: str, num_labels: int = 2):
    """Shapes of a named model, for weights-free runs."""
    from deebert_jax.core.config import DeeBertConfig, tiny_config
    if name == "bert-base":
        return DeeBertConfig(num_labels=num_labels)
    if name == "roberta-base":  # FacebookAI/roberta-base's config.json
        return DeeBertConfig(model_type="roberta", vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                             layer_norm_eps=1e-5, pad_token_id=1, num_labels=num_labels)
    if name == "minilm":
        return DeeBertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                             intermediate_size=1536, num_labels=num_labels)
    if name == "tiny":
        return tiny_config(num_labels=num_labels)
    raise BenchmarkError(f"--random-model {name!r}: expected one of {RANDOM_MODELS}")


def torch_twin(config, params, directory: str, device: str = "cpu", dtype: str = "float32"):
    """The same weights as an eager PyTorch DeeBERT: exported to `directory`, loaded strictly."""
    import torch
    from deebert_jax.weights.convert import export_pytorch_checkpoint
    from deebert_jax.weights.torch_reference import TorchDeeBert
    export_pytorch_checkpoint(config, params, directory)
    model = TorchDeeBert.from_pretrained(directory).to(device)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    return model.eval()
