"""Two-stage DeeBERT training.

    python -m train.train --config configs/tiny.py
    python -m train.train --config configs/glue.py:model=minilm,budget=paper --config.task=SST-2 --config.workdir=DIR
    python -m train.train --config configs/glue.py:model=bert_base --dry-run --topology v5e:2x4   # = train.plan

Started again on the same workdir it resumes from the latest checkpoint. A bad config, bad data
or a NaN loss ends with one line `error: ...` and exit status 1 (`--debug`: the traceback).
"""

import functools
import logging

from absl import app, flags
from ml_collections import config_flags

from deebert_jax.commands import cli
from deebert_jax.commands.plan_flags import define_plan_flags, run_dry_run

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py[:ARGS])",
                                          lock_config=True)
_DEBUG = flags.DEFINE_bool("debug", False, "on an error, show the traceback instead of one line")
_DRY_RUN = flags.DEFINE_bool("dry-run", False, "train nothing: compile the run for --topology, a Cloud TPU slice, "
                             "and report what it needs (train.plan)")
_PLAN = define_plan_flags(define_debug=False)


def _train(argv) -> int:
    if argv:
        raise app.UsageError(f"unexpected arguments: {argv}")
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config configs/tiny.py")
    if _DRY_RUN.value:
        return run_dry_run(cfg, _PLAN)
    if _PLAN.topology:
        raise app.UsageError("--topology plans a run without training: add --dry-run (or use train.plan)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save at INFO
    from deebert_jax.cpu.process import setup_process
    setup_process()   # process-wide settings, before JAX runs anything
    from deebert_jax.training import loop as training

    result = training.train(cfg)
    for stage, record in result["eval"].items():
        final = record["final"]
        print(f"stage {stage}: dev {record['metric']} of the final ramp = {final[record['metric']]:.4f} "
              f"({record['num_examples']} examples)")
        for ramp in record.get("ramps", []):
            print(f"  ramp {ramp['layer']}: {record['metric']} = {ramp[record['metric']]:.4f}")
    print(f"model: {result['model']}")
    return 0


def main(argv):
    # absl has parsed the flags (--debug among them); cli.run gives the one-line error convention.
    return cli.run(_train, argv[1:] + ([cli.DEBUG_FLAG] if _DEBUG.value else []))


# The console script and `python -m`: absl parses the flags and exits with `main`'s status.
entry = functools.partial(cli.run_absl, main)


if __name__ == "__main__":
    entry()
