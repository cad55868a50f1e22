"""Test helpers: one layer's or ramp's weights and outputs by index, on either parameter layout."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from deebert_jax.core.config import DeeBertConfig
from deebert_jax.model.layouts import per_layer
from deebert_jax.model.inference_step import _layer_apply, ramp_forward

Params = Any


def layer_params_at(params: Params, index) -> Params:
    """The parameters of layer `index` (0-based, may be traced) without the L axis.

    A copy of the layer's weights when `index` is traced; `layer_step` avoids it.
    """
    return per_layer(params, lambda layer_params, ramp_params, layer: layer_params)(index)


def ramp_params_at(params: Params, index) -> Params:
    """The parameters of ramp `index` (0-based, may be traced) without the L axis."""
    return per_layer(params, lambda layer_params, ramp_params, layer: ramp_params)(index)


def layer_forward_at(config: DeeBertConfig, params: Params, index, hidden, mask_bias, dtype=jnp.float32,
                     first_token_only_at_last: bool = False) -> jax.Array:
    """Layer `index` (0-based, may be traced) of the whole model's params, hidden [B, S, H] -> [B, S, H].

    `layer_step` without the ramp; `first_token_only_at_last` as there.
    """
    run = per_layer(params, lambda lp, rp, layer, hidden: _layer_apply(
        config, lp, layer, hidden, mask_bias, dtype, first_token_only_at_last))
    return run(index, hidden)


def ramp_forward_at(config: DeeBertConfig, params: Params, index, hidden, mask_bias, dtype=jnp.float32) -> jax.Array:
    """Ramp `index` (0-based, may be traced) of the whole model's params, hidden [B, S, H],
    mask_bias [B, S] -> [B, K]."""
    run = per_layer(params, lambda lp, rp, layer, hidden: ramp_forward(
        config, rp, hidden, mask_bias, layer, dtype))
    return run(index, hidden)
