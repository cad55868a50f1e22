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

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deebert_jax.core.errors import InputError
from deebert_jax.model.attention import check_attention_impl
from deebert_jax.core.config import DeeBertConfig
from deebert_jax.model import modeling
from deebert_jax.model import inference_step
from deebert_jax.data.validation import check_model_inputs, is_tracer

PMAP_AXIS = "devices"


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


def full_depth_threshold(rule: str, num_layers: int) -> float:
    """The threshold at which `rule` never exits early (every row runs all `num_layers` layers):
    entropy 0, max_prob 1, patience L-1; the first of every sweep (`sweep.default_thresholds`)."""
    if rule not in EXIT_RULES:
        raise InputError(f"unknown exit rule {rule!r}; expected one of {sorted(EXIT_RULES)}")
    return {"entropy": 0.0, "max_prob": 1.0, "patience": float(num_layers - 1)}[rule]


def check_threshold(threshold, rule: str = "entropy") -> None:
    """Raises ValueError for an unknown rule or a NaN / out-of-range concrete threshold."""
    if rule not in EXIT_RULES:
        raise InputError(f"unknown exit rule {rule!r}; expected one of {sorted(EXIT_RULES)}")
    if is_tracer(threshold):
        return  # inside a caller's jit: nothing concrete to check
    if np.ndim(threshold) != 0:
        raise InputError(f"threshold for rule {rule!r} must be a scalar, got shape {np.shape(threshold)}")
    value = float(threshold)
    if math.isnan(value):
        raise InputError(f"threshold for rule {rule!r} is NaN")
    problem = EXIT_RULES[rule].check(value)
    if problem:
        raise InputError(f"threshold={value} for rule {rule!r} {problem}")


def _canonical(threshold, dtype):
    # One cache entry whatever the caller passes: a Python float (weak type), np.float64 and a
    # jax array would otherwise each compile their own loop.
    if not is_tracer(threshold):
        threshold = np.float32(threshold)
    return threshold, jnp.dtype(dtype)


@flax.struct.dataclass
class ExitState:
    """What an early-exit loop carries: the next layer and, per row, its state and exit so far.

    layer [] int32 (0-based, the next layer to run); hidden [B, S, H]; logits [B, K] float32 (a
    row's exit-ramp logits once it has exited, zeros before); exit_layer [B] int32 (1-based, 0
    until it exits); done [B] bool; rule_state: the exit rule's per-row state (leading axis B).
    The exit-aware pool holds one of these for all its rows and works on subsets (`take_rows`).
    """

    layer: jax.Array
    hidden: jax.Array
    logits: jax.Array
    exit_layer: jax.Array
    done: jax.Array
    rule_state: Any

    @classmethod
    def start(cls, hidden, attention_mask, num_labels: int, rule: str) -> "ExitState":
        """Before layer 1: all-padding rows start exited (at layer 0)."""
        B = hidden.shape[0]
        return cls(layer=jnp.int32(0), hidden=hidden, logits=jnp.zeros((B, num_labels), jnp.float32),
                   exit_layer=jnp.zeros((B,), jnp.int32), done=jnp.sum(attention_mask, axis=-1) == 0,
                   rule_state=EXIT_RULES[rule].init(B))

    def take_rows(self, rows) -> "ExitState":
        """The rows `rows` [b] of every per-row field (indices must be in range)."""
        per_row = lambda x: jnp.take(x, rows, axis=0)
        return self.replace(hidden=per_row(self.hidden), logits=per_row(self.logits),
                            exit_layer=per_row(self.exit_layer), done=per_row(self.done),
                            rule_state=jax.tree_util.tree_map(per_row, self.rule_state))

    def put_rows(self, rows, part: "ExitState", hidden: bool = True) -> "ExitState":
        """Writes `part` (from `take_rows`) back at `rows` [b]; out-of-range rows write nowhere.
        `hidden=False` leaves the hidden states alone (nothing reads them after the last layer)."""
        put = lambda x, v: x.at[rows].set(v, mode="drop")
        return self.replace(hidden=put(self.hidden, part.hidden) if hidden else self.hidden,
                            logits=put(self.logits, part.logits), exit_layer=put(self.exit_layer, part.exit_layer),
                            done=put(self.done, part.done),
                            rule_state=jax.tree_util.tree_map(put, self.rule_state, part.rule_state))


def record_exits(state: ExitState, rule: str, ramp_logits, threshold, last_layer: int) -> ExitState:
    """The exit update, shared by every loop: rows not yet done exit at `state.layer` when the rule
    fires or it is the last layer (`last_layer`, 0-based), keeping that ramp's logits [B, K]."""
    wants_exit, rule_state = EXIT_RULES[rule].step(state.rule_state, ramp_logits, threshold)
    exits = ~state.done & (wants_exit | (state.layer == last_layer))
    return state.replace(logits=jnp.where(exits[:, None], ramp_logits.astype(jnp.float32), state.logits),
                         exit_layer=jnp.where(exits, state.layer + 1, state.exit_layer),
                         done=state.done | exits, rule_state=rule_state)


@functools.partial(jax.jit, static_argnames=("rule",))
def exits_from_ramp_logits(ramp_logits, threshold, rule: str = "entropy") -> ExitResult:
    """The exit rule over precomputed every-ramp logits [L, N, K] (no model run) -> ExitResult with
    logits [N, K], exit_layer [N] (1-based) and layers_run: what the loops give, by the same update."""
    L, N, K = ramp_logits.shape

    def one_layer(state: ExitState, logits):
        state = record_exits(state, rule, logits, threshold, L - 1)
        return state.replace(layer=state.layer + 1), None

    start = ExitState(layer=jnp.int32(0), hidden=None, logits=jnp.zeros((N, K), jnp.float32),
                      exit_layer=jnp.zeros((N,), jnp.int32), done=jnp.zeros((N,), bool),
                      rule_state=EXIT_RULES[rule].init(N))
    state, _ = jax.lax.scan(one_layer, start, ramp_logits)
    return ExitResult(state.logits, state.exit_layer, jnp.max(state.exit_layer, initial=0))


def _loop(config: DeeBertConfig, params, input_ids, attention_mask, token_type_ids, threshold,
          rule: str, dtype, attention_impl: str = "default") -> ExitResult:
    L = config.num_hidden_layers
    threshold = jnp.asarray(threshold, jnp.float32)
    mask_bias = modeling.attention_bias(attention_mask, dtype)
    # The last layer updates the first token only: its ramp reads nothing else.
    step = inference_step.layer_step(config, params, dtype, first_token_only_at_last=True, attention_impl=attention_impl)

    def running(state: ExitState):
        return (state.layer < L) & ~jnp.all(state.done)

    def one_layer(state: ExitState) -> ExitState:
        hidden, ramp_logits = step(state.layer, state.hidden, mask_bias)
        state = record_exits(state.replace(hidden=hidden), rule, ramp_logits, threshold, L - 1)
        return state.replace(layer=state.layer + 1)

    hidden = inference_step.embed(config, params, input_ids, token_type_ids, dtype)
    state = jax.lax.while_loop(running, one_layer,
                               ExitState.start(hidden, attention_mask, config.num_labels, rule))
    return ExitResult(state.logits, state.exit_layer, state.layer)


_exit_loop = jax.jit(_loop, static_argnames=("config", "rule", "dtype", "attention_impl"))


def early_exit_predict(config: DeeBertConfig, params, input_ids, attention_mask, token_type_ids, threshold,
                       rule: str = "entropy", dtype=jnp.float32, *, validate_inputs: bool = True,
                       attention_impl: str = "default") -> ExitResult:
    """Batched DeeBERT inference in one compiled loop (one device, or a globally sharded batch).

    input_ids, attention_mask, token_type_ids [B, S] -> ExitResult(logits [B, K], exit_layer [B]
    1-based (0 for all-padding rows), layers_run []). Each row exits at the first ramp whose rule
    fires (entropy: softmax entropy in nats under `threshold`; max_prob: top probability over it;
    patience: prediction unchanged for `threshold` consecutive ramps) and keeps that ramp's
    logits; ramp L always exits. The loop stops once every row has exited: the predicate is over
    the whole batch. `threshold` is traced, so one compiled function serves every threshold.
    `params` stacked (training layout) or from `layouts.unstack_params` (faster: each layer's
    weights are read in place, not copied per iteration). Pass device arrays: numpy params are
    copied to the device on every call. The inputs' values are checked first (`validation.check_model_inputs`: one
    host copy of device arrays); a caller that checked its whole data set once, or times calls,
    passes `validate_inputs=False`. Inputs traced inside a caller's own `jit` are not checked.
    `attention_impl`: self-attention's core (`attention.ATTENTION_IMPLS`; "default" unless asked).
    """
    check_threshold(threshold, rule)
    check_attention_impl(attention_impl, dtype)
    if validate_inputs:
        check_model_inputs(config, input_ids, attention_mask, token_type_ids)
    threshold, dtype = _canonical(threshold, dtype)
    return _exit_loop(config, params, input_ids, attention_mask, token_type_ids, threshold, rule=rule, dtype=dtype,
                      attention_impl=attention_impl)


def local_devices(devices: Sequence[jax.Device] | None = None) -> tuple[jax.Device, ...]:
    return tuple(jax.local_devices() if devices is None else devices)


def replicate_params(params, devices: Sequence[jax.Device] | None = None):
    """Places `params` once on every device, laid out as `early_exit_predict_pmap` reads them."""
    mesh = Mesh(np.array(local_devices(devices)), (PMAP_AXIS,))
    return jax.device_put(params, NamedSharding(mesh, PartitionSpec()))


@functools.lru_cache(maxsize=None)
def _pmapped_loop(config: DeeBertConfig, rule: str, dtype, devices: tuple, attention_impl: str = "default"):
    def shard(params, input_ids, attention_mask, token_type_ids, threshold):
        return _loop(config, params, input_ids, attention_mask, token_type_ids, threshold, rule, dtype,
                     attention_impl)
    # No collective inside: every device runs its own while_loop to its own end.
    return jax.pmap(shard, axis_name=PMAP_AXIS, in_axes=(None, 0, 0, 0, None), devices=devices)


def early_exit_predict_pmap(config: DeeBertConfig, params, input_ids, attention_mask, token_type_ids, threshold,
                            rule: str = "entropy", dtype=jnp.float32,
                            devices: Sequence[jax.Device] | None = None, *,
                            validate_inputs: bool = True, attention_impl: str = "default") -> ExitResult:
    """`early_exit_predict` with the batch split over local devices by `jax.pmap`.

    Inputs [B, S] (any B: the batch is padded with all-padding rows, which start exited, to a
    multiple of the D devices). Each device runs its own loop on its B/D rows, and **each
    device's loop ends on its own**, as soon as its shard has exited; nothing waits for the
    slowest device inside the loop. Returns logits [B, K], exit_layer [B] and layers_run [D]
    (layers each device ran). Replicate `params` once with `replicate_params` when calling
    repeatedly. `attention_impl` as in `early_exit_predict`.
    """
    check_threshold(threshold, rule)
    check_attention_impl(attention_impl, dtype)
    if validate_inputs:
        check_model_inputs(config, input_ids, attention_mask, token_type_ids)
    threshold, dtype = _canonical(threshold, dtype)
    devices = local_devices(devices)
    D = len(devices)
    arrays = [np.asarray(a) for a in (input_ids, attention_mask, token_type_ids)]
    B, S = arrays[0].shape
    pad = -B % D
    if pad:
        arrays = [np.concatenate([a, np.zeros((pad, S), a.dtype)]) for a in arrays]
    sharded = [a.reshape(D, (B + pad) // D, S) for a in arrays]
    out = _pmapped_loop(config, rule, dtype, devices, attention_impl)(params, *sharded, threshold)
    K = out.logits.shape[-1]
    return ExitResult(out.logits.reshape(B + pad, K)[:B], out.exit_layer.reshape(B + pad)[:B], out.layers_run)
