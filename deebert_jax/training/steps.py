"""Two-stage DeeBERT training steps: which parameters each stage trains, the optimizer, the
losses, and the pure `pmap`-able step.

Stage 1 fine-tunes embeddings, layers and the final ramp (ramp L) on the final cross-entropy.
Stage 2 trains only the off-ramps 1..L-1, on the sum of their cross-entropies or with ramp L's
soft predictions mixed in (`training.losses.OffRampLoss`). The parameters
are split per stage into a trainable and a frozen subtree: the optimizer only ever sees the
trainable one, and the frozen one is passed through untouched, so it stays bitwise identical.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax

from deebert_jax.core.config import DeeBertConfig
from deebert_jax.core.errors import InputError
from deebert_jax.core.runtime import AXIS
from deebert_jax.model.modeling import DeeBert
from deebert_jax.training.losses import LABELS, OffRampLoss, off_ramp_loss, stage_loss  # noqa: F401 (public here)
from deebert_jax.training.run_config import STAGES, stage_learning_rate

Params = Any


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
    raise InputError(f"stage={stage!r}: expected 1 or 2")


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


def stage_optimizer_settings(cfg, stage: int, total_steps: int) -> OptimizerSettings:
    """A training config's optimizer for `stage` over `total_steps` (warmup a share of them)."""
    return OptimizerSettings(stage_learning_rate(cfg, stage), total_steps,
                             int(round(float(cfg.get("warmup_ratio", 0.0)) * total_steps)), float(cfg.weight_decay),
                             float(cfg.adam_b1), float(cfg.adam_b2), float(cfg.adam_eps), float(cfg.max_grad_norm))


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


def _across_devices(collective: Callable, tree, axis_name: str):
    """`collective(tree, axis_name)`; on one device the tree itself (the same values: a mean or
    minimum over one), skipping an all-reduce XLA's CPU backend ran as a copy of every gradient."""
    return tree if jax.lax.axis_size(axis_name) == 1 else collective(tree, axis_name)


def _all_finite(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def make_train_step(config: DeeBertConfig, tx: optax.GradientTransformation, schedule: optax.Schedule, stage: int,
                    axis_name: str = AXIS, dtype=jnp.float32, kernels: str = "reference",
                    offramp_loss: OffRampLoss = LABELS) -> Callable:
    """-> `step(state, batch, dropout_key) -> (state, metrics)`, to be run under `pmap(axis_name=...)`.

    `batch` holds this device's rows: input_ids, attention_mask, token_type_ids [b, S], labels [b].
    Gradients and metrics are averaged over `axis_name`; equal per-device batches make that the
    global-batch mean. `dtype` is the compute dtype: under bfloat16 the matmuls and activations are
    bf16, while parameters, gradients, optimizer state, softmax, layer norm and the loss stay float32.
    `kernels`: what the graph is built from (`model.kernels`; the caller picks it for its devices,
    `kernels.for_devices`). `offramp_loss`: stage 2's loss (`training.losses`); "distill" also runs
    layer L and ramp L (forward only) for the teacher. Dropout uses `fold_in(fold_in(dropout_key, step), device)`, so a resumed run
    draws the same masks. Metrics: loss, accuracy, grad_norm, learning_rate, finite (1.0 when the
    loss, gradients and new parameters are all finite); with "distill", agreement (of the
    off-ramps' predictions with ramp L's).
    """
    if stage not in STAGES:
        raise InputError(f"stage={stage!r}: expected 1 or 2")
    L = config.num_hidden_layers
    if stage == 2 and L < 2:
        raise InputError("stage 2 needs at least 2 layers (there are no off-ramps to train)")
    model = DeeBert(config, dtype, kernels=kernels)

    def step(state: TrainState, batch: Mapping[str, jax.Array], dropout_key: jax.Array):
        key = jax.random.fold_in(jax.random.fold_in(dropout_key, state.step), jax.lax.axis_index(axis_name))
        trainable, frozen = split_params(state.params, stage, L)

        def loss_fn(trainable):
            # Stage 2 trains the off-ramps alone: the model skips layer L and ramp L unless they
            # are the distillation teacher (then ramp L's logits carry no gradient).
            teacher = stage == 2 and offramp_loss.needs_final_ramp
            logits = model.apply({"params": merge_params(trainable, frozen, stage)}, batch["input_ids"],
                                 batch["attention_mask"], batch["token_type_ids"], train=True,
                                 stop_backbone_gradient=(stage == 2), off_ramps_only=(stage == 2 and not teacher),
                                 rngs={"dropout": key})
            if stage == 1:
                return stage_loss(logits, batch["labels"], 1)
            if teacher:
                return off_ramp_loss(logits[:-1], batch["labels"], logits[-1], offramp_loss)
            return off_ramp_loss(logits, batch["labels"])

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
                       dtype: str = "float32", kernels: str = "reference", offramp_loss: OffRampLoss = LABELS):
    """-> (pmapped step with the state donated, its optimizer). Cached: a second run in the same
    process with the same model, stage, settings, compute dtype and loss reuses the compiled step."""
    tx = settings.optimizer()
    step = make_train_step(config, tx, settings.schedule(), stage, dtype=jnp.dtype(dtype), kernels=kernels,
                           offramp_loss=offramp_loss)
    return jax.pmap(step, axis_name=AXIS, devices=devices, donate_argnums=(0,)), tx
