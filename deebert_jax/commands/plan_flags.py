"""The dry-run flags and run that `deebert-plan` (`train.plan`) and `deebert-train --dry-run` share."""

from __future__ import annotations

import argparse
import sys

from deebert_jax.commands.cli import positive_int
from deebert_jax.core.errors import InputError


def names(text: str) -> list[str]:
    """'train,predict' -> ['train', 'predict'] (an argparse type)."""
    return [x for x in text.replace(",", " ").split() if x]


def add_plan_flags(parser: argparse.ArgumentParser, topology_required: bool = False) -> None:
    """The dry-run flags `train.plan` and `train.train --dry-run` share."""
    parser.add_argument("--topology", default=None,
                        help="the Cloud TPU slice, as libtpu names it: v5e:2x4, v4:2x2x4, v6e:2x4, v5p:2x2x1"
                             + ("" if topology_required else " (with --dry-run)"))
    parser.add_argument("--out", default=None, help="also write the plan as JSON here")
    parser.add_argument("--programs", type=names, default=["train", "predict", "serve"],
                        help="which programs: train (the stages' steps), predict (eval forward, early_exit_predict, "
                             "exit_aware_predict), serve (the engine's); default: all three")
    parser.add_argument("--train-examples", type=positive_int, default=None,
                        help="training rows before the held-out ones (default: the task's public train split, "
                             "less config.calibration_holdout, at most config.train_limit)")
    parser.add_argument("--global-batch-size", type=positive_int, default=None,
                        help="split over the slice's chips (default: config.per_device_batch_size per chip)")
    parser.add_argument("--largest-batch", action="store_true",
                        help="also find the largest per-chip batch that fits (two compiles and a confirming one "
                             "per stage; done anyway when a step does not fit)")
    parser.add_argument("--serve-max-seq-length", type=positive_int, default=None,
                        help="the serving programs' longest padded length (default config.max_seq_length)")


def plan_options(args: argparse.Namespace) -> dict:
    return {"groups": tuple(args.programs), "train_examples": args.train_examples,
            "global_batch_size": args.global_batch_size, "find_largest_batch": args.largest_batch,
            "serve_max_seq_length": args.serve_max_seq_length}


def run_dry_run(args: argparse.Namespace) -> int:
    """The dry run both commands make: compile `args.config` for `--topology`, print the table
    (and write `--out`)."""
    if not args.topology:
        raise InputError("--topology is required, e.g. --topology v5e:2x4 (a Cloud TPU slice to plan for)")
    from deebert_jax.cpu.process import setup_process
    # The programs are the TPU's ("reference" kernels): no CPU lowering is registered.
    setup_process(kernels="reference")
    from deebert_jax.planning.plan import PlanRefusal, dry_run   # imports JAX: after setup_process

    say = lambda text: print(text, file=sys.stderr, flush=True)
    config_path = args.config_file.split(":", 1)[0] if args.config_file else None
    try:
        _, table = dry_run(args.config, args.topology, out=args.out, config_path=config_path, say=say,
                           **plan_options(args))
    except PlanRefusal as e:
        print(e.table)
        raise
    print(table)
    if args.out:
        print(f"plan: {args.out}")
    return 0
