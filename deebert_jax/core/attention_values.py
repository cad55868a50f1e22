"""The values of self-attention's core that every kernel choice computes alike: heads transposed,
scores, a float32 softmax, dropout as `nn.Dropout` applies it, the weighted sum.

`model.attention` (the "reference" kernels, differentiated by autodiff) and `cpu.attention` (the
same forward with a hand-written backward, "cpu_tuned") both build on these, so the two forwards
are one code; they sit below both packages so neither imports the other's internals.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def heads(t, order):
    """[B, S, h, d] -> its heads in `order` ((0, 2, 1, 3): [B, h, S, d]; (0, 2, 3, 1): [B, h, d, S])."""
    return jnp.transpose(t, order)


def forward_values(q, k, v, mask_bias, keep, rate):
    qh, kt, vh = heads(q, (0, 2, 1, 3)), heads(k, (0, 2, 3, 1)), heads(v, (0, 2, 1, 3))
    scores = (qh @ kt).astype(jnp.float32) / jnp.sqrt(q.shape[-1]).astype(jnp.float32)
    scores = scores + mask_bias[:, None, None, :].astype(jnp.float32)
    probs = jax.nn.softmax(scores, axis=-1)
    dropped = dropout(probs, keep, rate)
    context = jnp.transpose(dropped.astype(q.dtype) @ vh, (0, 2, 1, 3))
    return context, (probs, kt, vh)


def dropout(x, keep, rate):
    # As `nn.Dropout` applies it (same select, same scaling), so the forward is bit for bit its.
    if keep is None:
        return x
    return lax.select(keep, x / (1.0 - rate), jnp.zeros_like(x))
