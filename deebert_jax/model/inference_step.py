"""The inference step as pure functions: `embed`, one layer and its ramp (`layer_step`), `forward`.

Every inference loop runs on `layer_step`: the full forward below, the while_loop predictor
(`inference.early_exit`) and exit-aware batching (`inference.exit_aware`). Eval mode throughout.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from deebert_jax.core.config import DeeBertConfig
from deebert_jax.data.validation import check_model_inputs
from deebert_jax.model import attention as attention_lib
from deebert_jax.model.layouts import is_unstacked, per_layer, static_index
from deebert_jax.model.modeling import DeeBert, Embeddings, Layer, Ramp, attention_bias, ramp_input

Params = Any


def embed(config: DeeBertConfig, params: Params, input_ids, token_type_ids, dtype=jnp.float32) -> jax.Array:
    """[B, S] ids -> [B, S, H] (eval mode)."""
    return Embeddings(config, dtype).apply({"params": params["embeddings"]}, input_ids, token_type_ids)


def layer_forward(config: DeeBertConfig, layer_params: Params, hidden, mask_bias, dtype=jnp.float32,
                  first_token_only: bool = False, *, attention_impl: str = "default") -> jax.Array:
    """One layer's parameters (no L axis), hidden [B, S, H] -> [B, S, H] (eval mode).

    `first_token_only`: position 0 alone as queries -> [B, 1, H] (what the ramps read).
    `attention_impl`: see `Layer`.
    """
    layer = Layer(config, dtype, first_token_only=first_token_only, attention_impl=attention_impl)
    return layer.apply({"params": layer_params}, hidden, mask_bias)


def ramp_forward(config: DeeBertConfig, ramp_params: Params, hidden, mask_bias, layer,
                 dtype=jnp.float32) -> jax.Array:
    """Ramp `layer`'s parameters (no L axis), that layer's output hidden [B, S, H] -> logits [B, K].

    `layer` (0-based, may be traced) and mask_bias [B, S] decide what the ramp reads (`ramp_input`).
    """
    return Ramp(config, dtype).apply({"params": ramp_params}, ramp_input(config, hidden, mask_bias, layer))


def _layer_apply(config, layer_params, layer, hidden, mask_bias, dtype, first_token_only_at_last,
                 attention_impl: str = "default"):
    """Layer `layer` (0-based, int or traced) -> [B, S, H]; with `first_token_only_at_last` the last
    layer updates position 0 only (the other positions keep their input), all a ramp reads there."""
    whole = functools.partial(layer_forward, config, layer_params, mask_bias=mask_bias, dtype=dtype,
                              attention_impl=attention_impl)
    if not first_token_only_at_last:
        return whole(hidden=hidden)

    def first_only(hidden):
        first = whole(hidden=hidden, first_token_only=True)
        return jax.lax.dynamic_update_slice_in_dim(hidden, first.astype(hidden.dtype), 0, axis=1)

    last = config.num_hidden_layers - 1
    static = static_index(layer)
    if static is not None:
        return first_only(hidden) if static == last else whole(hidden=hidden)
    return jax.lax.cond(layer == last, first_only, lambda h: whole(hidden=h), hidden)


def own_layer_step(config: DeeBertConfig, layer_params: Params, ramp_params: Params, dtype=jnp.float32, *,
                   first_token_only_at_last: bool = False,
                   attention_impl: str = "default") -> Callable[..., tuple[jax.Array, jax.Array]]:
    """One layer's own weights and ramp (no L axis) -> `step(layer, hidden [B, S, H], mask_bias
    [B, S]) -> (hidden [B, S, H], ramp_logits [B, K])`, `layer` (0-based, int or traced) the layer
    they are. `layer_step`'s step, for a caller that holds the weights itself."""
    def step(layer, hidden, mask_bias):
        hidden = _layer_apply(config, layer_params, layer, hidden, mask_bias, dtype, first_token_only_at_last,
                              attention_impl)
        return hidden, ramp_forward(config, ramp_params, hidden, mask_bias, layer, dtype)

    return step


def layer_step(config: DeeBertConfig, params: Params, dtype=jnp.float32, *,
               first_token_only_at_last: bool = False,
               attention_impl: str = "default") -> Callable[..., tuple[jax.Array, jax.Array]]:
    """-> `step(layer, hidden [B, S, H], mask_bias [B, S]) -> (hidden [B, S, H], ramp_logits [B, K])`.

    One layer and its ramp, eval mode, `layer` 0-based (int or traced); the params layout is
    decided here, once per call site (`per_layer`). Every inference loop runs on this step:
    `forward`, the while_loop predictor and exit-aware batching.
    `first_token_only_at_last`: see `_layer_apply`; `attention_impl`: see `Layer`.
    """
    def one(layer_params, ramp_params, layer, hidden, mask_bias):
        return own_layer_step(config, layer_params, ramp_params, dtype, first_token_only_at_last=first_token_only_at_last,
                              attention_impl=attention_impl)(layer, hidden, mask_bias)

    return per_layer(params, one)


def forward(config: DeeBertConfig, params: Params, input_ids, attention_mask, token_type_ids,
            dtype=jnp.float32, *, attention_impl: str = "default") -> jax.Array:
    """Full-depth eval forward -> ramp logits [L, B, K].

    Stacked params run the Flax module (the training graph, `nn.scan` over layers). Params in the
    serving layout (`layouts.unstack_params`) take the inference path: a loop over `layer_step` (the same step as the
    early-exit loops, each layer's weights read in place), the last layer computed for the first
    token only, which is all the ramps read. Both agree to float32 rounding
    (`tests/test_layouts.py`). Inputs are checked (`validation.check_model_inputs`); under a
    caller's `jit` only their shapes and dtypes can be. `attention_impl`: self-attention's core
    (`attention.ATTENTION_IMPLS`; "default" unless asked).
    """
    check_model_inputs(config, input_ids, attention_mask, token_type_ids)
    attention_lib.check_attention_impl(attention_impl, dtype)
    if not is_unstacked(params):
        return DeeBert(config, dtype, attention_impl).apply({"params": params}, input_ids, attention_mask,
                                                            token_type_ids)
    step = layer_step(config, params, dtype, first_token_only_at_last=True, attention_impl=attention_impl)
    mask_bias = attention_bias(attention_mask, dtype)
    L, K = config.num_hidden_layers, config.num_labels

    def body(i, carry):
        hidden, logits = carry
        hidden, ramp_logits = step(i, hidden, mask_bias)
        return hidden, logits.at[i].set(ramp_logits)

    # A loop rather than L unrolled layers: as fast in float32, and XLA's CPU fusion of bf16
    # converts across unrolled layer boundaries made the unrolled graph 1.5x slower in bf16.
    hidden = embed(config, params, input_ids, token_type_ids, dtype)
    logits = jnp.zeros((L, input_ids.shape[0], K), jnp.float32)
    hidden, logits = jax.lax.fori_loop(0, L - 1, body, (hidden, logits))
    _, last_logits = step(L - 1, hidden, mask_bias)
    return logits.at[L - 1].set(last_logits)
