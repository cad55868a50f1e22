"""Serving under open-loop load: the early-exit server against full depth and eager PyTorch.

    python -m train.benchmark_serve --checkpoint DIR [--glue-dir DIR] [--rates 10,25,50,...]
        [--duration 10] [--max-requests 3000] [--slo-ms 250] [--max-seq-length 64]
        [--modes full_depth,early_exit,torch,onnxruntime] [--out benchmarks/results/serve.json]
    python -m train.benchmark_serve --quick      # a tiny random model, a few seconds per mode

Starts `python -m train.serve` on 127.0.0.1 once per mode (early exit at DIR/exit_policy.json's
threshold, full depth at threshold 0, eager PyTorch at full depth), sends one SST-2 dev sentence
per request at Poisson arrival times for each offered rate, and reports per rate the achieved
throughput, p50/p90/p99 latency, errors, mean exit layer, accuracy against the dev labels and
agreement with `train.predict`; capacity is the highest rate whose p99 stays within the SLO with
no errors. Writes JSON, a markdown table (.md) and a latency-against-load plot (.png).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile

from deebert_jax.core.errors import InputError
from deebert_jax.commands.cli import floats, positive_int, run
from deebert_jax.data.lengths import SPACINGS

QUICK = dict(rates=[5.0, 20.0], duration=2.0, max_requests=100)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m train.benchmark_serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="deebert-jax model directory (its exit_policy.json: the threshold)")
    p.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR"), help="local GLUE folder (default $GLUE_DIR)")
    p.add_argument("--rates", type=floats, default=[10, 25, 50, 75, 100, 150, 200, 300], help="offered requests/s")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals per rate")
    p.add_argument("--max-requests", type=positive_int, default=3000, help="requests per rate, at most")
    p.add_argument("--slo-ms", type=float, default=250.0, help="p99 latency bound for the capacity")
    p.add_argument("--max-seq-length", type=positive_int, default=None,
                   help="default: the length the model was trained at (training.json), else the longest its "
                        "positions cover; --quick: 64")
    p.add_argument("--modes", default=",".join(["full_depth", "early_exit", "torch", "onnxruntime"]),
                   help="servers to sweep: full_depth, early_exit (JAX), torch, onnxruntime (the baselines); "
                        "early_exit_unshadowed (the early-exit server without shadow rows: what shadowing costs)")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="times each rate is measured (every mode in turn each time): each capacity comes with its "
                        "spread; the reported capacity is the median (--quick: 1)")
    p.add_argument("--out", default="workdirs/serve_bench.json")
    p.add_argument("--quick", action="store_true", help="a tiny random model and two short rates (a smoke run)")
    p.add_argument("--schedule", default=None, help="the JAX servers' schedule (train.serve --schedule; "
                   "default: the server's)")
    p.add_argument("--length-spacing", default=None, choices=SPACINGS,
                   help="every server's padded lengths (train.serve --length-spacing; default: the server's)")
    p.add_argument("--model-label", default=None,
                   help="how the report names the model directory (default: its path relative to the current "
                        "directory when inside it, else MODEL_DIR: no path outside the checkout is written)")
    args = p.parse_args(argv)
    if not args.quick and not args.checkpoint:
        p.error("--checkpoint is required (or --quick)")
    if args.schedule is not None:
        from deebert_jax.serving.scheduler import SCHEDULES
        if args.schedule not in SCHEDULES:
            p.error(f"--schedule {args.schedule!r}; expected one of {', '.join(SCHEDULES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from deebert_jax.cpu.process import setup_process
    setup_process()   # process-wide settings, before JAX runs anything
    from deebert_jax.core.fileutil import check_outputs, with_siblings
    from deebert_jax.data import glue as data
    from deebert_jax.weights.checkpoint import MODEL_DIR_FILES
    from benchmarks import results as report
    from benchmarks import serving as bench
    from benchmarks import serving_report

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(bench.MODES))
    if unknown:
        raise InputError(f"--modes: unknown {unknown}; expected some of {list(bench.MODES)}")
    # Before any server starts: the JSON, its .md and .png are neither directories nor files read here.
    dev = data.glue_file("sst2", "dev", args.glue_dir) if args.glue_dir and not args.quick else None
    check_outputs(with_siblings("--out", args.out, table=".md", plot=".png"),
                  {"--checkpoint": None if args.quick else args.checkpoint, "--glue-dir (dev)": dev},
                  reads={"--checkpoint": MODEL_DIR_FILES})
    if not args.quick:   # the servers' length, resolved and checked before any of them starts
        from deebert_jax.inference.model_dir import resolve_max_seq_length
        from deebert_jax.weights.checkpoint import read_model_config
        config = read_model_config(args.checkpoint)
        args.max_seq_length, why = resolve_max_seq_length(args.max_seq_length, config, args.checkpoint,
                                                          data.load_tokenizer(args.checkpoint, config))
        if why != "given":
            print(f"max sequence length {args.max_seq_length}: {why}", flush=True)
    elif args.max_seq_length is None:
        args.max_seq_length = 64
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    options = dict(rates=args.rates, duration_s=args.duration, max_requests=args.max_requests, repeats=args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            model_dir = os.path.join(tmp, "tiny")
            texts, labels = bench.tiny_model(model_dir)
            options = dict(rates=QUICK["rates"], duration_s=QUICK["duration"], max_requests=QUICK["max_requests"],
                           repeats=1)
        else:
            if not args.glue_dir:
                raise InputError("--glue-dir (or $GLUE_DIR) is needed for the SST-2 dev sentences")
            model_dir = args.checkpoint
            pairs, labels = data.read_texts("sst2", "dev", args.glue_dir)
            texts = [p[0] for p in pairs]
        label = args.model_label or ("a tiny random model (--quick)" if args.quick else bench.model_label(model_dir))
        result = bench.run(model_dir, texts, labels, server_command=[sys.executable, "-m", "train.serve"], env=env,
                           slo_ms=args.slo_ms, max_seq_length=args.max_seq_length, modes=modes,
                           say=lambda line: print(line, flush=True), schedule=args.schedule, label=label,
                           length_spacing=args.length_spacing, **options)
        command = report.command_line("train.benchmark_serve", sys.argv[1:])
        if not args.quick:
            command = bench.name_model(command, model_dir, label)
        paths = serving_report.write_outputs(result, args.out, command)
    print(open(paths["markdown"], encoding="utf-8").read())
    for kind, path in paths.items():
        print(f"wrote {kind}: {report.relative_paths(path)}")
    return 0


entry = functools.partial(run, main)   # the console script and `python -m`: errors as one line


if __name__ == "__main__":
    sys.exit(entry())
