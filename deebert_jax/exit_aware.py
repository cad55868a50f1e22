"""Exit-aware batching: early exit whose cost follows each example's own exit layer.

A plain batched early-exit loop (`early_exit.early_exit_predict`) runs every row until the
batch's slowest row exits, so at batch 32 it saves almost nothing. Here a *pool* of rows is
processed layer-major: before each layer the rows still running are compacted (a stable
`nonzero`) and pushed through the layer in fixed-size buckets, so layer l costs about
`ceil(active_l / bucket)` bucket steps instead of the whole batch. Everything runs inside one
jitted function (a `while_loop` over layers holding `while_loop`s over buckets), so there is no
host round trip per layer and XLA compiles one program per padded pool size, with a handful of
bucket shapes inside it. Pools are padded to `largest bucket * 2**k` rows (padding rows start
exited and cost only their embedding), so arbitrary input sizes reuse a few compiled programs.
The last layer is peeled off the loop: every row still running exits there, so it computes
position 0 only (all the final ramp reads). Layer weights are selected once per layer per pool,
not once per batch.

Two measured alternatives stay selectable: `scheduler="host"` runs the same bucket step from a
Python loop (one device->host sync per layer), and `scheduler="refill"` keeps fixed slots, each
at its own layer, refilled from the pool as rows exit (per-slot weights: slower on CPU).
`docs/exit_aware.md` has the design notes and the numbers.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deebert_jax import modeling
from deebert_jax.config import DeeBertConfig
from deebert_jax.early_exit import EXIT_RULES, ExitResult, check_inputs, check_threshold

try:
    from jax.core import Tracer as _Tracer
except ImportError:  # jax.core re-exports move between releases; the GPU image runs a newer jax
    from jax._src.core import Tracer as _Tracer

# Measured on CPU (docs/exit_aware.md): buckets of 8 rows run ~20% faster per row than 32 (cache),
# and a 2-row bucket for the remainder wastes at most one padded row per layer. Accelerators want
# bigger matmuls; their default is a guess, not measured here.
CPU_BUCKET_SIZES = (8, 2)
ACCELERATOR_BUCKET_SIZES = (64, 16)
DEFAULT_POOL_SIZE = 1024
SCHEDULERS = ("device", "host", "refill")


def _gather_rows(tree, rows):
    return jax.tree_util.tree_map(lambda x: jnp.take(x, rows, axis=0), tree)


def _scatter_rows(tree, rows, values):
    # Out-of-range rows (bucket padding) are dropped, so a padded bucket never writes.
    return jax.tree_util.tree_map(lambda x, v: x.at[rows].set(v, mode="drop"), tree, values)


def _bucket_step(config, rule, dtype, layer_params, ramp_params, layer, threshold, mask_bias, state, rows,
                 last: bool = False):
    """Runs layer `layer` (0-based) on the pool rows `rows` [b] (index N = padding slot).

    state = (hidden [N,S,H], logits [N,K], exit_layer [N], done [N], rule_state); returns it updated.
    `last` (static): the final layer, where every row exits and only position 0 is computed.
    """
    hidden, logits, exit_layer, done, rule_state = state
    n = hidden.shape[0]
    # Padding slots compute on a real row (no NaNs from an all-masked row) and write nowhere.
    safe = jnp.minimum(rows, n - 1)
    bias = jnp.take(mask_bias, safe, axis=0)
    h = modeling.layer_forward(config, layer_params, jnp.take(hidden, safe, axis=0), bias, dtype,
                               first_token_only=last)
    ramp_logits = modeling.ramp_forward(config, ramp_params, h, bias, config.num_hidden_layers - 1 if last else layer,
                                        dtype)
    if last:
        exit_rows = rows
    else:
        wants_exit, row_rule_state = EXIT_RULES[rule].step(_gather_rows(rule_state, safe), ramp_logits, threshold)
        exit_rows = jnp.where(wants_exit, rows, n)
        hidden = hidden.at[rows].set(h, mode="drop")
        rule_state = _scatter_rows(rule_state, rows, row_rule_state)
    logits = logits.at[exit_rows].set(ramp_logits, mode="drop")
    exit_layer = exit_layer.at[exit_rows].set(layer + 1, mode="drop")
    done = done.at[exit_rows].set(True, mode="drop")
    return hidden, logits, exit_layer, done, rule_state


def _bucket_plan(n_active, bucket_sizes):
    """How many buckets of each size cover `n_active` rows: greedy in the larger sizes, then
    enough of the smallest to cover the rest. Yields (size, count) with traced counts."""
    remaining = n_active
    for i, size in enumerate(bucket_sizes):
        if i + 1 < len(bucket_sizes):
            count = remaining // size
        else:
            count = (remaining + size - 1) // size
        yield size, count
        remaining = remaining - count * size  # >= 0 for all but the last size


def _init_pool(config, params, input_ids, attention_mask, token_type_ids, rule, dtype):
    n, k = input_ids.shape[0], config.num_labels
    mask_bias = modeling.attention_bias(attention_mask, dtype)
    hidden = modeling.embed(config, params, input_ids, token_type_ids, dtype)
    padding_row = jnp.sum(attention_mask, axis=-1) == 0
    state = (hidden, jnp.zeros((n, k), jnp.float32), jnp.zeros((n,), jnp.int32), padding_row,
             EXIT_RULES[rule].init(n))
    return mask_bias, state


def _run_layer(config, rule, dtype, params, layer, threshold, mask_bias, state, bucket_sizes, last=False):
    """One layer over the pool's running rows, compacted into buckets, all on device."""
    n = mask_bias.shape[0]
    layer_params = modeling.layer_params_at(params, layer)   # one slice per layer, shared by its buckets
    ramp_params = modeling.ramp_params_at(params, layer)
    active = ~state[3]
    # Running rows first, in pool order; the tail (and an extra bucket's worth) is the
    # out-of-range index n, so every bucket slice stays in bounds and its padding writes nowhere.
    order = jnp.nonzero(active, size=n, fill_value=n)[0].astype(jnp.int32)
    order = jnp.concatenate([order, jnp.full((max(bucket_sizes),), n, jnp.int32)])
    start = jnp.int32(0)
    for size, count in _bucket_plan(jnp.sum(active, dtype=jnp.int32), bucket_sizes):
        def bucket(j, state, start=start, size=size):
            rows = jax.lax.dynamic_slice_in_dim(order, start + j * size, size)
            return _bucket_step(config, rule, dtype, layer_params, ramp_params, layer, threshold,
                                mask_bias, state, rows, last)
        state = jax.lax.fori_loop(0, count, bucket, state)
        start = start + count * size
    return state


@functools.partial(jax.jit, static_argnames=("config", "rule", "bucket_sizes", "dtype"))
def _pool_loop_device(config: DeeBertConfig, params, input_ids, attention_mask, token_type_ids, threshold,
                      rule: str, bucket_sizes: tuple[int, ...], dtype) -> ExitResult:
    L = config.num_hidden_layers
    threshold = jnp.asarray(threshold, jnp.float32)
    mask_bias, state = _init_pool(config, params, input_ids, attention_mask, token_type_ids, rule, dtype)

    def cond(carry):
        layer, state = carry
        return (layer < L - 1) & ~jnp.all(state[3])

    def body(carry):
        layer, state = carry
        return layer + 1, _run_layer(config, rule, dtype, params, layer, threshold, mask_bias, state, bucket_sizes)

    _, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
    # The last layer, peeled off the loop so that it is static: position 0 only, every row exits.
    _, logits, exit_layer, _, _ = _run_layer(config, rule, dtype, params, L - 1, threshold, mask_bias, state,
                                             bucket_sizes, last=True)
    return ExitResult(logits, exit_layer, jnp.max(exit_layer))


@functools.partial(jax.jit, static_argnames=("config", "rule", "dtype", "last"), donate_argnames=("state",))
def _host_bucket_step(config, rule, dtype, params, layer, threshold, mask_bias, state, rows, last):
    return _bucket_step(config, rule, dtype, modeling.layer_params_at(params, layer),
                        modeling.ramp_params_at(params, layer), layer, jnp.asarray(threshold, jnp.float32),
                        mask_bias, state, rows, last)


_init_pool_jit = jax.jit(_init_pool, static_argnames=("config", "rule", "dtype"))


def _pool_loop_host(config, params, input_ids, attention_mask, token_type_ids, threshold, rule,
                    bucket_sizes, dtype) -> ExitResult:
    n = input_ids.shape[0]
    mask_bias, state = _init_pool_jit(config, params, input_ids, attention_mask, token_type_ids, rule, dtype)
    for layer in range(config.num_hidden_layers):
        active_rows = np.flatnonzero(~np.asarray(state[3])).astype(np.int32)  # the per-layer sync
        if active_rows.size == 0:
            break
        start = 0
        for size, count in _bucket_plan(active_rows.size, bucket_sizes):
            for _ in range(int(count)):
                rows = np.full((size,), n, np.int32)
                chunk = active_rows[start:start + size]
                rows[:chunk.size] = chunk
                state = _host_bucket_step(config, rule, dtype, params, layer, threshold, mask_bias, state, rows,
                                          last=layer == config.num_hidden_layers - 1)
                start += size
    _, logits, exit_layer, _, _ = state
    return ExitResult(logits, exit_layer, jnp.max(exit_layer))


@functools.partial(jax.jit, static_argnames=("config", "rule", "bucket_sizes", "dtype"))
def _pool_loop_refill(config: DeeBertConfig, params, input_ids, attention_mask, token_type_ids, threshold,
                      rule: str, bucket_sizes: tuple[int, ...], dtype) -> ExitResult:
    """The other design: `max(bucket_sizes)` slots, each at its own layer; a slot whose row exits
    is refilled with the next waiting row at layer 1. No bucket padding, but every step gathers one
    copy of the layer weights per slot and runs per-slot (batched) matmuls."""
    L, n = config.num_hidden_layers, input_ids.shape[0]
    params = modeling.stack_params(params)  # per-slot weights are gathered from the L axis
    slots = max(bucket_sizes)
    exit_rule = EXIT_RULES[rule]
    threshold = jnp.asarray(threshold, jnp.float32)
    mask_bias, (pool_hidden, logits, exit_layer, padding_row, _) = _init_pool(
        config, params, input_ids, attention_mask, token_type_ids, rule, dtype)
    queue = jnp.nonzero(~padding_row, size=n + slots, fill_value=n)[0].astype(jnp.int32)
    fresh_rule_state = exit_rule.init(slots)

    def per_slot(layer_params, ramp_params, hidden, bias, layer):
        hidden = modeling.layer_forward(config, layer_params, hidden[None], bias[None], dtype)
        return hidden[0], modeling.ramp_forward(config, ramp_params, hidden, bias[None], layer, dtype)[0]

    def refill(free, slot_row, slot_layer, slot_hidden, rule_state, next_row):
        rank = jnp.cumsum(free) - 1
        new_row = jnp.where(free, queue[jnp.minimum(next_row + rank, n + slots - 1)], slot_row)
        slot_hidden = jnp.where(free[:, None, None], jnp.take(pool_hidden, jnp.minimum(new_row, n - 1), axis=0),
                                slot_hidden)
        rule_state = jax.tree_util.tree_map(
            lambda old, new: jnp.where(free.reshape((-1,) + (1,) * (old.ndim - 1)), new, old),
            rule_state, fresh_rule_state)
        return (new_row, jnp.where(free, 0, slot_layer), slot_hidden, rule_state,
                next_row + jnp.sum(free, dtype=jnp.int32))

    def cond(carry):
        return jnp.any(carry[0] < n)

    def body(carry):
        slot_row, slot_layer, slot_hidden, rule_state, next_row, logits, exit_layer = carry
        running = slot_row < n
        index = jnp.minimum(slot_layer, L - 1)
        layer_params = jax.tree_util.tree_map(lambda x: jnp.take(x, index, axis=0), params["layers"])
        ramp_params = jax.tree_util.tree_map(lambda x: jnp.take(x, index, axis=0), params["ramps"])
        bias = jnp.take(mask_bias, jnp.minimum(slot_row, n - 1), axis=0)
        slot_hidden, ramp_logits = jax.vmap(per_slot)(layer_params, ramp_params, slot_hidden, bias, index)
        wants_exit, rule_state = exit_rule.step(rule_state, ramp_logits, threshold)
        exits = running & (wants_exit | (slot_layer == L - 1))
        exit_rows = jnp.where(exits, slot_row, n)
        logits = logits.at[exit_rows].set(ramp_logits, mode="drop")
        exit_layer = exit_layer.at[exit_rows].set(slot_layer + 1, mode="drop")
        slot_row, slot_layer, slot_hidden, rule_state, next_row = refill(
            exits, slot_row, slot_layer + 1, slot_hidden, rule_state, next_row)
        return slot_row, slot_layer, slot_hidden, rule_state, next_row, logits, exit_layer

    everything_free = jnp.ones((slots,), bool)
    start = refill(everything_free, jnp.full((slots,), n, jnp.int32), jnp.zeros((slots,), jnp.int32),
                   jnp.zeros((slots,) + pool_hidden.shape[1:], pool_hidden.dtype), fresh_rule_state, jnp.int32(0))
    carry = jax.lax.while_loop(cond, body, start + (logits, exit_layer))
    return ExitResult(carry[5], carry[6], jnp.max(carry[6]))


def default_bucket_sizes(backend: str | None = None) -> tuple[int, ...]:
    """Bucket sizes used when none are given: small on CPU, larger on GPU/TPU."""
    return CPU_BUCKET_SIZES if (backend or jax.default_backend()) == "cpu" else ACCELERATOR_BUCKET_SIZES


def padded_pool_size(n: int, bucket_sizes: Sequence[int], pool_size: int) -> int:
    """Rows a pool of `n` is padded to: the largest bucket times a power of two, at most
    `pool_size` rounded up to that bucket; so all pool sizes share a few compiled programs."""
    big = max(bucket_sizes)
    cap = -(-pool_size // big) * big
    size = big
    while size < n and size < cap:
        size *= 2
    return min(size, cap)


def _validate(bucket_sizes, pool_size, scheduler):
    if not bucket_sizes or any(isinstance(b, bool) or int(b) != b or b < 1 for b in bucket_sizes):
        raise ValueError(f"bucket_sizes={bucket_sizes!r} must be positive integers")
    if int(pool_size) < 1:
        raise ValueError(f"pool_size={pool_size!r} must be a positive integer")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={scheduler!r}; expected one of {SCHEDULERS}")


def exit_aware_predict(config: DeeBertConfig, params, input_ids, attention_mask, token_type_ids, threshold,
                       rule: str = "entropy", *, bucket_sizes: Sequence[int] | None = None,
                       pool_size: int = DEFAULT_POOL_SIZE, scheduler: str = "device",
                       dtype=jnp.float32) -> ExitResult:
    """Early exit over N examples whose cost is about sum(exit_layer) row-layers, not N * max.

    input_ids, attention_mask, token_type_ids [N, S] (any N); -> ExitResult with logits [N, K],
    exit_layer [N] (1-based; 0 for all-padding rows) and layers_run = max exit_layer: row for
    row what `early_exit_predict` gives. The N rows are cut into pools of at most `pool_size`
    (rounded up to the largest bucket); each pool runs layer-major with its running rows compacted
    into buckets of `bucket_sizes` (larger first, the smallest covers the remainder; default
    `default_bucket_sizes()`). Larger pools waste less on bucket padding and hold [pool, S, H]
    activations in memory. `threshold` is traced: one compiled program serves every threshold.
    """
    if bucket_sizes is None:
        bucket_sizes = default_bucket_sizes()
    _validate(bucket_sizes, pool_size, scheduler)
    check_inputs(config, input_ids, attention_mask, token_type_ids)
    bucket_sizes = tuple(sorted({int(b) for b in bucket_sizes}, reverse=True))
    check_threshold(threshold, rule)
    n = int(np.shape(input_ids)[0])
    if n == 0:
        k = config.num_labels
        return ExitResult(jnp.zeros((0, k), jnp.float32), jnp.zeros((0,), jnp.int32), jnp.int32(0))
    if not isinstance(threshold, _Tracer):
        threshold = np.float32(threshold)  # one cache entry for Python floats, numpy and jax scalars
    dtype = jnp.dtype(dtype)
    run = {"device": _pool_loop_device, "host": _pool_loop_host, "refill": _pool_loop_refill}[scheduler]
    params = jax.device_put(params)  # once, not once per pool (numpy params would be copied per call)
    step = padded_pool_size(pool_size, bucket_sizes, pool_size)
    arrays = [np.asarray(a) for a in (input_ids, attention_mask, token_type_ids)]
    logits, exit_layer = [], []
    for start in range(0, n, step):
        chunk = [a[start:start + step] for a in arrays]
        rows = chunk[0].shape[0]
        padded = padded_pool_size(rows, bucket_sizes, pool_size)
        if padded > rows:  # extra rows are all padding: they start exited and cost an embedding
            chunk = [np.concatenate([a, np.zeros((padded - rows,) + a.shape[1:], a.dtype)]) for a in chunk]
        result = run(config, params, *chunk, threshold, rule=rule, bucket_sizes=bucket_sizes, dtype=dtype)
        logits.append(result.logits[:rows])
        exit_layer.append(result.exit_layer[:rows])
    logits = jnp.concatenate(logits) if len(logits) > 1 else logits[0]
    exit_layer = jnp.concatenate(exit_layer) if len(exit_layer) > 1 else exit_layer[0]
    return ExitResult(logits, exit_layer, jnp.max(exit_layer))
