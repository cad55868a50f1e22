"""Dynamic early exit: one `lax.while_loop` iteration per layer, stopping when every row has exited.

Exit rules share one loop. A rule is `init(batch) -> state` and
`step(state, ramp_logits [B, K], threshold) -> (wants_exit [B] bool, state)`; the last ramp
always exits, whatever the rule says.

Two forms:
- `early_exit_predict`: one jitted loop over the whole batch; the loop ends when the last row of
  the batch has exited (under `jit` with a globally sharded batch that predicate is global).
- `early_exit_predict_pmap`: the batch split over local devices with `jax.pmap`; each device's
  loop ends when its own shard has exited.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deebert_jax.config import DeeBertConfig
from deebert_jax import modeling

PMAP_AXIS = "devices"
try:
    from jax.core import Tracer as _Tracer
except ImportError:  # jax.core re-exports move between releases; the GPU image runs a newer jax
    from jax._src.core import Tracer as _Tracer


class ExitResult(NamedTuple):
    logits: jax.Array       # [B, K] float32, each row's logits at its exit ramp
    exit_layer: jax.Array   # [B] int32, 1-based; 0 for rows that are all padding
    layers_run: jax.Array   # [] int32, layers the loop ran (= max exit_layer); [D] per device under pmap


def entropy(logits: jax.Array) -> jax.Array:
    """[..., K] -> [...] softmax entropy in nats, from log-softmax (the exp form overflows)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


class ExitRule(NamedTuple):
    init: Callable[[int], Any]
    step: Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]
    check: Callable[[float], str | None]   # an error message for a bad threshold, else None


def _entropy_step(state, logits, threshold):
    return entropy(logits) < threshold, state


def _max_prob_step(state, logits, threshold):
    return jnp.max(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=-1) > threshold, state


def _patience_init(batch):
    return jnp.full((batch,), -1, jnp.int32), jnp.zeros((batch,), jnp.int32)


def _patience_step(state, logits, threshold):
    # PABEE: count consecutive ramps whose prediction equals the previous ramp's; exit once the
    # count reaches the patience (the threshold). Patience 0 exits at ramp 1, patience p at
    # ramp p + 1 at the earliest.
    prev, count = state
    pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    count = jnp.where(pred == prev, count + 1, 0)
    return count >= threshold, (pred, count)


def _nonneg(x):
    return None if x >= 0 else "must be >= 0"


def _probability(x):
    return None if 0 <= x <= 1 else "must be in [0, 1]"


def _whole(x):
    return None if x >= 0 and float(x).is_integer() else "must be a whole number >= 0"


EXIT_RULES: dict[str, ExitRule] = {
    "entropy": ExitRule(lambda b: (), _entropy_step, _nonneg),
    "max_prob": ExitRule(lambda b: (), _max_prob_step, _probability),
    "patience": ExitRule(_patience_init, _patience_step, _whole),
}


def check_threshold(threshold, rule: str = "entropy") -> None:
    """Raises ValueError for an unknown rule or a NaN / out-of-range concrete threshold."""
    if rule not in EXIT_RULES:
        raise ValueError(f"unknown exit rule {rule!r}; expected one of {sorted(EXIT_RULES)}")
    if isinstance(threshold, _Tracer):
        return  # inside a caller's jit: nothing concrete to check
    if np.ndim(threshold) != 0:
        raise ValueError(f"threshold for rule {rule!r} must be a scalar, got shape {np.shape(threshold)}")
    value = float(threshold)
    if math.isnan(value):
        raise ValueError(f"threshold for rule {rule!r} is NaN")
    problem = EXIT_RULES[rule].check(value)
    if problem:
        raise ValueError(f"threshold={value} for rule {rule!r} {problem}")


def check_inputs(config: DeeBertConfig, input_ids, attention_mask, token_type_ids) -> None:
    """Raises ValueError unless the three inputs are integer (or bool) [B, S] arrays of one shape that fits."""
    named = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
    shapes = {k: tuple(np.shape(v)) for k, v in named.items()}
    if len(shapes["input_ids"]) != 2 or len(set(shapes.values())) != 1:
        raise ValueError(f"input_ids, attention_mask, token_type_ids must share one [B, S] shape, got {shapes}")
    for k, v in named.items():
        dtype = v.dtype if hasattr(v, "dtype") else np.asarray(v).dtype
        if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)):
            raise ValueError(f"{k} must hold integers, got dtype {getattr(v, 'dtype', type(v))}")
    if shapes["input_ids"][1] > config.max_position_embeddings:
        raise ValueError(f"sequence length {shapes['input_ids'][1]} exceeds max_position_embeddings="
                         f"{config.max_position_embeddings}")


def _canonical(threshold, dtype):
    # One cache entry whatever the caller passes: a Python float (weak type), np.float64 and a
    # jax array would otherwise each compile their own loop.
    if not isinstance(threshold, _Tracer):
        threshold = np.float32(threshold)
    return threshold, jnp.dtype(dtype)


def _loop(config: DeeBertConfig, params, input_ids, attention_mask, token_type_ids, threshold,
          rule: str, dtype) -> ExitResult:
    L, B, K = config.num_hidden_layers, input_ids.shape[0], config.num_labels
    exit_rule = EXIT_RULES[rule]
    threshold = jnp.asarray(threshold, jnp.float32)
    mask_bias = modeling.attention_bias(attention_mask, dtype)
    hidden = modeling.embed(config, params, input_ids, token_type_ids, dtype)
    padding_row = jnp.sum(attention_mask, axis=-1) == 0

    def cond(carry):
        layer, _, _, _, done, _ = carry
        return (layer < L) & ~jnp.all(done)

    def body(carry):
        layer, hidden, logits, exit_layer, done, rule_state = carry
        # The last layer updates the first token only: its ramp reads nothing else.
        hidden = modeling.layer_forward_at(config, params, layer, hidden, mask_bias, dtype,
                                           first_token_only_at_last=True)
        ramp_logits = modeling.ramp_forward_at(config, params, layer, hidden, mask_bias, dtype)
        wants_exit, rule_state = exit_rule.step(rule_state, ramp_logits, threshold)
        exits = ~done & (wants_exit | (layer == L - 1))
        logits = jnp.where(exits[:, None], ramp_logits, logits)
        exit_layer = jnp.where(exits, layer + 1, exit_layer)
        return layer + 1, hidden, logits, exit_layer, done | exits, rule_state

    carry = (jnp.int32(0), hidden, jnp.zeros((B, K), jnp.float32), jnp.zeros((B,), jnp.int32),
             padding_row, exit_rule.init(B))
    layers_run, _, logits, exit_layer, _, _ = jax.lax.while_loop(cond, body, carry)
    return ExitResult(logits, exit_layer, layers_run)


_exit_loop = jax.jit(_loop, static_argnames=("config", "rule", "dtype"))


def early_exit_predict(config: DeeBertConfig, params, input_ids, attention_mask, token_type_ids, threshold,
                       rule: str = "entropy", dtype=jnp.float32) -> ExitResult:
    """Batched DeeBERT inference in one compiled loop (one device, or a globally sharded batch).

    input_ids, attention_mask, token_type_ids [B, S] -> ExitResult(logits [B, K], exit_layer [B]
    1-based (0 for all-padding rows), layers_run []). Each row exits at the first ramp whose rule
    fires (entropy: softmax entropy in nats under `threshold`; max_prob: top probability over it;
    patience: prediction unchanged for `threshold` consecutive ramps) and keeps that ramp's
    logits; ramp L always exits. The loop stops once every row has exited: the predicate is over
    the whole batch. `threshold` is traced, so one compiled function serves every threshold.
    `params` stacked (training layout) or from `modeling.unstack_params` (faster: each layer's
    weights are read in place, not copied per iteration). Pass device arrays: numpy params are
    copied to the device on every call.
    """
    check_threshold(threshold, rule)
    check_inputs(config, input_ids, attention_mask, token_type_ids)
    threshold, dtype = _canonical(threshold, dtype)
    return _exit_loop(config, params, input_ids, attention_mask, token_type_ids, threshold, rule=rule, dtype=dtype)


def local_devices(devices: Sequence[jax.Device] | None = None) -> tuple[jax.Device, ...]:
    return tuple(jax.local_devices() if devices is None else devices)


def replicate_params(params, devices: Sequence[jax.Device] | None = None):
    """Places `params` once on every device, laid out as `early_exit_predict_pmap` reads them."""
    mesh = Mesh(np.array(local_devices(devices)), (PMAP_AXIS,))
    return jax.device_put(params, NamedSharding(mesh, PartitionSpec()))


@functools.lru_cache(maxsize=None)
def _pmapped_loop(config: DeeBertConfig, rule: str, dtype, devices: tuple):
    def shard(params, input_ids, attention_mask, token_type_ids, threshold):
        return _loop(config, params, input_ids, attention_mask, token_type_ids, threshold, rule, dtype)
    # No collective inside: every device runs its own while_loop to its own end.
    return jax.pmap(shard, axis_name=PMAP_AXIS, in_axes=(None, 0, 0, 0, None), devices=devices)


def early_exit_predict_pmap(config: DeeBertConfig, params, input_ids, attention_mask, token_type_ids, threshold,
                            rule: str = "entropy", dtype=jnp.float32,
                            devices: Sequence[jax.Device] | None = None) -> ExitResult:
    """`early_exit_predict` with the batch split over local devices by `jax.pmap`.

    Inputs [B, S] (any B: the batch is padded with all-padding rows, which start exited, to a
    multiple of the D devices). Each device runs its own loop on its B/D rows, and **each
    device's loop ends on its own**, as soon as its shard has exited; nothing waits for the
    slowest device inside the loop. Returns logits [B, K], exit_layer [B] and layers_run [D]
    (layers each device ran). Replicate `params` once with `replicate_params` when calling
    repeatedly.
    """
    check_threshold(threshold, rule)
    check_inputs(config, input_ids, attention_mask, token_type_ids)
    threshold, dtype = _canonical(threshold, dtype)
    devices = local_devices(devices)
    D = len(devices)
    arrays = [np.asarray(a) for a in (input_ids, attention_mask, token_type_ids)]
    B, S = arrays[0].shape
    pad = -B % D
    if pad:
        arrays = [np.concatenate([a, np.zeros((pad, S), a.dtype)]) for a in arrays]
    sharded = [a.reshape(D, (B + pad) // D, S) for a in arrays]
    out = _pmapped_loop(config, rule, dtype, devices)(params, *sharded, threshold)
    K = out.logits.shape[-1]
    return ExitResult(out.logits.reshape(B + pad, K)[:B], out.exit_layer.reshape(B + pad)[:B], out.layers_run)
