"""Reading a training config (`configs/*.py`): which stages, how many steps, and whether it is sane.

`validate_config` runs before a run does any work, so a typo in a field fails in a second with
a message naming `config.FIELD` and its value instead of after minutes of model loading.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Mapping

import jax

from deebert_jax.core.errors import InputError
from deebert_jax.data import batching
from deebert_jax.core.config import DeeBertConfig
from deebert_jax.training.losses import OffRampLoss
from deebert_jax.inference.early_exit import EXIT_RULES
from deebert_jax.evaluation.ramp_temperature import CHOICES

STAGES = (1, 2)
RUN_SPEC_FILE = "run_spec.json"


def parse_stages(stages) -> tuple[int, ...]:
    """'1,2' / '1' / 2 / (1, 2) -> sorted tuple of stages."""
    if isinstance(stages, int):
        items = [stages]
    elif isinstance(stages, str):
        items = [s for s in stages.replace(" ", "").split(",") if s]
    else:
        items = list(stages)
    try:
        out = tuple(sorted({int(s) for s in items}))
    except ValueError:
        out = ()
    if not out or any(s not in STAGES for s in out):
        raise InputError(f"stages={stages!r}: expected '1', '2' or '1,2'")
    return out


def _epochs(cfg, stage: int) -> float:
    return float(cfg.get(f"stage{stage}_epochs", cfg.get("num_epochs", 3)))


def stage_steps(cfg, stage: int, n_train: int, global_batch: int) -> int:
    """Steps of `stage`: `steps_per_stage` when positive, else epochs x full batches per epoch."""
    fixed = int(cfg.get("steps_per_stage", 0) or 0)
    if fixed > 0:
        return fixed
    return max(1, int(math.ceil(_epochs(cfg, stage) * batching.steps_per_epoch(n_train, global_batch))))


def stage_learning_rate(cfg, stage: int) -> float:
    """Stage 1: `learning_rate`; stage 2: `stage2_learning_rate` (default: `learning_rate`)."""
    return float(cfg.learning_rate if stage == 1 else cfg.get("stage2_learning_rate", cfg.learning_rate))


def _number(cfg, field: str, ok, expected: str, default=None) -> float:
    value = cfg.get(field, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and ok(number)):
        raise InputError(f"config.{field}={value!r}: expected {expected}")
    return number


def validate_config(cfg) -> tuple[int, ...]:
    """Checks the fields a run reads -> its stages; a bad field is a ValueError naming `config.FIELD`.

    `max_seq_length` is checked against the model's longest input (`max_position_embeddings`,
    less RoBERTa's offset) by `check_max_seq_length` once the model's config is known.
    """
    if not cfg.get("workdir"):
        raise InputError("config.workdir is empty: say where to write the run (--config.workdir=DIR)")
    try:
        stages = parse_stages(cfg.get("stages", "1,2"))
    except ValueError as e:
        raise InputError(f"config.{e}") from None
    positive, at_least_1, non_negative = (lambda x: x > 0), (lambda x: x >= 1 and x == int(x)), (lambda x: x >= 0)
    _number(cfg, "learning_rate", positive, "a finite number > 0")
    if 2 in stages:
        _number(cfg, "stage2_learning_rate", positive, "a finite number > 0", cfg.get("learning_rate"))
    for field in ("per_device_batch_size", "eval_batch_size", "max_seq_length", "keep_checkpoints"):
        _number(cfg, field, at_least_1, "an integer >= 1")
    steps = _number(cfg, "steps_per_stage", lambda x: x >= 0 and x == int(x), "an integer >= 0", 0)
    for stage in stages:
        field = f"stage{stage}_epochs" if f"stage{stage}_epochs" in cfg else "num_epochs"
        epochs = _number(cfg, field, non_negative, "a number >= 0", 3)
        if epochs == 0 and steps == 0:
            raise InputError(f"config.{field}=0 and config.steps_per_stage=0: stage {stage} would train for no "
                             f"steps; set one of them above 0")
    _number(cfg, "warmup_ratio", lambda x: 0 <= x <= 1, "a number in [0, 1]", 0.0)
    compute_dtype(cfg)
    offramp_loss(cfg)
    calibration_budget(cfg)
    ramp_temperature_rows(cfg)
    for field in ("weight_decay", "save_every_steps", "log_every_steps", "train_limit", "eval_limit",
                  "calibration_holdout"):
        _number(cfg, field, non_negative, "a number >= 0", 0)
    return stages


COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype(cfg) -> str:
    """`config.dtype`: what the training step computes in ("float32" when absent). Under
    "bfloat16" parameters, optimizer state, softmax, loss and checkpoints stay float32."""
    value = cfg.get("dtype", "float32")
    if value not in COMPUTE_DTYPES:
        raise InputError(f"config.dtype={value!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
    return value


def offramp_loss(cfg) -> OffRampLoss:
    """`config.offramp_loss` ("labels" when absent), `distill_temperature`, `distill_weight`."""
    kind = cfg.get("offramp_loss", "labels")
    if kind not in ("labels", "distill"):
        raise InputError(f"config.offramp_loss={kind!r}: expected 'labels' or 'distill'")
    if kind == "labels":
        return OffRampLoss()
    temperature = _number(cfg, "distill_temperature", lambda x: x > 0, "a finite number > 0", 2.0)
    weight = _number(cfg, "distill_weight", lambda x: 0 <= x <= 1, "a number in [0, 1]", 0.5)
    return OffRampLoss(kind, temperature, weight)


@dataclasses.dataclass(frozen=True)
class CalibrationBudget:
    """What the end-of-training calibration on the held-out rows chooses within."""
    holdout: int
    max_drop: float
    confidence: float | None   # None: the empirical choice, no guarantee
    rule: str


def calibration_budget(cfg) -> CalibrationBudget:
    """`config.calibration_*` (holdout 0: no calibration after training)."""
    holdout = int(_number(cfg, "calibration_holdout", lambda x: x >= 0 and x == int(x), "an integer >= 0", 0))
    max_drop = _number(cfg, "calibration_max_drop", lambda x: x >= 0, "a number of points >= 0", 1.0)
    confidence = _number(cfg, "calibration_confidence", lambda x: 0 <= x < 1, "a number in [0, 1) (0: no guarantee)",
                         0.95)
    rule = cfg.get("calibration_rule", "entropy")
    if rule not in EXIT_RULES:
        raise InputError(f"config.calibration_rule={rule!r}: expected one of {', '.join(sorted(EXIT_RULES))}")
    return CalibrationBudget(holdout, max_drop, confidence or None, rule)


def ramp_temperature_rows(cfg) -> int:
    """`config.ramp_temperature` ("none" when absent) -> how many of the first held-out rows fit
    the off-ramp temperatures (0: none fitted); they must leave rows to calibrate on."""
    kind = cfg.get("ramp_temperature", "none")
    if kind not in CHOICES:
        raise InputError(f"config.ramp_temperature={kind!r}: expected one of {', '.join(CHOICES)}")
    if kind == "none":
        return 0
    rows = int(_number(cfg, "temperature_rows", lambda x: x >= 1 and x == int(x), "an integer >= 1", 1000))
    holdout = calibration_budget(cfg).holdout
    if rows >= holdout:
        raise InputError(f"config.ramp_temperature={kind!r} fits on the first config.temperature_rows={rows} of the "
                         f"config.calibration_holdout={holdout} held-out rows and calibrates on the rest: hold out "
                         f"more than {rows} rows")
    return rows


def check_max_seq_length(cfg, max_position_embeddings: int, limit_text: str = "the model's max_position_embeddings") -> None:
    """`cfg.max_seq_length` in [1, `max_position_embeddings`]: the model's longest input
    (`DeeBertConfig.max_sequence_length`, which `limit_text` explains)."""
    _number(cfg, "max_seq_length", lambda x: 1 <= x <= max_position_embeddings and x == int(x),
            f"an integer in [1, {max_position_embeddings}] ({limit_text})")


# ----------------------------------------------------------------------------------------------
# Resuming: the settings that decide a stage's trajectory must not change between runs

# Run-spec entries newer than the first checkpoints, with the value every earlier run had.
RUN_SPEC_FIELDS_ADDED = {"dtype": "float32", "offramp_loss": "labels"}


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


def check_run_spec(path: str, spec: dict, resuming: bool, finished: bool = False) -> None:
    """Writes the stage's run spec; on resume, a spec that differs is an error naming the fields.
    `finished`: the stage is complete and would be reused; only checked (nothing is written, and
    a stage without a recorded spec, e.g. copied from another workdir, is taken as it is)."""
    spec = json.loads(json.dumps(spec))  # the JSON view, so tuples and lists compare alike
    if finished and not os.path.isfile(path):
        return
    if resuming and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        before, now = _flatten(old), _flatten(spec)
        # A field added after that run started (`model_type`, `dtype`) is absent from its spec: at
        # its default it is the run that was started.
        added = {f"model.{f.name}": f.default for f in dataclasses.fields(DeeBertConfig)}
        added.update(RUN_SPEC_FIELDS_ADDED)
        diff = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)
                and not (k not in before and k in added and now.get(k) == added[k])]
        if diff and finished:
            raise InputError(f"{path}: this workdir's finished stage was trained with different settings "
                             f"({', '.join(diff)}); run again with the same config or use a fresh workdir")
        if diff:
            raise InputError(f"{path}: this workdir's checkpoints were written by a run with different settings "
                             f"({', '.join(diff)}); resume with the same config or use a fresh workdir")
        return
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(spec, f, indent=2, sort_keys=True)
