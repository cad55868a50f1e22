"""The serving engine's jitted programs, per padded length: `admit` and the three `step` programs.

Per padded length S the device holds one pool: an `early_exit.ExitState` over P slots (hidden
[P, S, H], logits [P, K], exit_layer, done, the exit rule's state) and mask_bias [P, S]. Each
program takes the pool donated (updated in place, never copied):

- `step`: runs one layer over one group of up to P slots, cut into buckets of `bucket_sizes` by
  `exit_aware.bucket_step` (the exit-aware predictor's own bucket, with
  `early_exit.record_exits`), and returns the group's done flags, exit layers and logits as one
  array (one read). Three step programs (`step_kind`): the first layer's, which first embeds the
  step's new rows (up to `STEP_ADMIT_ROWS`, `ADMIT_ROWS` at a time, as `admit` does), the last
  layer's, and one that every layer between them shares, its layer a traced argument. Each takes
  only its layer's weights and ramp as arguments (`program_params`), so no program holds a
  `lax.switch` over the layers: XLA's CPU runtime sets up every buffer of a program on each run,
  branches not taken included, so a switch made each step's host work grow with the depth.
  Buckets: `CPU_BUCKET_SIZES` (8, 4, 2, 1) on the CPU, so a group of any size runs unpadded;
- `admit`: embeds `ADMIT_ROWS` new rows (`inference_step.embed`) into their slots, fresh exit
  state: only for the new rows of a step past `STEP_ADMIT_ROWS`, before the step.

So the compiled set is fixed (at most 4 programs per length), and what a row computes is what
`exit_aware_predict` computes for it: the same embedding, layer steps and exit update.
`serving.engine.Engine` drives them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deebert_jax.core.config import DeeBertConfig
from deebert_jax.inference import exit_aware
from deebert_jax.inference.early_exit import ExitState
from deebert_jax.model import inference_step, layouts

ADMIT_ROWS = 8           # rows embedded at a time (per admit call, per loop turn in a step)
# New rows a step embeds itself (more: admit calls first, ADMIT_ROWS each): a layer-0 step of up to
# this many new rows is one program call, not two or more (~100 us of host work each on the CPU).
STEP_ADMIT_ROWS = 32     # a multiple of ADMIT_ROWS
# A server's groups are often a few rows (a lone request at low load, the tail of a group after
# exits): buckets of every power of two up to 8 leave no padded row. Measured on the demo's
# MiniLM, length 32, 2 CPU cores, full depth: 1 row 43 ms with (8, 4, 2, 1) against 68 ms with
# the offline default (8, 2), 5 rows 128 against 160 ms, 32 rows 637 against 703 ms; compiling
# takes twice as long (once, before the server is ready).
CPU_BUCKET_SIZES = (8, 4, 2, 1)

def _admit(config, rule, dtype, params, state: ExitState, mask_bias, slots, input_ids, attention_mask,
           token_type_ids):
    """slots [A] (index P: a padding row, written nowhere), inputs [A, S] -> the pool with those
    rows embedded and their exit state reset (what `exit_aware.start_pool` gives them)."""
    bias, part = exit_aware.start_pool(config, params, input_ids, attention_mask, token_type_ids, rule, dtype)
    return state.put_rows(slots, part), mask_bias.at[slots].set(bias, mode="drop")


def _step(config, rule, dtype, bucket_sizes, layer: int | None, params, state: ExitState, mask_bias, rows, count,
          threshold, *rest):
    """One layer (params: `program_params`' {"layer", "ramp"}) over the slots rows[:count]
    (rows [P + max bucket], the rest index P) in buckets -> (pool, [P + max bucket, 2 + K]
    float32: each row's done, exit layer and logits, in `rows` order: one array, one read).
    `layer` 0-based and static, or None: a layer between the first and the last, given as
    rest = (layer,) (traced, so every such layer shares one program). Layer 0 embeds the new rows
    first, rest = (new_slots [STEP_ADMIT_ROWS], new_inputs [3, STEP_ADMIT_ROWS, S] (ids, mask,
    types), new_count): new_inputs into the slots new_slots[:new_count] (the rest index P),
    ADMIT_ROWS at a time, as `_admit` does."""
    static = layer is not None
    if not static:
        (layer,) = rest
    elif layer == 0:
        new_slots, new_inputs, new_count = rest

        def admit(j, pool):
            slots = jax.lax.dynamic_slice_in_dim(new_slots, j * ADMIT_ROWS, ADMIT_ROWS)
            inputs = jax.lax.dynamic_slice_in_dim(new_inputs, j * ADMIT_ROWS, ADMIT_ROWS, axis=1)
            return _admit(config, rule, dtype, params, *pool, slots, *inputs)
        state, mask_bias = jax.lax.fori_loop(0, (new_count + ADMIT_ROWS - 1) // ADMIT_ROWS, admit, (state, mask_bias))
    # A layer between the first and the last is never the last: it runs whole.
    layer_step = inference_step.own_layer_step(config, params["layer"], params["ramp"], dtype,
                                               first_token_only_at_last=static)

    def step(layer, hidden, mask_bias):
        # Behind a conditional (a step always has rows, so it always runs): inlined, XLA fuses a
        # one-row bucket's reads of the pool into its write back, then copies the pool twice an
        # iteration and runs the copies on a second thread (docs/performance.md).
        skip = lambda hidden, mask_bias: (hidden, jnp.zeros((hidden.shape[0], config.num_labels), jnp.float32))
        return jax.lax.cond(count > 0, functools.partial(layer_step, layer), skip, hidden, mask_bias)
    state = state.replace(layer=jnp.asarray(layer, jnp.int32))
    start = jnp.int32(0)
    for size, buckets in exit_aware.bucket_plan(count, bucket_sizes):
        def bucket(j, state, start=start, size=size):
            slots = jax.lax.dynamic_slice_in_dim(rows, start + j * size, size)
            return exit_aware.bucket_step(config, step, rule, threshold, mask_bias, state, slots, layer)
        state = jax.lax.fori_loop(0, buckets, bucket, state)
        start = start + buckets * size
    safe = jnp.minimum(rows, state.done.shape[0] - 1)
    # Exit layers are small integers and done 0 or 1: exact in float32 beside the logits.
    out = jnp.concatenate([state.done[safe, None].astype(jnp.float32),
                           state.exit_layer[safe, None].astype(jnp.float32), state.logits[safe]], axis=1)
    return state, mask_bias, out


def default_bucket_sizes(backend: str | None = None) -> tuple[int, ...]:
    """`CPU_BUCKET_SIZES` on the CPU; on accelerators the exit-aware predictor's (unmeasured) default."""
    if (backend or jax.default_backend()) == "cpu":
        return CPU_BUCKET_SIZES
    return exit_aware.default_bucket_sizes(backend)


def _on_leaves(fn, treedef):
    """`fn(params, ...)` called with the parameters' leaves (a list) instead of their tree."""
    def call(leaves, *args):
        return fn(jax.tree_util.tree_unflatten(treedef, leaves), *args)
    return call


def program_params(params, num_layers: int):
    """Params -> (what `admit` reads: {"embeddings"}, [what layer l's step reads: {"layer", "ramp"},
    its weights and ramp, with "embeddings" too at layer 0])."""
    params = layouts.unstack_params(params)
    admit = {"embeddings": params["embeddings"]}
    return admit, [{"layer": params["layers"][layer], "ramp": params["ramps"][layer], **(admit if layer == 0 else {})}
                   for layer in range(num_layers)]


def step_kind(layer: int, num_layers: int) -> int | None:
    """Which step program runs layer `layer`: the first and the last their own (that layer, static),
    every layer between them one shared program (None: the layer traced)."""
    return layer if layer in (0, num_layers - 1) else None


@functools.lru_cache(maxsize=None)
def programs(config: DeeBertConfig, rule: str, dtype, bucket_sizes: tuple[int, ...], admit_treedef,
              step_treedefs: tuple):
    """The jitted admit function and step functions (entry l runs layer l; the layers between the
    first and the last share one), shared by engines of one model kind (each compiles once per
    padded length and pool size; later calls with the same shapes never compile). Each takes its
    parameters (`program_params`) as its treedef's leaves: a flat list is dispatched faster than
    the nested dict (0.85 against 1.3 ms a call for MiniLM-L6's 125 arrays)."""
    admit = _on_leaves(functools.partial(_admit, config, rule, dtype), admit_treedef)
    L, jitted = config.num_hidden_layers, {}
    for layer, treedef in enumerate(step_treedefs):
        kind = step_kind(layer, L)
        if kind not in jitted:
            jitted[kind] = jax.jit(_on_leaves(functools.partial(_step, config, rule, dtype, bucket_sizes, kind),
                                              treedef), donate_argnums=(1, 2))
    return jax.jit(admit, donate_argnums=(1, 2)), tuple(jitted[step_kind(layer, L)] for layer in range(L))
