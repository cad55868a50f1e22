"""Elementwise pieces of the training graph written so XLA's CPU fusion computes them once.

XLA's CPU fusion copies chains of cheap elementwise operations into every reader: a dropout mask
(threefry's integer arithmetic) read by the forward and kept for the backward was drawn two or
three times, and the exact GELU's erfc polynomial was evaluated in each of the four fusions that
read it. `lax.optimization_barrier` does not stop this (the CPU pipeline removes barriers before
fusion). `computed_once` does: a division by a 1 the compiler cannot fold is, to XLA, an expensive
operation, so it is computed and stored once. Values are unchanged bit for bit
(tests/test_fusion.py).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def computed_once(x: jax.Array) -> jax.Array:
    """x (any float dtype or bool), the same bits, as the output of an operation XLA stores once."""
    x0 = x.reshape(-1)[0].astype(jnp.float32)
    one = jnp.where(jnp.isfinite(x0), x0 * 0 + 1, 1)          # always 1, unknown to the compiler
    if x.dtype == jnp.bool_:
        return jax.lax.div(x.astype(jnp.uint8), one.astype(jnp.uint8)) != 0
    return x / one.astype(x.dtype)                              # x / 1 is x exactly (IEEE)


def gelu_with_derivative(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-> (`jax.nn.gelu(x, approximate=False)` bit for bit, its derivative), erfc evaluated once."""
    sqrt_half = np.sqrt(0.5).astype(x.dtype)
    e = computed_once(jax.lax.erfc(-x * sqrt_half))
    y = jnp.array(0.5 * x * e, dtype=x.dtype)                 # jax.nn.gelu's own expression
    z = x * sqrt_half
    two_over_sqrt_pi = np.float32(2 / np.sqrt(np.pi)).astype(x.dtype)
    dy = 0.5 * e + 0.5 * x * (two_over_sqrt_pi * jnp.exp(-z * z)) * sqrt_half
    return y, dy.astype(x.dtype)


def _is_exact_gelu(fn) -> bool:
    return getattr(fn, "func", None) is jax.nn.gelu and getattr(fn, "keywords", None) == {"approximate": False}


def stored_derivative(fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """An elementwise `fn` whose backward multiplies by `fn'(x)`, computed in the forward.

    What the backward keeps is `fn'(x)` alone ([B, S, 4H] for the FFN's activation; autodiff of the
    exact GELU kept several of erfc's intermediates). Values are `fn`'s; gradients autodiff's to
    float rounding (for bf16 inputs the derivative is computed in float32, then rounded).
    """
    @jax.custom_vjp
    def f(x):
        return fn(x)

    def forward(x):
        if jnp.finfo(x.dtype).bits < 32:
            # bf16: the derivative in float32 (its terms cancel; in bf16 it lost most digits).
            x32 = x.astype(jnp.float32)
            return fn(x), jax.jvp(fn, (x32,), (jnp.ones_like(x32),))[1].astype(x.dtype)
        if _is_exact_gelu(fn):
            return gelu_with_derivative(x)
        return jax.jvp(fn, (x,), (jnp.ones_like(x),))

    def backward(dy, g):
        return (g * dy,)

    f.defvjp(forward, backward)
    return f
