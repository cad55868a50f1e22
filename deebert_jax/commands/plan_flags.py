"""The dry-run flags and run that `deebert-plan` (`train.plan`) and `deebert-train --dry-run` share."""

from __future__ import annotations

import sys

from absl import flags as absl_flags
from ml_collections import config_flags

from deebert_jax.core.errors import InputError


class PlanFlags:
    """The dry-run flags `train.plan` and `train.train --dry-run` share (absl)."""

    def __init__(self, topology_required: bool, define_debug: bool):
        self._flags = absl_flags.FLAGS
        absl_flags.DEFINE_string("topology", None, "the Cloud TPU slice, as libtpu names it: v5e:2x4, v4:2x2x4, v6e:2x4, "
                            "v5p:2x2x1" + ("" if topology_required else " (with --dry-run)"))
        absl_flags.DEFINE_string("out", None, "also write the plan as JSON here")
        absl_flags.DEFINE_list("programs", ["train", "predict", "serve"], "which programs: train (the stages' steps), "
                          "predict (eval forward, early_exit_predict, exit_aware_predict), serve (the engine's)")
        absl_flags.DEFINE_integer("train-examples", None, "training rows before the held-out ones (default: the task's "
                             "public train split, less config.calibration_holdout, at most config.train_limit)",
                             lower_bound=1)
        absl_flags.DEFINE_integer("global-batch-size", None, "split over the slice's chips (default: "
                             "config.per_device_batch_size per chip)", lower_bound=1)
        absl_flags.DEFINE_bool("largest-batch", False, "also find the largest per-chip batch that fits (two compiles "
                          "and a confirming one per stage; done anyway when a step does not fit)")
        absl_flags.DEFINE_integer("serve-max-seq-length", None, "the serving programs' longest padded length "
                             "(default config.max_seq_length)", lower_bound=1)
        if define_debug:
            absl_flags.DEFINE_bool("debug", False, "on an error, show the traceback instead of one line")

    def __getattr__(self, name):
        return self._flags[name.replace("_", "-") if name.replace("_", "-") in self._flags else name].value

    def options(self) -> dict:
        return {"groups": tuple(self.programs), "train_examples": self.train_examples,
                "global_batch_size": self.global_batch_size, "find_largest_batch": self.largest_batch,
                "serve_max_seq_length": self.serve_max_seq_length}


def define_plan_flags(topology_required: bool = False, define_debug: bool = True) -> PlanFlags:
    return PlanFlags(topology_required, define_debug)


def run_dry_run(cfg, flags: PlanFlags) -> int:
    """The dry run both commands make: compile for `--topology`, print the table (and write `--out`)."""
    if not flags.topology:
        raise InputError("--topology is required, e.g. --topology v5e:2x4 (a Cloud TPU slice to plan for)")
    from deebert_jax.cpu.process import setup_process
    # The programs are the TPU's ("reference" kernels): no CPU lowering is registered.
    setup_process(kernels="reference")
    from deebert_jax.planning.plan import PlanRefusal, dry_run   # imports JAX: after setup_process

    say = lambda text: print(text, file=sys.stderr, flush=True)
    try:
        _, table = dry_run(cfg, flags.topology, out=flags.out, config_path=_config_path(), say=say, **flags.options())
    except PlanRefusal as e:
        print(e.table)
        raise
    print(table)
    if flags.out:
        print(f"plan: {flags.out}")
    return 0


def _config_path() -> str | None:
    """The file `--config` names (its `:ARGS` cut off)."""
    name = config_flags.get_config_filename(absl_flags.FLAGS["config"])
    return name.split(":", 1)[0] if name else None
