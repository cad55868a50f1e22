"""Where one batch-1 prediction's time goes, operation by operation (XLA's own trace events).

    python -m train.profile_predict [--checkpoint DIR | --random-model minilm] [--seq-len 32]
        [--batch-size 1] [--threshold T] [--threads 2] [--runs 50] [--top 15] [--out FILE.json]

The call `train.benchmark` times: the full forward (`inference_step.forward` on the serving
layout), or with `--threshold` the early-exit loop (`early_exit_predict`), on random tokens with
every position real, compiled and warmed up. It is timed `--runs` times (the median is the wall
time of a call), then run `--runs` times under the JAX profiler with XLA's per-operation trace
events on, and the operations are summed by kind (`benchmarks.profiling`). "Outside operations" is
the wall time no operation covers: dispatch, the loop's control flow and thread hand-offs. With
`--threads` above 1 operations may overlap, so their sum can exceed the wall time. The trace and
HLO dump go to a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import sys
import tempfile
import time

from deebert_jax.commands.cli import positive_int, run


def parse_args(argv):
    from benchmarks.benchmarking import RANDOM_MODELS
    p = argparse.ArgumentParser(prog="python -m train.profile_predict", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="deebert-jax model directory (default: --random-model)")
    src.add_argument("--random-model", choices=RANDOM_MODELS, default="minilm", help="random weights of this size")
    p.add_argument("--seq-len", type=positive_int, default=32, help="tokens per row, all real")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--threshold", type=float, default=None,
                   help="profile the early-exit loop at this entropy threshold (default: the full forward)")
    p.add_argument("--threads", type=positive_int, default=2, help="XLA CPU threads")
    p.add_argument("--runs", type=positive_int, default=50, help="timed calls, then as many profiled")
    p.add_argument("--top", type=positive_int, default=15, help="operations listed")
    p.add_argument("--out", default="", help="JSON with every operation and the categories")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from benchmarks.harness import load_average
    from benchmarks.results import command_line
    from deebert_jax.core.fileutil import atomic_write_text, check_outputs
    from deebert_jax.cpu.process import setup_process

    from deebert_jax.weights.checkpoint import MODEL_DIR_FILES
    check_outputs({"--out": args.out or None}, {"--checkpoint": args.checkpoint},
                  reads={"--checkpoint": MODEL_DIR_FILES})
    setup_process(threads=args.threads)   # before JAX starts its CPU client
    work = tempfile.mkdtemp(prefix="deebert_profile_")
    try:
        dump = os.path.join(work, "hlo")
        os.environ["XLA_FLAGS"] = " ".join(filter(None, [   # before JAX starts: XLA reads its flags once
            os.environ.get("XLA_FLAGS", ""), "--xla_cpu_enable_xprof_traceme=true",
            f"--xla_dump_to={dump}", "--xla_dump_hlo_as_text"]))
        import jax
        import numpy as np

        from benchmarks import profiling
        load_before = load_average()
        call, what = _call(args)
        for _ in range(3):
            call()
        walls = []
        for _ in range(args.runs):
            start = time.perf_counter()
            call()
            walls.append((time.perf_counter() - start) * 1e3)
        trace = os.path.join(work, "trace")
        with jax.profiler.trace(trace, create_perfetto_trace=True):
            for _ in range(args.runs):
                call()
        ops = profiling.op_table(trace, profiling.largest_hlo_dump(dump, "jit_forward" if args.threshold is None
                                                                  else "jit__loop"), args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # Only the module's own operations: the profiler's wrappers have no HLO line (no shape), and a
    # while loop's or conditional's event spans the operations inside it.
    ops = [op for op in ops if op["shape"] and not re.match(r"(while|cond|conditional|call)(\.|$)", op["name"])]
    wall = float(np.median(walls))
    categories = profiling.by_category(ops, profiling.INFERENCE_CATEGORIES)
    total = sum(categories.values())
    print(f"{what}: batch {args.batch_size}, length {args.seq_len}, XLA threads {args.threads}, "
          f"load average before {load_before}, after {load_average()}")
    print(f"{wall:9.3f} ms  a call (median of {args.runs}, wall)")
    print(f"{total:9.3f} ms  operations ({len(ops)} kinds)")
    print(f"{max(wall - total, 0.0):9.3f} ms  outside operations (dispatch, control flow, hand-offs)")
    for cat, ms in categories.items():
        print(f"{ms:9.3f} ms  {100 * ms / max(total, 1e-9):5.1f}%  {cat}")
    print(f"\nslowest {args.top} operations (ms per call, calls per call):")
    for op in ops[:args.top]:
        print(f"{op['ms']:9.3f} ms x{op['calls']:<4g} {op['category']:<22.22} {op['shape']:<28} "
              f"{profiling.short_source(op['source'])}")
    if args.out:
        atomic_write_text(args.out, json.dumps({
            "what": what, "batch_size": args.batch_size, "seq_len": args.seq_len, "threads": args.threads,
            "runs": args.runs, "wall_ms": wall, "operations_ms": total, "categories_ms": categories,
            "operations": ops, "command": command_line("train.profile_predict", argv)}, indent=1,
            allow_nan=False))
        print(f"wrote {args.out}")
    return 0


def _call(args):
    """-> (a call that runs one prediction and blocks, what it is)."""
    import jax
    import numpy as np

    from benchmarks.benchmarking import random_model_config
    from deebert_jax.inference.early_exit import early_exit_predict
    from deebert_jax.model import inference_step, layouts, modeling
    from deebert_jax.weights.checkpoint import load_checkpoint

    if args.checkpoint:
        config, params = load_checkpoint(args.checkpoint)
        model = f"checkpoint {os.path.basename(os.path.normpath(args.checkpoint))}"
    else:
        config = random_model_config(args.random_model)
        params, model = modeling.init_params(config, jax.random.PRNGKey(0)), f"random {args.random_model}"
    params = jax.device_put(layouts.unstack_params(params))
    rng = np.random.default_rng(0)
    ids = jax.device_put(rng.integers(1, config.vocab_size, (args.batch_size, args.seq_len), dtype=np.int32))
    mask, types = jax.device_put(np.ones_like(ids)), jax.device_put(np.zeros_like(ids))
    if args.threshold is None:
        full = jax.jit(inference_step.forward, static_argnums=(0,))
        return (lambda: full(config, params, ids, mask, types).block_until_ready()), f"{model}, full forward"

    def exit_loop():
        jax.block_until_ready(early_exit_predict(config, params, ids, mask, types, args.threshold,
                                                 validate_inputs=False))
    return exit_loop, f"{model}, early exit at entropy {args.threshold:g}"


entry = functools.partial(run, main)   # the console script and `python -m`: errors as one line


if __name__ == "__main__":
    sys.exit(entry())
