"""Two-stage DeeBERT training: pure `pmap`-able steps, and the loop that runs them.

Stage 1 fine-tunes embeddings, layers and the final ramp (ramp L) on the final cross-entropy.
Stage 2 trains only the off-ramps 1..L-1 on the sum of their cross-entropies. The parameters
are split per stage into a trainable and a frozen subtree: the optimizer only ever sees the
trainable one, and the frozen one is passed through untouched, so it stays bitwise identical.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax

from deebert_jax import data as data_lib
from deebert_jax.checkpoint import (TrainCheckpointManager, is_checkpoint_dir, load_checkpoint, save_checkpoint,
                                   write_label_names)
from deebert_jax.config import DeeBertConfig
from deebert_jax.cpu_rng import fuse_threefry_on_cpu
from deebert_jax.evaluation import evaluate_ramps
from deebert_jax.metrics import metric_name
from deebert_jax.model_loading import load_initial_model, model_overrides
from deebert_jax.modeling import DeeBert
from deebert_jax.run_config import (RUN_SPEC_FILE, STAGES, check_max_seq_length, check_run_spec, compute_dtype,
                                    stage_learning_rate, stage_steps, validate_config)
from deebert_jax.runtime import AXIS, MetricsLog, maybe_initialize_distributed, pmap_devices, replicate, \
    unreplicate, workdir_lock

# Names that moved to their own modules, still importable from here.
from deebert_jax.evaluation import evaluate_ramps as evaluate, make_predict_step, pmapped_predict_step  # noqa: F401
from deebert_jax.model_loading import OVERRIDABLE_FIELDS, default_init_checkpoint, jitted_init_params  # noqa: F401
from deebert_jax.run_config import check_run_spec as _check_run_spec, parse_stages  # noqa: F401
from deebert_jax.runtime import _distributed_initialized, pmap_devices as _pmap_devices  # noqa: F401

Params = Any
log = logging.getLogger("deebert_jax.training")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss, gradient or parameter; the run stops."""


# ----------------------------------------------------------------------------------------------
# Which parameters each stage trains

def _ramp_rows(ramps: Params, rows: slice) -> Params:
    return jax.tree_util.tree_map(lambda x: x[rows], ramps)


def split_params(params: Params, stage: int, num_layers: int) -> tuple[Params, Params]:
    """-> (trainable, frozen) subtrees of `params` for `stage`.

    Stage 1: trainable = embeddings, layers and ramp L (row L-1); frozen = off-ramps (rows 0..L-2).
    Stage 2: the reverse. `merge_params` puts them back together.
    """
    L = num_layers
    final = {"ramps": _ramp_rows(params["ramps"], slice(L - 1, L))}
    offramps = {"ramps": _ramp_rows(params["ramps"], slice(0, L - 1))}
    backbone = {k: v for k, v in params.items() if k != "ramps"}
    if stage == 1:
        return {**backbone, **final}, offramps
    if stage == 2:
        return offramps, {**backbone, **final}
    raise ValueError(f"stage={stage!r}: expected 1 or 2")


def merge_params(trainable: Params, frozen: Params, stage: int) -> Params:
    """Inverse of `split_params`: ramps concatenated back in layer order (a copy, values exact)."""
    offramps, final = (frozen, trainable) if stage == 1 else (trainable, frozen)
    ramps = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b], axis=0), offramps["ramps"], final["ramps"])
    out = {k: v for k, v in {**frozen, **trainable}.items() if k != "ramps"}
    out["ramps"] = ramps
    return out


def decay_mask(params: Params) -> Params:
    """True where weight decay applies: every kernel and embedding, never biases or LayerNorm."""
    def decays(path, _):
        names = [getattr(p, "key", getattr(p, "name", "")) for p in path]
        return not (names[-1] == "bias" or any("LayerNorm" in str(n) for n in names))
    return jax.tree_util.tree_map_with_path(decays, params)


# ----------------------------------------------------------------------------------------------
# Optimizer

def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `peak` over `warmup_steps`, then linear decay to 0 at `total_steps`."""
    warmup_steps = max(0, min(int(warmup_steps), int(total_steps)))
    decay = optax.linear_schedule(peak, 0.0, max(1, total_steps - warmup_steps))
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), decay], [warmup_steps])


def make_optimizer(schedule: optax.Schedule, *, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, max_grad_norm: float | None = 1.0) -> optax.GradientTransformation:
    """AdamW with decay masked off biases and LayerNorm, after global-norm clipping (if > 0)."""
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    if max_grad_norm and max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)
    return adamw


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """Everything that defines one stage's optimizer; hashable, so compiled steps can be reused."""

    peak_learning_rate: float
    total_steps: int
    warmup_steps: int = 0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0

    def schedule(self) -> optax.Schedule:
        return learning_rate_schedule(self.peak_learning_rate, self.total_steps, self.warmup_steps)

    def optimizer(self) -> optax.GradientTransformation:
        return make_optimizer(self.schedule(), weight_decay=self.weight_decay, b1=self.b1, b2=self.b2,
                              eps=self.eps, max_grad_norm=self.max_grad_norm)


# ----------------------------------------------------------------------------------------------
# Steps

class TrainState(flax.struct.PyTreeNode):
    """step (int32 scalar), the full params tree, and the optimizer state of the trainable subtree."""

    step: jax.Array
    params: Params
    opt_state: Any


def init_train_state(params: Params, tx: optax.GradientTransformation, stage: int, num_layers: int) -> TrainState:
    params = jax.tree_util.tree_map(jnp.asarray, params)
    trainable, _ = split_params(params, stage, num_layers)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(trainable))


def stage_loss(ramp_logits: jax.Array, labels: jax.Array, stage: int) -> tuple[jax.Array, dict]:
    """ramp_logits [L, B, K], labels [B] -> (loss, metrics).

    Stage 1: mean cross-entropy of ramp L. Stage 2: sum over ramps 1..L-1 of their mean cross-entropies.
    """
    if stage == 2:
        return off_ramp_loss(ramp_logits[:-1], labels)
    ce = optax.softmax_cross_entropy_with_integer_labels(ramp_logits, labels[None, :]).mean(axis=1)  # [L]
    return _with_accuracy(ce[-1], ramp_logits[-1], labels)


def off_ramp_loss(off_ramp_logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
    """Stage 2's loss from the off-ramps' logits alone: [L-1, B, K], labels [B] -> (loss, metrics)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(off_ramp_logits, labels[None, :]).mean(axis=1)
    return _with_accuracy(ce.sum(), off_ramp_logits, labels)


def _with_accuracy(loss: jax.Array, logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
    accuracy = (jnp.argmax(logits, axis=-1) == labels).mean()
    return loss, {"loss": loss, "accuracy": accuracy}


def _across_devices(collective: Callable, tree, axis_name: str):
    """`collective(tree, axis_name)`; on one device the tree itself (the same values: a mean or
    minimum over one), skipping an all-reduce XLA's CPU backend ran as a copy of every gradient."""
    return tree if jax.lax.axis_size(axis_name) == 1 else collective(tree, axis_name)


def _all_finite(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def make_train_step(config: DeeBertConfig, tx: optax.GradientTransformation, schedule: optax.Schedule, stage: int,
                    axis_name: str = AXIS, dtype=jnp.float32) -> Callable:
    """-> `step(state, batch, dropout_key) -> (state, metrics)`, to be run under `pmap(axis_name=...)`.

    `batch` holds this device's rows: input_ids, attention_mask, token_type_ids [b, S], labels [b].
    Gradients and metrics are averaged over `axis_name`; equal per-device batches make that the
    global-batch mean. `dtype` is the compute dtype: under bfloat16 the matmuls and activations are
    bf16, while parameters, gradients, optimizer state, softmax, layer norm and the loss stay float32. Dropout uses `fold_in(fold_in(dropout_key, step), device)`, so a resumed run
    draws the same masks. Metrics: loss, accuracy, grad_norm, learning_rate, finite (1.0 when the
    loss, gradients and new parameters are all finite).
    """
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: expected 1 or 2")
    L = config.num_hidden_layers
    if stage == 2 and L < 2:
        raise ValueError("stage 2 needs at least 2 layers (there are no off-ramps to train)")
    model = DeeBert(config, dtype)
    fuse_threefry_on_cpu()  # same dropout bits, a fraction of the CPU time (cpu_rng.py)

    def step(state: TrainState, batch: Mapping[str, jax.Array], dropout_key: jax.Array):
        key = jax.random.fold_in(jax.random.fold_in(dropout_key, state.step), jax.lax.axis_index(axis_name))
        trainable, frozen = split_params(state.params, stage, L)

        def loss_fn(trainable):
            # Stage 2 trains the off-ramps alone: the model skips layer L and ramp L.
            logits = model.apply({"params": merge_params(trainable, frozen, stage)}, batch["input_ids"],
                                 batch["attention_mask"], batch["token_type_ids"], train=True,
                                 stop_backbone_gradient=(stage == 2), off_ramps_only=(stage == 2),
                                 rngs={"dropout": key})
            return off_ramp_loss(logits, batch["labels"]) if stage == 2 else stage_loss(logits, batch["labels"], 1)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        grads = _across_devices(jax.lax.pmean, grads, axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = _across_devices(jax.lax.pmean, metrics, axis_name)
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]) & _all_finite(trainable)
        metrics["finite"] = _across_devices(jax.lax.pmin, finite.astype(jnp.float32), axis_name)
        new_state = TrainState(step=state.step + 1, params=merge_params(trainable, frozen, stage), opt_state=opt_state)
        return new_state, metrics

    return step


@functools.lru_cache(maxsize=8)
def pmapped_train_step(config: DeeBertConfig, stage: int, settings: OptimizerSettings, devices: tuple | None = None,
                       dtype: str = "float32"):
    """-> (pmapped step with the state donated, its optimizer). Cached: a second run in the same
    process with the same model, stage, settings and compute dtype reuses the compiled step."""
    tx = settings.optimizer()
    step = make_train_step(config, tx, settings.schedule(), stage, dtype=jnp.dtype(dtype))
    return jax.pmap(step, axis_name=AXIS, devices=devices, donate_argnums=(0,)), tx


# ----------------------------------------------------------------------------------------------
# The training run

@dataclasses.dataclass
class RunContext:
    cfg: Any
    workdir: str
    task: str
    config: DeeBertConfig
    train: dict
    dev: dict
    tokenizer: Any
    devices: list
    log: MetricsLog
    on_step: Callable | None = None
    params: Params = None   # the model as the run goes: the start, then after each stage


def _save_model(ctx: RunContext, directory: str, params: Params) -> None:
    """A model directory others can use alone: checkpoint + `tokenizer/` (host 0 writes)."""
    if jax.process_index() != 0:
        return
    names = data_lib.label_names(ctx.task)

    def write_extra(tmp):
        if ctx.tokenizer is not None:
            ctx.tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        if len(names) == ctx.config.num_labels:  # so predictions say "positive", not "LABEL_1"
            write_label_names(tmp, names)
    # The tokenizer and labels go in with the same atomic rename: a stage directory is complete or absent.
    save_checkpoint(directory, ctx.config, params, write_extra=write_extra)


def run_stage(ctx: RunContext, stage: int, params: Params) -> Params:
    """Trains one stage from `params` (or resumes it from its latest checkpoint) -> final params."""
    from tqdm.auto import tqdm

    cfg, config = ctx.cfg, ctx.config
    n_dev = len(ctx.devices)
    global_batch = int(cfg.per_device_batch_size) * jax.device_count()
    total = stage_steps(cfg, stage, data_lib.num_examples(ctx.train), global_batch)
    settings = OptimizerSettings(stage_learning_rate(cfg, stage), total,
                                 int(round(float(cfg.get("warmup_ratio", 0.0)) * total)), float(cfg.weight_decay),
                                 float(cfg.adam_b1), float(cfg.adam_b2), float(cfg.adam_eps), float(cfg.max_grad_norm))
    dtype = compute_dtype(cfg)
    p_step, tx = pmapped_train_step(config, stage, settings, pmap_devices(ctx.devices), dtype)
    state = init_train_state(params, tx, stage, config.num_hidden_layers)
    manager = TrainCheckpointManager(os.path.join(ctx.workdir, "checkpoints", f"stage{stage}"),
                                     max_to_keep=int(cfg.keep_checkpoints))
    start = manager.latest_step() or 0
    # What decides the trajectory; a resumed run must agree with it to end where the first would have.
    run_spec = {"optimizer": dataclasses.asdict(settings), "model": config.to_dict(), "seed": int(cfg.seed),
                "global_batch_size": global_batch, "task": ctx.task,
                "train_examples": data_lib.num_examples(ctx.train), "max_seq_length": int(cfg.max_seq_length),
                "dtype": dtype}
    check_run_spec(os.path.join(manager.directory, RUN_SPEC_FILE), run_spec, resuming=bool(start))
    if start:
        # The newest intact step: a damaged one (a file cut short or lost) is set aside with a warning.
        start, restored = manager.restore_latest(state)
        state = jax.tree_util.tree_map(jnp.asarray, restored)
        log.info("stage %d: resumed from step %d (%s)", stage, start, manager.directory)
    ctx.log.drop_after(stage, start)  # what an earlier run logged past its last checkpoint is logged again

    state = replicate(state, ctx.devices)
    dropout_key = replicate(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), stage), ctx.devices)
    data_seed = int(cfg.seed) * 10 + stage
    save_every = int(cfg.save_every_steps)
    log_every = max(1, int(cfg.log_every_steps))
    bar = tqdm(total=total, initial=start, desc=f"stage {stage}", disable=jax.process_index() != 0,
               dynamic_ncols=True)
    tick, tick_step = time.perf_counter(), start
    try:
        for step in range(start, total):
            batch = data_lib.train_batch(ctx.train, global_batch, data_seed, step,
                                         jax.process_index(), jax.process_count())
            state, metrics = p_step(state, data_lib.shard(batch, n_dev), dropout_key)
            metrics = {k: float(v[0]) for k, v in jax.device_get(metrics).items()}
            done = step + 1
            if metrics["finite"] < 1.0 or not math.isfinite(metrics["loss"]):
                last = manager.latest_step()
                raise NonFiniteLossError(
                    f"stage {stage}, step {done}: loss is {metrics['loss']} (grad norm {metrics['grad_norm']}); "
                    f"stopping without saving this step. Last good checkpoint: "
                    f"{os.path.join(manager.directory, str(last)) if last else 'none'}")
            bar.update(1)
            if done % log_every == 0 or done == total:
                now = time.perf_counter()
                rate = (done - tick_step) * global_batch / max(now - tick, 1e-9)
                tick, tick_step = now, done
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}",
                                ex_s=f"{rate:.1f}")
                record = {"event": "train", "stage": stage, "step": done, "examples_per_second": rate,
                          **{k: metrics[k] for k in ("loss", "accuracy", "learning_rate", "grad_norm")}}
                ctx.log.write(record, {f"stage{stage}/train/{k}": record[k] for k in
                                       ("loss", "accuracy", "learning_rate", "grad_norm", "examples_per_second")}, done)
            if (save_every > 0 and done % save_every == 0) or done == total:
                manager.save(done, unreplicate(state))
            if ctx.on_step is not None:
                ctx.on_step(stage, done)
    finally:
        bar.close()
        manager.close()
    return unreplicate(state.params)


def evaluate_stage(ctx: RunContext, stage: int, params: Params, step: int) -> dict:
    """Dev metrics after `stage`: the final ramp after stage 1; every ramp after stage 2."""
    result = evaluate_ramps(ctx.config, params, ctx.dev, ctx.task, int(ctx.cfg.eval_batch_size), devices=ctx.devices,
                      progress=jax.process_index() == 0)
    name = metric_name(ctx.task)
    record = {"event": "eval", "stage": stage, "step": step, "task": ctx.task, "metric": name,
              "num_examples": result["num_examples"], "final": result["ramps"][-1]}
    scalars = {f"stage{stage}/eval/final_{k}": v for k, v in result["ramps"][-1].items()}
    if stage == 2:
        record["ramps"] = [{"layer": i + 1, **m} for i, m in enumerate(result["ramps"])]
        scalars.update({f"stage2/eval/ramp{i + 1}_{name}": m[name] for i, m in enumerate(result["ramps"])})
    ctx.log.write(record, scalars, step)
    return record


def train(cfg, *, on_step: Callable[[int, int], None] | None = None) -> dict:
    """Runs the configured stages into `cfg.workdir`, resuming whatever a previous run left there.

    Writes `workdir/stage1`, `workdir/stage2` (each stage's final model + tokenizer), `workdir/model`
    (the last stage's), `checkpoints/stage{n}/<step>`, `metrics.jsonl` and `tensorboard/`, holding
    `workdir/.lock` throughout (a second run on the workdir fails at once). A config that cannot
    run fails before any work. `on_step(stage, step)` is called after every step (tests use it to
    interrupt a run). -> {"workdir", "model", "eval": {stage: eval record}}.
    """
    maybe_initialize_distributed(cfg.get("multihost", "auto"))
    stages = validate_config(cfg)
    task = data_lib.canonical_task(cfg.task)
    workdir = os.path.abspath(os.path.expanduser(cfg.workdir))
    with workdir_lock(workdir):
        ctx = _prepare(cfg, workdir, task, stages, on_step)
        evals = {}
        try:
            for stage in stages:
                stage_dir = os.path.join(workdir, f"stage{stage}")
                if is_checkpoint_dir(stage_dir):
                    log.info("stage %d: already complete in %s, skipping", stage, stage_dir)
                    _, ctx.params = load_checkpoint(stage_dir)
                    continue
                ctx.params = run_stage(ctx, stage, ctx.params)
                total = stage_steps(cfg, stage, data_lib.num_examples(ctx.train),
                                    int(cfg.per_device_batch_size) * jax.device_count())
                evals[stage] = evaluate_stage(ctx, stage, ctx.params, total)
                _save_model(ctx, stage_dir, ctx.params)
            _save_model(ctx, os.path.join(workdir, "model"), ctx.params)
        finally:
            ctx.log.close()
    return {"workdir": workdir, "model": os.path.join(workdir, "model"), "eval": evals}


def _prepare(cfg, workdir: str, task: str, stages: tuple[int, ...], on_step) -> RunContext:
    """The starting model, its tokenizer and both splits -> the run's context (with `params`)."""
    config, params, init_dir = load_initial_model(cfg, data_lib.num_labels(task))
    if 2 in stages and 1 not in stages and is_checkpoint_dir(os.path.join(workdir, "stage1")):
        # Stage 2 alone continues from this workdir's stage 1 when there is one.
        config, params = load_checkpoint(os.path.join(workdir, "stage1"))
        config = config.replace(**model_overrides(cfg))
        init_dir = os.path.join(workdir, "stage1")
    check_max_seq_length(cfg, config.max_sequence_length, f"the model's {config.sequence_limit}")
    tokenizer = None
    if task != "synthetic":
        tokenizer_source = cfg.get("tokenizer", "") or init_dir
        tokenizer = data_lib.load_tokenizer(tokenizer_source)
        if len(tokenizer) > config.vocab_size:  # ids past the embedding table would turn into NaNs
            raise ValueError(f"tokenizer {tokenizer_source} has {len(tokenizer)} tokens, more than the model's "
                             f"vocab_size={config.vocab_size}")
    glue_dir = cfg.get("glue_dir", "") or os.environ.get("GLUE_DIR") or None
    common = dict(glue_dir=glue_dir, tokenizer=tokenizer, max_seq_length=int(cfg.max_seq_length),
                  vocab_size=config.vocab_size, seed=int(cfg.seed))
    train_arrays = data_lib.load_split(task, "train", limit=cfg.get("train_limit", 0) or None, **common)
    dev_arrays = data_lib.load_split(task, "dev", limit=cfg.get("eval_limit", 0) or None, **common)
    if jax.process_count() > 1:
        dev_arrays = data_lib.host_eval_rows(dev_arrays, jax.process_index(), jax.process_count())
    log.info("task %s: train %s; dev %s", task, data_lib.describe(train_arrays), data_lib.describe(dev_arrays))
    return RunContext(cfg, workdir, task, config, train_arrays, dev_arrays, tokenizer, jax.local_devices(),
                      MetricsLog(workdir), on_step, params)
