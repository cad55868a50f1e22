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
position 0 only (all the final ramp reads).

The pool is one `early_exit.ExitState` over all its rows; a bucket takes its rows out of it,
runs `inference_step.layer_step` and `early_exit.record_exits` on them (the same step and exit update
as the plain loop) and puts them back. `docs/exit_aware.md` has the design notes, the numbers, and
the two alternatives measured against this one (a host-driven loop and refilled slots).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deebert_jax.core.errors import InputError
from deebert_jax.model import modeling
from deebert_jax.model import layouts
from deebert_jax.model import inference_step
from deebert_jax.model.attention import check_attention_impl
from deebert_jax.core.config import DeeBertConfig
from deebert_jax.data.validation import check_model_inputs
from deebert_jax.inference.early_exit import ExitResult, ExitState, check_threshold, record_exits
from deebert_jax.data.validation import is_tracer

# Measured on CPU (docs/exit_aware.md): buckets of 8 rows run ~20% faster per row than 32 (cache),
# and a 2-row bucket for the remainder wastes at most one padded row per layer. Accelerators want
# bigger matmuls; their default is a guess, not measured here.
CPU_BUCKET_SIZES = (8, 2)
ACCELERATOR_BUCKET_SIZES = (64, 16)
DEFAULT_POOL_SIZE = 1024
# `exit_aware_predict(scheduler=...)` has one value, "device" (the whole loop runs on the device);
# the argument stays so callers that pass it keep working. The two alternatives measured against
# it are benchmark-only (benchmarks/exit_aware_alternatives.py, docs/exit_aware.md).
SCHEDULERS = ("device",)


def bucket_step(config: DeeBertConfig, step, rule: str, threshold, mask_bias, state: ExitState, rows,
                layer) -> ExitState:
    """Runs `layer` (0-based; the static last layer, or `state.layer` traced) on the pool rows
    `rows` [b] (index N = a padding slot) of `state` (N rows) with `step` from `inference_step.layer_step`."""
    n = state.hidden.shape[0]
    # Padding slots compute on a real row (no NaNs from an all-masked row) and write nowhere.
    safe = jnp.minimum(rows, n - 1)
    part = state.take_rows(safe)
    hidden, ramp_logits = step(layer, part.hidden, jnp.take(mask_bias, safe, axis=0))
    part = record_exits(part.replace(hidden=hidden), rule, ramp_logits, threshold, config.num_hidden_layers - 1)
    last = isinstance(layer, int) and layer == config.num_hidden_layers - 1
    return state.put_rows(rows, part, hidden=not last)


def bucket_plan(n_active, bucket_sizes):
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


def start_pool(config, params, input_ids, attention_mask, token_type_ids, rule, dtype):
    """-> (mask_bias [N, S], the pool's ExitState before layer 1)."""
    hidden = inference_step.embed(config, params, input_ids, token_type_ids, dtype)
    return (modeling.attention_bias(attention_mask, dtype),
            ExitState.start(hidden, attention_mask, config.num_labels, rule))


def _run_layer(config, step, rule, threshold, mask_bias, state: ExitState, bucket_sizes, layer) -> ExitState:
    """One layer over the pool's running rows, compacted into buckets, all on device."""
    n = mask_bias.shape[0]
    active = ~state.done
    # Running rows first, in pool order; the tail (and an extra bucket's worth) is the
    # out-of-range index n, so every bucket slice stays in bounds and its padding writes nowhere.
    order = jnp.nonzero(active, size=n, fill_value=n)[0].astype(jnp.int32)
    order = jnp.concatenate([order, jnp.full((max(bucket_sizes),), n, jnp.int32)])
    start = jnp.int32(0)
    for size, count in bucket_plan(jnp.sum(active, dtype=jnp.int32), bucket_sizes):
        def bucket(j, state, start=start, size=size):
            rows = jax.lax.dynamic_slice_in_dim(order, start + j * size, size)
            return bucket_step(config, step, rule, threshold, mask_bias, state, rows, layer)
        state = jax.lax.fori_loop(0, count, bucket, state)
        start = start + count * size
    return state


@functools.partial(jax.jit, static_argnames=("config", "rule", "bucket_sizes", "dtype", "attention_impl"))
def _pool_loop_device(config: DeeBertConfig, params, input_ids, attention_mask, token_type_ids, threshold,
                      rule: str, bucket_sizes: tuple[int, ...], dtype, attention_impl: str = "default") -> ExitResult:
    L = config.num_hidden_layers
    threshold = jnp.asarray(threshold, jnp.float32)
    step = inference_step.layer_step(config, params, dtype, first_token_only_at_last=True, attention_impl=attention_impl)
    mask_bias, state = start_pool(config, params, input_ids, attention_mask, token_type_ids, rule, dtype)

    def running(state: ExitState):
        return (state.layer < L - 1) & ~jnp.all(state.done)

    def one_layer(state: ExitState) -> ExitState:
        state = _run_layer(config, step, rule, threshold, mask_bias, state, bucket_sizes, state.layer)
        return state.replace(layer=state.layer + 1)

    state = jax.lax.while_loop(running, one_layer, state)
    # The last layer, peeled off the loop so that it is static: position 0 only, every row exits.
    state = _run_layer(config, step, rule, threshold, mask_bias, state.replace(layer=jnp.int32(L - 1)),
                       bucket_sizes, L - 1)
    return ExitResult(state.logits, state.exit_layer, jnp.max(state.exit_layer))


def default_bucket_sizes(backend: str | None = None) -> tuple[int, ...]:
    """Bucket sizes used when none are given: small on a CPU, larger on a GPU/TPU. `backend`: the
    platform the pool runs on ("cpu", "gpu", "tpu"; default: JAX's default device's)."""
    platform = backend or jax.devices()[0].platform
    return CPU_BUCKET_SIZES if platform == "cpu" else ACCELERATOR_BUCKET_SIZES


def _platform_of(params) -> str | None:
    """Where the params live ("cpu", "gpu", ...); None for host (numpy) arrays."""
    for leaf in jax.tree_util.tree_leaves(params):
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
            return next(iter(leaf.devices())).platform
    return None


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
        raise InputError(f"bucket_sizes={bucket_sizes!r} must be positive integers")
    if int(pool_size) < 1:
        raise InputError(f"pool_size={pool_size!r} must be a positive integer")
    if scheduler not in SCHEDULERS:
        raise InputError(f"scheduler={scheduler!r}; expected one of {SCHEDULERS} (the measured alternatives "
                         "'host' and 'refill' are benchmark-only: benchmarks/exit_aware_alternatives.py)")


def exit_aware_predict(config: DeeBertConfig, params, input_ids, attention_mask, token_type_ids, threshold,
                       rule: str = "entropy", *, bucket_sizes: Sequence[int] | None = None,
                       pool_size: int = DEFAULT_POOL_SIZE, scheduler: str = "device",
                       dtype=jnp.float32, validate_inputs: bool = True,
                       attention_impl: str = "default") -> ExitResult:
    """Early exit over N examples whose cost is about sum(exit_layer) row-layers, not N * max.

    input_ids, attention_mask, token_type_ids [N, S] (any N); -> ExitResult with logits [N, K],
    exit_layer [N] (1-based; 0 for all-padding rows) and layers_run = max exit_layer: row for
    row what `early_exit_predict` gives. The N rows are cut into pools of at most `pool_size`
    (rounded up to the largest bucket); each pool runs layer-major with its running rows compacted
    into buckets of `bucket_sizes` (larger first, the smallest covers the remainder; default
    `default_bucket_sizes` for where the params live). Larger pools waste less on bucket padding and hold [pool, S, H]
    activations in memory. `threshold` is traced: one compiled program serves every threshold.
    `attention_impl`: self-attention's core (`attention.ATTENTION_IMPLS`; "default" unless asked).
    `scheduler`: "device", the only value (kept for callers that pass it; `SCHEDULERS`).
    """
    if bucket_sizes is None:
        bucket_sizes = default_bucket_sizes(_platform_of(params))
    _validate(bucket_sizes, pool_size, scheduler)
    check_attention_impl(attention_impl, dtype)
    if validate_inputs:  # as in `early_exit_predict`
        check_model_inputs(config, input_ids, attention_mask, token_type_ids)
    bucket_sizes = tuple(sorted({int(b) for b in bucket_sizes}, reverse=True))
    check_threshold(threshold, rule)
    n = int(np.shape(input_ids)[0])
    if n == 0:
        k = config.num_labels
        return ExitResult(jnp.zeros((0, k), jnp.float32), jnp.zeros((0,), jnp.int32), jnp.int32(0))
    if not is_tracer(threshold):
        threshold = np.float32(threshold)  # one cache entry for Python floats, numpy and jax scalars
    dtype = jnp.dtype(dtype)
    # Once, not once per pool (numpy params would be copied per call); the per-layer layout lets
    # each bucket read its layer's weights in place.
    params = jax.device_put(layouts.unstack_params(params))
    step = padded_pool_size(pool_size, bucket_sizes, pool_size)
    arrays = [np.asarray(a) for a in (input_ids, attention_mask, token_type_ids)]
    logits, exit_layer = [], []
    for start in range(0, n, step):
        chunk = [a[start:start + step] for a in arrays]
        rows = chunk[0].shape[0]
        padded = padded_pool_size(rows, bucket_sizes, pool_size)
        if padded > rows:  # extra rows are all padding: they start exited and cost an embedding
            chunk = [np.concatenate([a, np.zeros((padded - rows,) + a.shape[1:], a.dtype)]) for a in chunk]
        result = _pool_loop_device(config, params, *chunk, threshold, rule=rule, bucket_sizes=bucket_sizes, dtype=dtype,
                                   attention_impl=attention_impl)
        logits.append(result.logits[:rows])
        exit_layer.append(result.exit_layer[:rows])
    logits = jnp.concatenate(logits) if len(logits) > 1 else logits[0]
    exit_layer = jnp.concatenate(exit_layer) if len(exit_layer) > 1 else exit_layer[0]
    return ExitResult(logits, exit_layer, jnp.max(exit_layer))
