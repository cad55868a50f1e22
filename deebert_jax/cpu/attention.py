"""Attention's backward for XLA's CPU matmul kernels: the core of `model.attention` with a custom VJP.

Forward it computes what `model.attention.attention_autodiff` does, bit for bit. Backward,
autodiff asked for the value and key gradients as batched matmuls contracting the left
operand's second-to-last dimension (`P^T @ dO`, `q^T @ dS`); XLA's CPU backend runs that form in a
generic loop, not its library kernels. Here both are plain matmuls on small transposed operands
(`dO^T @ P` gives `dV^T`; `q^T` is laid out in the forward, behind an optimization barrier so XLA
does not fold the transpose back). What the backward keeps is the softmax output, the dropout
mask (bool) and q, k, v in the layouts its matmuls read. Gradients agree with autodiff's to float
rounding (tests/test_attention.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from deebert_jax.core.attention_values import dropout, forward_values, heads


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def attention(q, k, v, mask_bias, keep, rate):
    """q [B, Sq, h, d], k and v [B, S, h, d], mask_bias [B, S] additive, keep [B, h, Sq, S] bool (the
    dropout mask of the attention probabilities; None: no dropout), rate (its dropout rate)
    -> context [B, Sq, h, d] in q's dtype."""
    return forward_values(q, k, v, mask_bias, keep, rate)[0]


def _fwd(q, k, v, mask_bias, keep, rate):
    context, (probs, kt, vh) = forward_values(q, k, v, mask_bias, keep, rate)
    qt = lax.optimization_barrier(heads(q, (0, 2, 3, 1)))   # [B, h, d, Sq], for dK^T = q^T @ dS
    return context, (probs, keep, qt, kt, vh, mask_bias)


def _bwd(rate, residuals, g):
    probs, keep, qt, kt, vh, mask_bias = residuals
    dt = g.dtype
    batched = lambda lhs, rhs, contract: lax.dot_general(lhs, rhs, (((3,), (contract,)), ((0, 1), (0, 1))))
    d_out = heads(g, (0, 2, 1, 3))                                      # [B, h, Sq, d]
    d_out_t = lax.optimization_barrier(heads(g, (0, 2, 3, 1)))          # [B, h, d, Sq]
    dropped = dropout(probs, keep, rate).astype(dt)
    d_vt = batched(d_out_t, dropped, 2)                                  # dV^T = dO^T @ P: [B, h, d, S]
    d_dropped = batched(d_out, vh, 3).astype(jnp.float32)                # dO @ V^T: [B, h, Sq, S]
    d_probs = dropout(d_dropped, keep, rate)
    d_scores = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))  # softmax's VJP
    d_mask_bias = jnp.sum(d_scores, axis=(1, 2)).astype(mask_bias.dtype)
    d_qk = (d_scores / jnp.sqrt(qt.shape[2]).astype(jnp.float32)).astype(dt)
    d_q = batched(d_qk, kt, 3)                                           # dS @ K: [B, h, Sq, d]
    d_kt = batched(qt, d_qk, 2)                                          # dK^T = q^T @ dS: [B, h, d, S]
    return (jnp.transpose(d_q, (0, 2, 1, 3)), jnp.transpose(d_kt, (0, 3, 1, 2)),
            jnp.transpose(d_vt, (0, 3, 1, 2)), d_mask_bias, None)


attention.defvjp(_fwd, _bwd)
