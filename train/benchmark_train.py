"""Training-step speed: JAX stage 1 and stage 2 against an eager PyTorch AdamW step.

    python -m train.benchmark_train [--batch-size 32] [--seq-len 128] [--steps 5] [--threads N] [--jax-defaults] [--out FILE]

MiniLM-L6 (the packaged weights), full-length rows (no padding), float32, all local devices for
JAX and PyTorch's default threads. After warm-up (compilation) the three steps are timed in
turns, one of each per round; the table shows medians. Targets: JAX stage 1 >= 1.2x PyTorch's
examples/s (stretch 1.5x); stage 2 <= 0.3x the time of a stage-1 step. The load average before and
after and both frameworks' threads are recorded; a busy machine is flagged, as `train.benchmark`
does, because oversubscribed cores slow eager PyTorch far more than XLA. `--jax-defaults` adds a
stage-1 step built as JAX ships it (`cpu_rng` and `matmul` undone), timed in the same rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys

import numpy as np

from train.cli import positive_int, run


def _inputs(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(1000, vocab, (batch, seq)).astype(np.int32),
            "attention_mask": np.ones((batch, seq), np.int32),
            "token_type_ids": np.zeros((batch, seq), np.int32),
            "labels": rng.integers(0, 2, (batch,)).astype(np.int32)}


@contextlib.contextmanager
def jax_defaults():
    """While open, models are built as JAX and Flax ship them: threefry with JAX's rolled CPU
    lowering, dense kernel gradients and attention's backward from autodiff, a rolled layer scan,
    `nn.Dropout` and the activation as they are (what `cpu_rng`, `matmul`, `attention` and
    `fusion` change). The process's malloc settings (`cpu_memory`) cannot be undone."""
    from jax import lax

    from deebert_jax import attention, cpu_rng, modeling

    saved = modeling.dense_dot_general, modeling.attention_core, modeling._cpu_training_layout
    modeling.dense_dot_general = lax.dot_general
    modeling.attention_core = attention.attention_autodiff
    modeling._cpu_training_layout = False
    cpu_rng.fuse_threefry_on_cpu()   # once, now: `make_train_step`'s own call must not undo the next line
    cpu_rng.register_threefry_lowering(unrolled=False)
    try:
        yield
    finally:
        modeling.dense_dot_general, modeling.attention_core, modeling._cpu_training_layout = saved
        cpu_rng.register_threefry_lowering(unrolled=True)


def jax_steps(model_dir: str, batch: dict, with_jax_defaults: bool = False, names=None) -> dict:
    """{"jax_stage1": step(), "jax_stage2": step()} (+ "jax_stage1_jax_defaults"): one pmapped
    train step each, compiled before timing (state carried); `names` keeps only those."""
    import jax

    from deebert_jax import data, training
    from deebert_jax.convert import load_pytorch_checkpoint

    config, params = load_pytorch_checkpoint(model_dir, num_labels=2)
    devices = jax.local_devices()
    sharded = data.shard(batch, len(devices))
    key = training.replicate(jax.random.PRNGKey(0), devices)
    settings = training.OptimizerSettings(2e-5, total_steps=1000, warmup_steps=100, weight_decay=0.01)
    variants = [("jax_stage1", 1, contextlib.nullcontext), ("jax_stage2", 2, contextlib.nullcontext)]
    if with_jax_defaults:
        variants.append(("jax_stage1_jax_defaults", 1, jax_defaults))
    steps = {}
    for name, stage, context in variants:
        if names is not None and name not in names:
            continue
        tx = settings.optimizer()
        with context():
            # Not `pmapped_train_step`: its cache would hand the two stage-1 variants one executable.
            p_step = jax.pmap(training.make_train_step(config, tx, settings.schedule(), stage),
                              axis_name=training.AXIS, devices=devices, donate_argnums=(0,))
            state = training.replicate(training.init_train_state(params, tx, stage, config.num_hidden_layers), devices)
            compiled = p_step.lower(state, sharded, key).compile()
        holder = {"state": state}

        def step(compiled=compiled, holder=holder):
            holder["state"], metrics = compiled(holder["state"], sharded, key)
            jax.block_until_ready(metrics)

        steps[name] = step
    return steps


def torch_step(model_dir: str, batch: dict):
    """An eager PyTorch AdamW step of BertForSequenceClassification (train mode, clipping at 1.0)."""
    import torch
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the fresh classifier head is expected, not news
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    tb = {k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}

    def step():
        loss = model(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"],
                     token_type_ids=tb["token_type_ids"], labels=tb["labels"]).loss
        loss.backward()
        with torch.profiler.record_function("clip_grad_norm_"):   # named in `train.profile_step --torch`
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main(argv=None) -> dict:
    """Times the three steps, prints the table, writes --out -> the result written there."""
    ap = argparse.ArgumentParser(prog="python -m train.benchmark_train", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="", help="model directory (default: the packaged MiniLM-L6)")
    ap.add_argument("--batch-size", type=positive_int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=positive_int, default=5, help="timed rounds (one step of each variant per round; medians reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="workdirs/benchmark_train.json")
    ap.add_argument("--threads", type=positive_int, default=None,
                    help="threads for each framework (XLA's CPU pool and PyTorch's intra-op); default: theirs")
    ap.add_argument("--jax-defaults", action="store_true",
                    help="also time stage 1 as JAX ships it (rolled threefry lowering, autodiff kernel gradients)")
    args = ap.parse_args(argv)
    from deebert_jax.fileutil import atomic_write_text, check_output_file
    from deebert_jax.training import default_init_checkpoint
    if args.out:
        check_output_file(args.out)   # before the timing, not after it

    from deebert_jax.bench_harness import available_cpus, load_average, set_thread_env, versions, xla_cpu_threads
    from deebert_jax.cpu_memory import keep_freed_memory
    kept = keep_freed_memory()   # as `train.train` runs; before either framework computes anything
    if args.threads:
        set_thread_env(args.threads)   # before JAX starts its CPU client
        import torch
        torch.set_num_threads(args.threads)
    load_before = load_average()   # before anything of ours runs: what else is using the machine
    model_dir = args.model or default_init_checkpoint()
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        vocab = json.load(f)["vocab_size"]
    batch = _inputs(args.batch_size, args.seq_len, vocab)

    from deebert_jax.bench_harness import time_interleaved
    from deebert_jax.report import relative_paths

    steps = {"torch_adamw": torch_step(model_dir, batch), **jax_steps(model_dir, batch, args.jax_defaults)}
    # In turns, one step of each per round: load from other processes falls on all variants alike.
    timings = time_interleaved(steps, args.steps, args.warmup)
    times = {k: [ms / 1e3 for ms in t.times_ms] for k, t in timings.items()}
    import jax
    import torch

    median = {k: statistics.median(v) for k, v in times.items()}
    fastest = {k: min(v) for k, v in times.items()}  # less sensitive to other load on a shared machine
    rate = {k: args.batch_size / v for k, v in median.items()}
    from deebert_jax.bench_report import contention_warning
    result = {
        "model": relative_paths(model_dir), "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
        "device": f"{jax.devices()[0].platform} x{jax.local_device_count()} ({platform.processor() or platform.machine()}, "
                  f"{os.cpu_count()} cores)",
        "versions": versions(),
        "cpu_cores": available_cpus(),
        "keep_freed_memory": kept,
        # XLA's CPU pool and PyTorch's intra-op threads, as they ran (not as requested).
        "threads": {"xla_cpu": xla_cpu_threads(), "torch": torch.get_num_threads(),
                    "torch_interop": torch.get_num_interop_threads()},
        "load_average_before": load_before, "load_average_after": load_average(),
        "command": "python -m train.benchmark_train " + " ".join(argv if argv is not None else sys.argv[1:]),
        "step_seconds": times, "median_step_seconds": median, "min_step_seconds": fastest,
        "examples_per_second": rate,
        "jax_stage1_vs_torch_examples_per_second": rate["jax_stage1"] / rate["torch_adamw"],
        "stage2_vs_stage1_step_time": median["jax_stage2"] / median["jax_stage1"],
        **({"jax_stage1_vs_jax_defaults_step_time": median["jax_stage1"] / median["jax_stage1_jax_defaults"]}
           if args.jax_defaults else {}),
        "targets": {"jax_stage1_vs_torch_examples_per_second": ">= 1.2 (stretch 1.5)",
                    "stage2_vs_stage1_step_time": "<= 0.3"},
    }
    result["warning"] = contention_warning(result)
    print(f"MiniLM-L6, batch {args.batch_size}, length {args.seq_len}, {result['device']}; median of {args.steps} steps")
    print(f"threads: {result['threads']}; load average before {load_before}, after {result['load_average_after']}")
    if result["warning"]:
        print(f"warning: {result['warning']}")
    print(f"{'step':<28}{'median s':>10}{'min s':>8}{'examples/s':>12}{'vs torch':>10}")
    labels = {"torch_adamw": "PyTorch eager AdamW", "jax_stage1": "JAX stage 1", "jax_stage2": "JAX stage 2",
              "jax_stage1_jax_defaults": "JAX stage 1, JAX defaults"}
    for k, label in labels.items():
        if k not in median:
            continue
        print(f"{label:<28}{median[k]:>10.3f}{fastest[k]:>8.3f}{rate[k]:>12.1f}{rate[k] / rate['torch_adamw']:>9.2f}x")
    print(f"JAX stage 1 / PyTorch examples/s: {result['jax_stage1_vs_torch_examples_per_second']:.2f}x (target >= 1.2, stretch 1.5)")
    print(f"stage 2 / stage 1 step time:      {result['stage2_vs_stage1_step_time']:.2f} (target <= 0.3)")
    if args.jax_defaults:
        print(f"stage 1 / stage 1 with JAX defaults: {result['jax_stage1_vs_jax_defaults_step_time']:.2f} of the step time")
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2, allow_nan=False))
        print(f"wrote {args.out}")
    return result


def _cli(argv: list[str]) -> int:
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(run(_cli))
