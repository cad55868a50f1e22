"""Host work per serving-engine step: `Engine.step()`'s wall time less the XLA program time inside it.

    python -m train.benchmark_engine_step [--rows 1,32] [--steps 500] [--threads 2] [--random-model tiny]
        [--length 16] [--pool 64] [--out FILE.json]

Random weights of `--random-model` shapes, one pool of `--length`, threshold 0 (every layer);
per row count, `--steps` timed steps and as many profiled (`benchmarks.engine_step` says what
is counted as program time and as host work). Prints a table (medians, microseconds a step)
and writes JSON with the load average, JAX version and threads.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

from deebert_jax.commands.cli import ints, positive_int, run

def main(argv: list[str]) -> int:
    from benchmarks.benchmarking import RANDOM_MODELS
    p = argparse.ArgumentParser(prog="python -m train.benchmark_engine_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=ints, default=[1, 32], help="rows in flight, comma-separated")
    p.add_argument("--steps", type=positive_int, default=500, help="timed steps per row count (and as many profiled)")
    p.add_argument("--threads", type=positive_int, default=2, help="XLA CPU threads")
    p.add_argument("--random-model", default="tiny", choices=RANDOM_MODELS)
    p.add_argument("--length", type=positive_int, default=16, help="the pool's padded length")
    p.add_argument("--pool", type=positive_int, default=64, help="slots in the pool")
    p.add_argument("--out", default="", help="JSON of the result")
    args = p.parse_args(argv)
    if not args.rows or min(args.rows) < 1 or max(args.rows) > args.pool:
        p.error(f"--rows {args.rows}: each must be in [1, --pool {args.pool}]")

    from deebert_jax.core.fileutil import atomic_write_text, check_outputs
    from deebert_jax.cpu.process import setup_serving_process

    check_outputs({"--out": args.out or None})
    # Before JAX starts its CPU client; the process settings `train.serve` sets up for its engine.
    setup_serving_process(threads=args.threads)
    from benchmarks import engine_step
    from benchmarks.results import command_line

    result = engine_step.run(args.random_model, args.rows, args.steps, args.length, args.pool,
                             progress=lambda line: print(line, file=sys.stderr, flush=True))
    result["command"] = command_line("train.benchmark_engine_step", argv)
    print(engine_step.table(result), end="")
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1, allow_nan=False) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


entry = functools.partial(run, main)


if __name__ == "__main__":
    sys.exit(entry())
