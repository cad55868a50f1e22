"""A dry run on a Cloud TPU slice, before renting one: every program of the run compiled by the
TPU compiler for the slice, with HBM per chip, FLOPs, collectives and estimated times.

    python -m train.plan --config configs/glue.py:model=bert_base --topology v5e:2x4
    python -m train.plan --config configs/tiny.py --topology v4:2x2x4 --out plan.json
    python -m train.train --config configs/glue.py:model=bert_base --dry-run --topology v5e:2x4   # the same

Needs libtpu (`pip install 'deebert-jax[tpu]'`); no TPU. A run that does not fit ends with one
line `error: ...` naming the config field and what would fit, after the table (exit status 1).
Times are estimates (roofline floors from the compiler's analysis), never measurements.
"""

from __future__ import annotations

import argparse
import functools
import sys

from deebert_jax.commands import cli
from deebert_jax.commands.config_file import add_config_argument, parse_args_with_config
from deebert_jax.commands.plan_flags import add_plan_flags, run_dry_run


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.plan", description=__doc__.split("\n\n")[0])
    add_config_argument(parser, help="training config file (configs/*.py[:ARGS])")
    add_plan_flags(parser, topology_required=True)
    parser.add_argument(cli.DEBUG_FLAG, action="store_true", help="on an error, show the traceback instead of one line")
    args = parse_args_with_config(parser, argv)
    if args.config is None:
        parser.error("--config is required, e.g. --config configs/tiny.py")
    return args


def main(argv=None) -> int:
    return run_dry_run(parse_args(argv))


entry = functools.partial(cli.run, main)   # the console script and `python -m`: errors as one line


if __name__ == "__main__":
    sys.exit(entry())
