"""Training's layer stack written out: what `DeeBert`'s `nn.scan` computes, the last layer for the
first token only, with the same parameters and dropout bits."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax.core.scope import LazyRng

from deebert_jax.core.errors import InputError
from deebert_jax.core.config import DeeBertConfig
from deebert_jax.model import kernels as kernels_lib
from deebert_jax.model.layer import Layer, mean_of_real_tokens

Params = Any


def scan_dropout_keys(rng, scope_name: str, length: int) -> Callable[[Any], Any]:
    """-> `key_at(i)`: the rng `nn.scan(split_rngs={"dropout": True})` gives iteration i (int or
    slice) of a scan named `scope_name` over `length` steps (None when `rng` is None).

    The one place that depends on how Flax splits a scope's rngs (`flax.core.scope.LazyRng`, not
    a public API): the "layers" scope's key split `length` ways, its static path suffix (folded in
    when a dropout draws its key) kept. tests/test_modeling.py compares the result with the scan's
    own dropout bits, so a change in Flax fails there, loudly.
    """
    if rng is None:
        return lambda i: None
    scoped = LazyRng.create(rng, scope_name)
    keys, suffix = jax.random.split(jax.random.clone(scoped.rng), length), scoped.suffix
    return lambda i: LazyRng(keys[i], suffix)


def training_layers(config: DeeBertConfig, dtype, layer_params: Params, rng, hidden, mask_bias,
                     layers: int | None = None, kernels: str = "reference") -> jax.Array:
    """The first `layers` layers (default all L) in training (dropout on) -> what ramps 1..layers
    read [layers, B, H] (as `ramp_input`).

    `DeeBert`'s `nn.scan` over the layers, written out so that the last layer computed, whose
    output only its ramp reads (the first token: ramp L, or any ramp under "first" pooling),
    computes position 0 alone: the query projection, attention for one query row, the output
    dense, layer norms and FFN on one position of each row; keys and values for all. Every layer
    gets what the scan gives it: its slice of `layer_params` (the stacked tree, leading L axis),
    the dropout key `flax.core.lift.scan` splits off `rng` (the module's dropout rng, None without
    one) under the scope name "layers", and the scan's second draw of it (`Layer.dropout_key_draw`);
    a first-token-only layer takes row 0 of its full-size masks (`Layer.first_token_only`). Same
    values and dropout bits as the scan (tests/test_modeling.py). hidden [B, S, H], mask_bias [B, S].
    """
    L = config.num_hidden_layers
    n = L if layers is None else layers
    if not 1 <= n <= L:
        raise InputError(f"layers={layers!r}: expected 1..{L}")
    mean = config.ramp_pooling == "mean"
    # Ramp n reads the first token unless it is an off-ramp under "mean" pooling.
    last_first_token_only = n == L or not mean
    rng_at = scan_dropout_keys(rng, "layers", L)

    def run(params, layer_rng, hidden, first_token_only):
        layer = Layer(config, dtype, deterministic=False, first_token_only=first_token_only, dropout_key_draw=2,
                      kernels=kernels)
        return layer.apply({"params": params}, hidden, mask_bias,
                           rngs={} if layer_rng is None else {"dropout": layer_rng})

    def ramp_features(hidden):
        return mean_of_real_tokens(hidden, mask_bias) if mean else hidden[:, 0]

    leaves, treedef = jax.tree_util.tree_flatten(layer_params)
    features = []
    if kernels_lib.tuned_training_layout(kernels):
        # Unrolled: a rolled scan keeps the backward's residuals in zero-filled [L, ...] buffers
        # written one layer at a time (0.6 s of a 5 s MiniLM step on one CPU thread); unrolled,
        # each layer's are buffers of their own. One split per leaf: the gradients are joined by
        # one concatenation.
        parts = [jnp.split(leaf, L) for leaf in leaves]
        layer_at = lambda i: treedef.unflatten([p[i][0] for p in parts])
        for i in range(n - 1):
            hidden = run(layer_at(i), rng_at(i), hidden, False)
            features.append(ramp_features(hidden)[None])
        last = layer_at(n - 1)
    else:
        parts = [jnp.split(leaf, [n - 1, n]) for leaf in leaves]
        if n > 1:
            def body(hidden, xs):
                hidden = run(*xs, hidden, False)
                return hidden, ramp_features(hidden)

            head = treedef.unflatten([p[0] for p in parts])
            hidden, head_features = jax.lax.scan(body, hidden, (head, rng_at(slice(0, n - 1))))
            features.append(head_features)
        last = treedef.unflatten([p[1][0] for p in parts])
    if last_first_token_only:
        features.append(run(last, rng_at(n - 1), hidden, True)[:, 0][None])
    else:
        features.append(ramp_features(run(last, rng_at(n - 1), hidden, False))[None])
    return jnp.concatenate(features)
