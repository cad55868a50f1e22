"""Where one training step's time goes, operation by operation (XLA's own trace events).

    python -m train.profile_step [--stage 1|2] [--jax-defaults | --torch] [--threads N] [--batch-size 32]
        [--seq-len 128] [--runs 2] [--top 25] [--out FILE.json]

MiniLM-L6 (the packaged weights), the same pmapped step `train.benchmark_train` times, compiled
and warmed up, then `--runs` steps under the JAX profiler with XLA's per-operation trace events
on. Prints the time per category (matmuls forward and backward, dropout bits, softmax, loop
bookkeeping, other) and the slowest operations with their shapes, matmul dimension numbers and
the JAX op each came from (`benchmarks.profiling`). `--threads 1` runs XLA on one thread, so
operations do not overlap and their times add up to the step. `--jax-defaults` profiles the step
as JAX ships it (see `train.benchmark_train`); `--torch` profiles the eager PyTorch step it is
compared with (torch.profiler, self CPU time per aten op, by category). The trace and HLO dump go to a temporary directory
that is removed afterwards.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile

from deebert_jax.commands.cli import positive_int, run


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m train.profile_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", type=int, choices=(1, 2), default=1)
    p.add_argument("--jax-defaults", action="store_true",
                   help="profile stage 1 as JAX ships it (rolled threefry lowering, autodiff kernel gradients)")
    p.add_argument("--threads", type=positive_int, default=None, help="XLA CPU threads (default: all cores)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--runs", type=positive_int, default=2, help="profiled steps (times are per step)")
    p.add_argument("--top", type=positive_int, default=25, help="operations listed")
    p.add_argument("--out", default="", help="JSON with every operation and the categories")
    p.add_argument("--torch", action="store_true",
                   help="profile eager PyTorch's step instead (as train.benchmark_train times it), by torch.profiler")
    args = p.parse_args(argv)
    if args.jax_defaults and args.stage != 1:
        p.error("--jax-defaults profiles stage 1 only")
    if args.torch and (args.jax_defaults or args.stage != 1):
        p.error("--torch profiles PyTorch's (stage-1-like) step: no --stage 2 or --jax-defaults")

    from benchmarks.harness import load_average
    from deebert_jax.cpu.process import setup_process
    from deebert_jax.core.fileutil import atomic_write_text, check_outputs

    check_outputs({"--out": args.out or None})
    if args.torch:
        return _profile_torch(args, argv)
    setup_process(threads=args.threads)   # before JAX starts its CPU client
    work = tempfile.mkdtemp(prefix="deebert_profile_")
    try:
        dump = os.path.join(work, "hlo")
        # Before JAX starts: XLA reads its flags once.
        os.environ["XLA_FLAGS"] = " ".join(filter(None, [
            os.environ.get("XLA_FLAGS", ""), "--xla_cpu_enable_xprof_traceme=true",
            f"--xla_dump_to={dump}", "--xla_dump_hlo_as_text"]))
        import jax

        from benchmarks import profiling
        from deebert_jax.weights.model_loading import default_init_checkpoint
        from benchmarks.train_step import inputs as _inputs, jax_steps

        load_before = load_average()
        model_dir = default_init_checkpoint()
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            vocab = json.load(f)["vocab_size"]
        name = "jax_stage1_jax_defaults" if args.jax_defaults else f"jax_stage{args.stage}"
        step = jax_steps(model_dir, _inputs(args.batch_size, args.seq_len, vocab), args.jax_defaults, {name})[name]
        for _ in range(2):
            step()
        trace = os.path.join(work, "trace")
        with jax.profiler.trace(trace, create_perfetto_trace=True):
            for _ in range(args.runs):
                step()
        ops = profiling.op_table(trace, profiling.largest_hlo_dump(dump), args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    categories = profiling.by_category(ops)
    total = sum(categories.values())
    print(f"{name}: MiniLM-L6, batch {args.batch_size}, length {args.seq_len}, {jax.devices()[0].device_kind}, "
          f"XLA threads {args.threads or 'all'}, load average before {load_before}, after {load_average()}")
    _print_categories(categories, total, args.top)
    for op in ops[:args.top]:
        where = profiling.short_source(op["source"])
        print(f"{op['ms']:9.1f} ms x{op['calls']:<4g} {op['category']:<22.22} {op['shape']:<28} {op['dot']} {where}")
    if args.out:
        atomic_write_text(args.out, json.dumps({
            "variant": name, "batch_size": args.batch_size, "seq_len": args.seq_len, "threads": args.threads,
            "device": jax.devices()[0].device_kind, "runs": args.runs, "total_ms": total,
            "categories_ms": categories, "operations": ops,
            "command": "python -m train.profile_step " + " ".join(argv)}, indent=1, allow_nan=False))
        print(f"wrote {args.out}")
    return 0


def _print_categories(categories: dict, total: float, top: int) -> None:
    print(f"operations: {total:.0f} ms per step")
    for cat, ms in categories.items():
        print(f"{ms:9.1f} ms  {100 * ms / max(total, 1e-9):5.1f}%  {cat}")
    print(f"\nslowest {top} operations (ms per step, calls per step):")


def _profile_torch(args, argv) -> int:
    """`--torch`: BertForSequenceClassification + AdamW (`train.benchmark_train.torch_step`), eager,
    under torch.profiler; self CPU time per aten op, summed per category."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks import profiling
    from benchmarks.harness import load_average
    from deebert_jax.core.fileutil import atomic_write_text
    from deebert_jax.weights.model_loading import default_init_checkpoint
    from benchmarks.train_step import inputs as _inputs, torch_step

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load_average()
    model_dir = default_init_checkpoint()
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        vocab = json.load(f)["vocab_size"]
    step = torch_step(model_dir, _inputs(args.batch_size, args.seq_len, vocab))
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.runs):
            step()
    ops = profiling.torch_op_table(prof.events(), args.runs)
    categories = profiling.by_torch_category(ops)
    total = sum(categories.values())
    print(f"torch_adamw: MiniLM-L6, batch {args.batch_size}, length {args.seq_len}, torch threads "
          f"{torch.get_num_threads()}, load average before {load_before}, after {load_average()}")
    _print_categories(categories, total, args.top)
    for op in ops[:args.top]:
        print(f"{op['ms']:9.1f} ms x{op['calls']:<5g} {op['category']:<28} {'backward: ' if op['backward'] else ''}{op['name']}")
    if args.out:
        atomic_write_text(args.out, json.dumps({
            "variant": "torch_adamw", "batch_size": args.batch_size, "seq_len": args.seq_len,
            "threads": torch.get_num_threads(), "runs": args.runs, "total_ms": total, "categories_ms": categories,
            "operations": ops, "command": "python -m train.profile_step " + " ".join(argv)}, indent=1, allow_nan=False))
        print(f"wrote {args.out}")
    return 0


entry = functools.partial(run, main)   # the console script and `python -m`: errors as one line


if __name__ == "__main__":
    sys.exit(entry())
