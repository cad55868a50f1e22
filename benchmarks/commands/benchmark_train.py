"""Training-step speed: JAX stage 1 and stage 2 against an eager PyTorch AdamW step.

    python -m train.benchmark_train [--model DIR | --random-model minilm|bert-base|tiny]
        [--precision fp32|tf32|bf16] [--batch-size 32] [--seq-len 128] [--steps 5] [--threads N]
        [--jax-defaults] [--out FILE]

MiniLM-L6 (the packaged weights) by default, full-length rows (no padding), fp32 (IEEE matmuls on
both sides), all local devices for JAX, PyTorch on the same device (CUDA when JAX is on the GPU)
and its default threads. After warm-up (compilation) the steps are timed in turns, one of each per
round; the table shows medians. Targets: JAX stage 1 >= 1.2x PyTorch's examples/s (stretch 1.5x);
stage 2 <= 0.3x the time of a stage-1 step. The load average before and after, both frameworks'
threads and the precision are recorded; a busy machine is flagged, as `train.benchmark` does,
because oversubscribed cores slow eager PyTorch far more than XLA. `--jax-defaults` adds a
stage-1 step built as JAX ships it (`cpu_rng` and `matmul` undone), timed in the same rounds.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile

from deebert_jax.commands.cli import positive_int, run


def main(argv=None) -> dict:
    """Times the steps, prints the table, writes --out -> the result written there."""
    from benchmarks.precision import PRECISIONS
    from benchmarks.train_step import RANDOM_MODELS
    ap = argparse.ArgumentParser(prog="python -m train.benchmark_train", description=__doc__.split("\n")[0])
    source = ap.add_mutually_exclusive_group()
    source.add_argument("--model", default="", help="model directory (default: the packaged MiniLM-L6)")
    source.add_argument("--random-model", choices=RANDOM_MODELS, default=None,
                        help="random weights of this size, the same on both sides (no files needed)")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32",
                    help="fp32 (IEEE float32 matmuls), tf32, or bf16 (JAX computes in bf16 with float32 "
                         "parameters; PyTorch under bf16 autocast); the same on both sides")
    ap.add_argument("--batch-size", type=positive_int, default=32)
    ap.add_argument("--seq-len", type=positive_int, default=128)
    ap.add_argument("--steps", type=positive_int, default=5, help="timed rounds (one step of each variant per round; medians reported)")
    ap.add_argument("--warmup", type=positive_int, default=2)
    ap.add_argument("--out", default="workdirs/benchmark_train.json")
    ap.add_argument("--threads", type=positive_int, default=None,
                    help="threads for each framework (XLA's CPU pool and PyTorch's intra-op); default: theirs")
    ap.add_argument("--jax-defaults", action="store_true",
                    help="also time stage 1 as JAX ships it (rolled threefry lowering, autodiff kernel gradients)")
    args = ap.parse_args(argv)
    from benchmarks import precision as precision_lib
    from benchmarks import train_step as step_benchmark
    from benchmarks.harness import load_average
    from deebert_jax.cpu.process import setup_process
    from deebert_jax.core.fileutil import atomic_write_text, check_outputs
    from deebert_jax.weights.checkpoint import MODEL_DIR_FILES
    from deebert_jax.weights.model_loading import default_init_checkpoint
    from benchmarks.results import command_line, relative_paths
    if args.out:   # before the timing, not after it
        check_outputs({"--out": args.out}, {"--model": args.model or None}, reads={"--model": MODEL_DIR_FILES})

    # Before JAX starts: both frameworks' models and steps on one GPU; XLA's CPU threads.
    setup_process(threads=args.threads, share_accelerator_memory=True)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    load_before = load_average()   # before anything of ours runs: what else is using the machine
    precision = precision_lib.Precision(args.precision)
    precision_lib.apply(precision)   # before anything is traced
    command = command_line("train.benchmark_train", argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="deebert-bench-train-") as tmp:
        if args.random_model:
            model_dir = step_benchmark.export_random_model(args.random_model, tmp)
            model_name = f"random {args.random_model}"
        else:
            model_dir = args.model or default_init_checkpoint()
            model_name = relative_paths(model_dir)
        result = step_benchmark.run(model_dir, model_name, args.batch_size, args.seq_len, args.steps, args.warmup,
                                    precision, args.jax_defaults, command, load_before)
    print(step_benchmark.table(result))
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2, allow_nan=False))
        print(f"wrote {args.out}")
    return result


def _cli(argv: list[str]) -> int:
    main(argv)
    return 0


entry = functools.partial(run, _cli)   # the console script and `python -m`: errors as one line


if __name__ == "__main__":
    sys.exit(entry())
