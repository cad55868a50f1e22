"""Two-stage DeeBERT training.

    python -m train.train --config configs/tiny.py
    python -m train.train --config configs/glue.py:model=minilm,budget=paper --config.task=SST-2 --config.workdir=DIR
    python -m train.train --config configs/glue.py:model=bert_base --dry-run --topology v5e:2x4   # = train.plan

Started again on the same workdir it resumes from the latest checkpoint. A bad config, bad data
or a NaN loss ends with one line `error: ...` and exit status 1 (`--debug`: the traceback).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys

from deebert_jax.commands import cli
from deebert_jax.commands.config_file import add_config_argument, parse_args_with_config
from deebert_jax.commands.plan_flags import add_plan_flags, run_dry_run


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.train", description=__doc__.split("\n\n")[0])
    add_config_argument(parser, help="training config file (configs/*.py[:ARGS])")
    parser.add_argument("--dry-run", action="store_true",
                        help="train nothing: compile the run for --topology, a Cloud TPU slice, and report what it "
                             "needs (train.plan)")
    add_plan_flags(parser)
    parser.add_argument(cli.DEBUG_FLAG, action="store_true", help="on an error, show the traceback instead of one line")
    args = parse_args_with_config(parser, argv)
    if args.config is None:
        parser.error("--config is required, e.g. --config configs/tiny.py")
    if args.topology and not args.dry_run:
        parser.error("--topology plans a run without training: add --dry-run (or use train.plan)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return run_dry_run(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save at INFO
    from deebert_jax.cpu.process import setup_process
    setup_process()   # process-wide settings, before JAX runs anything
    from deebert_jax.training import loop as training

    result = training.train(args.config)
    for stage, record in result["eval"].items():
        final = record["final"]
        print(f"stage {stage}: dev {record['metric']} of the final ramp = {final[record['metric']]:.4f} "
              f"({record['num_examples']} examples)")
        for ramp in record.get("ramps", []):
            print(f"  ramp {ramp['layer']}: {record['metric']} = {ramp[record['metric']]:.4f}")
    print(f"model: {result['model']}")
    return 0


entry = functools.partial(cli.run, main)   # the console script and `python -m`: errors as one line


if __name__ == "__main__":
    sys.exit(entry())
