"""Benchmark only: the two exit-aware schedulers that lost to the library's on-device one.

`python -m train.benchmark_exit_aware --schedulers device,host,refill` times them beside
`deebert_jax.exit_aware_predict`, so the comparison in `docs/exit_aware.md` can be re-run. They
are not part of the library: both give row for row what `exit_aware_predict` gives (the tests
check it), and both were slower on the CPU.

- `host`: the library's bucket step driven from a Python loop, one device->host sync per layer.
- `refill`: `max(bucket_sizes)` slots, each at its own layer; a slot whose row exits is refilled
  with the next waiting row at layer 1. No bucket padding, but every step gathers one copy of the
  layer weights per slot and runs per-slot (batched) matmuls.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from deebert_jax.model import layouts
from deebert_jax.model import inference_step
from deebert_jax.core.config import DeeBertConfig
from deebert_jax.core.errors import InputError
from deebert_jax.inference.early_exit import EXIT_RULES, ExitResult, ExitState, record_exits
from deebert_jax.inference.exit_aware import bucket_plan, bucket_step, default_bucket_sizes, start_pool

SCHEDULERS = ("host", "refill")


@functools.partial(jax.jit, static_argnames=("config", "rule", "dtype", "layer"), donate_argnames=("state",))
def _host_bucket_step(config, rule, dtype, params, layer, threshold, mask_bias, state, rows):
    step = inference_step.layer_step(config, params, dtype, first_token_only_at_last=True)
    state = state.replace(layer=jnp.int32(layer))
    return bucket_step(config, step, rule, jnp.asarray(threshold, jnp.float32), mask_bias, state, rows, layer)


_start_pool = jax.jit(start_pool, static_argnames=("config", "rule", "dtype"))


def pool_loop_host(config: DeeBertConfig, params, input_ids, attention_mask, token_type_ids, threshold, rule,
                   bucket_sizes, dtype) -> ExitResult:
    n = input_ids.shape[0]
    mask_bias, state = _start_pool(config, params, input_ids, attention_mask, token_type_ids, rule, dtype)
    for layer in range(config.num_hidden_layers):
        active_rows = np.flatnonzero(~np.asarray(state.done)).astype(np.int32)  # the per-layer sync
        if active_rows.size == 0:
            break
        start = 0
        for size, count in bucket_plan(active_rows.size, bucket_sizes):
            for _ in range(int(count)):
                rows = np.full((size,), n, np.int32)
                chunk = active_rows[start:start + size]
                rows[:chunk.size] = chunk
                state = _host_bucket_step(config, rule, dtype, params, layer, threshold, mask_bias, state, rows)
                start += size
    return ExitResult(state.logits, state.exit_layer, jnp.max(state.exit_layer))


@flax.struct.dataclass
class SlotState:
    """The refill loop's state: which pool row each slot holds (N = none), the slots' own exit
    state (`slots.layer` [slots], one layer per slot), the next waiting row, and the pool's results."""

    slot_row: jax.Array      # [slots] int32
    slots: ExitState
    next_row: jax.Array      # [] int32, index into the queue of real rows
    logits: jax.Array        # [N, K]
    exit_layer: jax.Array    # [N]


@functools.partial(jax.jit, static_argnames=("config", "rule", "bucket_sizes", "dtype"))
def pool_loop_refill(config: DeeBertConfig, params, input_ids, attention_mask, token_type_ids, threshold,
                     rule: str, bucket_sizes: tuple[int, ...], dtype) -> ExitResult:
    L, n = config.num_hidden_layers, input_ids.shape[0]
    params = layouts.stack_params(params)  # per-slot weights are gathered from the L axis
    num_slots = max(bucket_sizes)
    threshold = jnp.asarray(threshold, jnp.float32)
    mask_bias, pool = start_pool(config, params, input_ids, attention_mask, token_type_ids, rule, dtype)
    queue = jnp.nonzero(~pool.done, size=n + num_slots, fill_value=n)[0].astype(jnp.int32)
    fresh_rule_state = EXIT_RULES[rule].init(num_slots)

    def per_slot(layer_params, ramp_params, hidden, bias, layer):
        hidden = inference_step.layer_forward(config, layer_params, hidden[None], bias[None], dtype)
        return hidden[0], inference_step.ramp_forward(config, ramp_params, hidden, bias[None], layer, dtype)[0]

    def refill(state: SlotState, free) -> SlotState:
        rank = jnp.cumsum(free) - 1
        row = jnp.where(free, queue[jnp.minimum(state.next_row + rank, n + num_slots - 1)], state.slot_row)
        where = lambda new, old: jnp.where(free.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)
        slots = state.slots.replace(
            layer=jnp.where(free, 0, state.slots.layer),
            hidden=where(jnp.take(pool.hidden, jnp.minimum(row, n - 1), axis=0), state.slots.hidden),
            rule_state=jax.tree_util.tree_map(where, fresh_rule_state, state.slots.rule_state))
        return state.replace(slot_row=row, slots=slots, next_row=state.next_row + jnp.sum(free, dtype=jnp.int32))

    def running(state: SlotState):
        return jnp.any(state.slot_row < n)

    def one_step(state: SlotState) -> SlotState:
        occupied = state.slot_row < n
        index = jnp.minimum(state.slots.layer, L - 1)
        layer_params = jax.tree_util.tree_map(lambda x: jnp.take(x, index, axis=0), params["layers"])
        ramp_params = jax.tree_util.tree_map(lambda x: jnp.take(x, index, axis=0), params["ramps"])
        bias = jnp.take(mask_bias, jnp.minimum(state.slot_row, n - 1), axis=0)
        hidden, ramp_logits = jax.vmap(per_slot)(layer_params, ramp_params, state.slots.hidden, bias, index)
        slots = record_exits(state.slots.replace(hidden=hidden, done=~occupied), rule, ramp_logits, threshold, L - 1)
        exits = slots.done & occupied
        exit_rows = jnp.where(exits, state.slot_row, n)
        state = state.replace(slots=slots.replace(layer=slots.layer + 1),
                              logits=state.logits.at[exit_rows].set(slots.logits, mode="drop"),
                              exit_layer=state.exit_layer.at[exit_rows].set(slots.exit_layer, mode="drop"))
        return refill(state, exits)

    empty = ExitState(layer=jnp.zeros((num_slots,), jnp.int32),
                      hidden=jnp.zeros((num_slots,) + pool.hidden.shape[1:], pool.hidden.dtype),
                      logits=jnp.zeros((num_slots, config.num_labels), jnp.float32),
                      exit_layer=jnp.zeros((num_slots,), jnp.int32), done=jnp.ones((num_slots,), bool),
                      rule_state=fresh_rule_state)
    start = refill(SlotState(jnp.full((num_slots,), n, jnp.int32), empty, jnp.int32(0), pool.logits,
                             pool.exit_layer), jnp.ones((num_slots,), bool))
    state = jax.lax.while_loop(running, one_step, start)
    return ExitResult(state.logits, state.exit_layer, jnp.max(state.exit_layer))


def exit_aware_predict_with(scheduler: str, config: DeeBertConfig, params, input_ids, attention_mask,
                            token_type_ids, threshold, rule: str = "entropy", *, bucket_sizes=None,
                            dtype=jnp.float32) -> ExitResult:
    """One pool (no splitting, no padding to shared sizes) through the `host` or `refill` scheduler."""
    if scheduler not in SCHEDULERS:
        raise InputError(f"scheduler={scheduler!r}; expected one of {SCHEDULERS}")
    bucket_sizes = tuple(sorted({int(b) for b in (bucket_sizes or default_bucket_sizes())}, reverse=True))
    run = pool_loop_host if scheduler == "host" else pool_loop_refill
    arrays = [np.asarray(a) for a in (input_ids, attention_mask, token_type_ids)]
    return run(config, jax.device_put(params), *arrays, np.float32(threshold), rule=rule,
               bucket_sizes=bucket_sizes, dtype=jnp.dtype(dtype))
