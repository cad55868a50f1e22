"""Training-step speed: JAX stage 1 and stage 2 against an eager PyTorch AdamW step.

Both frameworks start from the same weights (a PyTorch/HF directory, or random weights of a named
size exported to one), take the same full-length batch, run on the same device (PyTorch on CUDA
when JAX is on the GPU) and compute at the same precision (`benchmarks.precision`: under bf16,
JAX's step computes in bfloat16 with float32 parameters and PyTorch's runs under bf16 autocast).
The steps are timed in turns, one of each per round, after a warm-up that compiles JAX's.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import statistics
from typing import Callable, Mapping

import numpy as np

from deebert_jax.core.errors import InputError
from benchmarks.precision import PRECISIONS, Precision

TARGETS = {"jax_stage1_vs_torch_examples_per_second": ">= 1.2 (stretch 1.5)",
           "stage2_vs_stage1_step_time": "<= 0.3"}
RANDOM_MODELS = ("minilm", "bert-base", "tiny")
LABELS = {"torch_adamw": "PyTorch eager AdamW", "jax_stage1": "JAX stage 1", "jax_stage2": "JAX stage 2",
          "jax_stage1_jax_defaults": "JAX stage 1, JAX defaults"}


def inputs(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One full-length batch: token ids, mask, types [batch, seq] int32 and labels [batch]."""
    rng = np.random.default_rng(seed)
    low = min(1000, vocab // 2)   # past BERT's special and unused tokens when the vocabulary allows
    return {"input_ids": rng.integers(low, vocab, (batch, seq)).astype(np.int32),
            "attention_mask": np.ones((batch, seq), np.int32),
            "token_type_ids": np.zeros((batch, seq), np.int32),
            "labels": rng.integers(0, 2, (batch,)).astype(np.int32)}


def export_random_model(name: str, directory: str, seed: int = 0) -> str:
    """Random weights of a named size as a PyTorch (DeeBERT) directory both frameworks load -> it."""
    import jax

    from benchmarks.benchmarking import random_model_config
    from deebert_jax.weights.convert import export_pytorch_checkpoint
    from deebert_jax.weights.model_loading import jitted_init_params   # one compile, not one per op
    if name not in RANDOM_MODELS:
        raise InputError(f"--random-model {name!r}: expected one of {', '.join(RANDOM_MODELS)}")
    config = random_model_config(name, num_labels=2)
    export_pytorch_checkpoint(config, jitted_init_params(config, jax.random.PRNGKey(seed)), directory)
    return directory


@contextlib.contextmanager
def jax_defaults():
    """While open, threefry is lowered on the CPU as JAX ships it (a rolled loop; the same bits).
    Yields the kernels to build the step from: "reference", the graph as JAX and Flax build it
    (`model.kernels`). The process's malloc settings (`cpu.memory`) cannot be undone. The last
    layer stays computed for the first token only: a change of the model's graph on every
    backend, not a CPU tuning (`model.training_graph`)."""
    from deebert_jax.cpu import threefry

    unrolled = threefry.registered_unrolled()
    threefry.register_threefry_lowering(unrolled=False)
    try:
        yield "reference"
    finally:
        threefry.register_threefry_lowering(unrolled=unrolled)


def jax_steps(model_dir: str, batch: dict, with_jax_defaults: bool = False, names=None,
              dtype: str = "float32") -> dict:
    """{"jax_stage1": step(), "jax_stage2": step()} (+ "jax_stage1_jax_defaults"): one pmapped
    train step each, computing in `dtype`, compiled before timing (state carried); `names` keeps
    only those."""
    import jax
    import jax.numpy as jnp

    from deebert_jax.data import batching
    from deebert_jax.training import steps as train_steps
    from deebert_jax.core import runtime
    from deebert_jax.weights.convert import load_pytorch_checkpoint

    config, params = load_pytorch_checkpoint(model_dir, num_labels=2)
    devices = jax.local_devices()
    sharded = batching.shard(batch, len(devices))
    key = runtime.replicate(jax.random.PRNGKey(0), devices)
    settings = train_steps.OptimizerSettings(2e-5, total_steps=1000, warmup_steps=100, weight_decay=0.01)
    from deebert_jax.model.kernels import for_devices

    tuned = functools.partial(contextlib.nullcontext, for_devices(devices))
    variants = [("jax_stage1", 1, tuned), ("jax_stage2", 2, tuned)]
    if with_jax_defaults:
        variants.append(("jax_stage1_jax_defaults", 1, jax_defaults))
    steps = {}
    for name, stage, context in variants:
        if names is not None and name not in names:
            continue
        tx = settings.optimizer()
        with context() as kernels:
            # Not `pmapped_train_step`: its cache would hand the two stage-1 variants one executable.
            p_step = jax.pmap(train_steps.make_train_step(config, tx, settings.schedule(), stage, dtype=jnp.dtype(dtype),
                                                          kernels=kernels),
                              axis_name=runtime.AXIS, devices=devices, donate_argnums=(0,))
            state = runtime.replicate(train_steps.init_train_state(params, tx, stage, config.num_hidden_layers), devices)
            compiled = p_step.lower(state, sharded, key).compile()
        holder = {"state": state}

        def step(compiled=compiled, holder=holder):
            holder["state"], metrics = compiled(holder["state"], sharded, key)
            jax.block_until_ready(metrics)

        steps[name] = step
    return steps


def torch_step(model_dir: str, batch: dict, device: str = "cpu", precision: Precision | None = None) -> Callable:
    """An eager PyTorch AdamW step of BertForSequenceClassification on `device` (train mode,
    clipping at 1.0; under bf16 precision the forward and loss run in bf16 autocast)."""
    import torch
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    from benchmarks.harness import sync_torch
    from benchmarks.precision import torch_autocast

    precision = precision or Precision()
    hf_logging.set_verbosity_error()  # the fresh classifier head and DeeBERT's highway keys are expected
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    tb = {k: torch.from_numpy(v.astype(np.int64)).to(device) for k, v in batch.items()}

    def step():
        with torch_autocast(precision, device):
            loss = model(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"],
                         token_type_ids=tb["token_type_ids"], labels=tb["labels"]).loss
        loss.backward()
        with torch.profiler.record_function("clip_grad_norm_"):   # named in `train.profile_step --torch`
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync_torch(device)

    return step


def run(model_dir: str, model_name: str, batch_size: int, seq_len: int, steps: int, warmup: int,
        precision: Precision, with_jax_defaults: bool, command: str, load_before) -> dict:
    """Times the steps in turns -> the result `benchmark_train` writes (see `validate`)."""
    import jax
    import torch

    from benchmarks.harness import BenchmarkError, available_cpus, load_average, time_interleaved, torch_device_for, \
        versions, xla_cpu_threads
    from deebert_jax.cpu import memory as cpu_memory
    from benchmarks.report import contention_warning

    config_path = os.path.join(model_dir, "config.json")
    with open(config_path, encoding="utf-8") as f:
        model_config = json.load(f)
    max_positions = model_config.get("max_position_embeddings")
    if max_positions is not None and seq_len > max_positions:   # before either framework builds anything
        raise BenchmarkError(f"--seq-len {seq_len} exceeds max_position_embeddings {max_positions} of {model_name}")
    batch = inputs(batch_size, seq_len, model_config["vocab_size"])
    jax_platform = jax.devices()[0].platform
    torch_device = torch_device_for(jax_platform)
    # JAX's side first: it reads the weights with `convert.read_state_dict`, so a file that is not
    # plain tensors (a pickle with code in it) is one CheckpointError before transformers opens it.
    jax_calls = jax_steps(model_dir, batch, with_jax_defaults, dtype=precision.dtype)
    calls = {"torch_adamw": torch_step(model_dir, batch, torch_device, precision), **jax_calls}
    # In turns, one step of each per round: load from other processes falls on all variants alike.
    timings = time_interleaved(calls, steps, warmup)
    times = {k: [ms / 1e3 for ms in t.times_ms] for k, t in timings.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    fastest = {k: min(v) for k, v in times.items()}  # less sensitive to other load on a shared machine
    rate = {k: batch_size / v for k, v in median.items()}
    device = jax.devices()[0]
    result = {
        "model": model_name, "batch_size": batch_size, "seq_len": seq_len, "steps": steps,
        "device": (f"{device.platform} x{jax.local_device_count()} ({platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} cores)" if jax_platform == "cpu"
                   else f"{jax_platform} x{jax.local_device_count()} ({device.device_kind})"),
        "jax_platform": jax_platform, "torch_device": torch_device,
        "precision": precision.name, "precision_settings": precision.record(),
        "versions": versions(),
        "cpu_cores": available_cpus(),
        "keep_freed_memory": cpu_memory.applied(),   # process-wide: both frameworks run with it
        # XLA's CPU pool and PyTorch's intra-op threads, as they ran (not as requested).
        "threads": {"xla_cpu": xla_cpu_threads(), "torch": torch.get_num_threads(),
                    "torch_interop": torch.get_num_interop_threads()},
        "load_average_before": load_before, "load_average_after": load_average(),
        "command": command,
        "step_seconds": times, "median_step_seconds": median, "min_step_seconds": fastest,
        "examples_per_second": rate,
        "jax_stage1_vs_torch_examples_per_second": rate["jax_stage1"] / rate["torch_adamw"],
        "stage2_vs_stage1_step_time": median["jax_stage2"] / median["jax_stage1"],
        **({"jax_stage1_vs_jax_defaults_step_time": median["jax_stage1"] / median["jax_stage1_jax_defaults"]}
           if with_jax_defaults else {}),
        "targets": dict(TARGETS),
    }
    result["warning"] = contention_warning(result) if jax_platform == "cpu" else None
    validate(result)
    return result


_REQUIRED = ("model", "batch_size", "seq_len", "device", "torch_device", "precision", "versions", "threads",
             "median_step_seconds", "examples_per_second", "jax_stage1_vs_torch_examples_per_second",
             "stage2_vs_stage1_step_time")


def validate(result: Mapping) -> None:
    """Raises ValueError naming the first key that breaks the `benchmark_train` JSON schema."""
    for key in _REQUIRED:
        if key not in result:
            raise InputError(f"benchmark_train JSON: missing key {key!r}")
    if result["precision"] not in PRECISIONS:
        raise InputError(f"benchmark_train JSON: 'precision'={result['precision']!r}, expected one of {PRECISIONS}")
    for name in ("torch_adamw", "jax_stage1", "jax_stage2"):
        seconds = result["median_step_seconds"].get(name)
        if not isinstance(seconds, (int, float)) or not seconds > 0:
            raise InputError(f"benchmark_train JSON: median_step_seconds.{name}={seconds!r} must be a positive time")


def table(result: Mapping) -> str:
    """The printed report: header lines, one row per step, the targets."""
    median, fastest, rate = result["median_step_seconds"], result["min_step_seconds"], result["examples_per_second"]
    lines = [f"{result['model']}, batch {result['batch_size']}, length {result['seq_len']}, {result['device']}, "
             f"PyTorch on {result['torch_device']}; precision {result['precision']} on both sides; "
             f"median of {result['steps']} steps",
             f"threads: {result['threads']}; load average before {result['load_average_before']}, "
             f"after {result['load_average_after']}"]
    if result.get("warning"):
        lines.append(f"warning: {result['warning']}")
    lines.append(f"{'step':<28}{'median s':>10}{'min s':>8}{'examples/s':>12}{'vs torch':>10}")
    for k, label in LABELS.items():
        if k in median:
            lines.append(f"{label:<28}{median[k]:>10.3f}{fastest[k]:>8.3f}{rate[k]:>12.1f}"
                         f"{rate[k] / rate['torch_adamw']:>9.2f}x")
    lines.append(f"JAX stage 1 / PyTorch examples/s: {result['jax_stage1_vs_torch_examples_per_second']:.2f}x "
                 f"(target >= 1.2, stretch 1.5)")
    lines.append(f"stage 2 / stage 1 step time:      {result['stage2_vs_stage1_step_time']:.2f} (target <= 0.3)")
    if "jax_stage1_vs_jax_defaults_step_time" in result:
        lines.append(f"stage 1 / stage 1 with JAX defaults: {result['jax_stage1_vs_jax_defaults_step_time']:.2f} "
                     "of the step time")
    return "\n".join(lines)
