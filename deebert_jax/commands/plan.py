"""A dry run on a Cloud TPU slice, before renting one: every program of the run compiled by the
TPU compiler for the slice, with HBM per chip, FLOPs, collectives and estimated times.

    python -m train.plan --config configs/glue.py:model=bert_base --topology v5e:2x4
    python -m train.plan --config configs/tiny.py --topology v4:2x2x4 --out plan.json
    python -m train.train --config configs/glue.py:model=bert_base --dry-run --topology v5e:2x4   # the same

Needs libtpu (`pip install 'deebert-jax[tpu]'`); no TPU. A run that does not fit ends with one
line `error: ...` naming the config field and what would fit, after the table (exit status 1).
Times are estimates (roofline floors from the compiler's analysis), never measurements.
"""

import functools

from absl import app
from ml_collections import config_flags

from deebert_jax.commands import cli
from deebert_jax.commands.plan_flags import define_plan_flags, run_dry_run

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py[:ARGS])",
                                          lock_config=True)
_PLAN = define_plan_flags(topology_required=True, define_debug=True)


def _plan(argv) -> int:
    if argv:
        raise app.UsageError(f"unexpected arguments: {argv}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config configs/tiny.py")
    return run_dry_run(_CONFIG.value, _PLAN)


def main(argv):
    return cli.run(_plan, argv[1:] + ([cli.DEBUG_FLAG] if _PLAN.debug else []))


# The console script and `python -m`: absl parses the flags and exits with `main`'s status.
entry = functools.partial(cli.run_absl, main)


if __name__ == "__main__":
    entry()
