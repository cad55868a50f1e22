"""Self-attention's core (scores, softmax, dropout, the weighted sum), as every kernel choice runs it.

Heads as [B, h, S, d], keys as [B, h, d, S], plain batched matmuls, a float32 softmax and dropout
as `nn.Dropout` applies it. `attention_autodiff` is differentiated by autodiff ("reference"
kernels); `cpu.attention.attention` is the same forward with a backward for XLA's CPU kernels
("cpu_tuned"). `first_query_attention` serves a layer that computes position 0 only, on every
backend.

For inference only, `fused_attention` runs `jax.nn.dot_product_attention` instead (opt-in:
`attention_impl` "dot_product_attention" or "cudnn"; "default" is the code here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deebert_jax.core import attention_values as values
from deebert_jax.core.errors import InputError


def attention_autodiff(q, k, v, mask_bias, keep, rate):
    """q [B, Sq, h, d], k and v [B, S, h, d], mask_bias [B, S] additive, keep [B, h, Sq, S] bool (the
    dropout mask of the attention probabilities; None: no dropout), rate (its dropout rate)
    -> context [B, Sq, h, d] in q's dtype. Differentiated by autodiff ("reference" kernels)."""
    return values.forward_values(q, k, v, mask_bias, keep, rate)[0]


def first_query_attention(q, hidden, key_kernel, key_bias, value_kernel, value_bias, mask_bias, keep, rate):
    """Attention for one query per row without projecting every position's keys and values.

    q [B, 1, h, d] (the first token's query), hidden [B, S, H] (the layer's input), the key and
    value projections' kernels [H, h * d] and biases [h * d], mask_bias [B, S], keep [B, h, 1, S]
    (None: no dropout) -> context [B, 1, h, d] in q's dtype. The same function as `attention` on
    k = hidden @ key_kernel + key_bias (likewise v), regrouped: q . k_s = (key_kernel q) . hidden_s +
    key_bias . q, and sum_s p_s v_s = (sum_s p_s hidden_s) @ value_kernel + (sum_s p_s) value_bias,
    so the [B, S, h * d] projections (2 S H^2 multiply-adds a row) become [B, h, H] ones (4 h S H).
    Values agree with `attention`'s to float rounding (tests/test_attention.py).
    """
    B, S, H = hidden.shape
    h, d = q.shape[-2:]
    dt = q.dtype
    q1, x = q[:, 0], hidden.astype(dt)                                    # [B, h, d], [B, S, H]
    wk, wv = key_kernel.astype(dt).reshape(H, h, d), value_kernel.astype(dt).reshape(H, h, d)
    q_in_hidden = jnp.einsum("bhd,Hhd->bhH", q1, wk)                      # [B, h, H]
    scores = jnp.einsum("bhH,bsH->bhs", q_in_hidden, x)
    scores = scores + jnp.einsum("bhd,hd->bh", q1, key_bias.astype(dt).reshape(h, d))[..., None]
    scores = scores.astype(jnp.float32) / jnp.sqrt(d).astype(jnp.float32)
    probs = jax.nn.softmax(scores + mask_bias[:, None, :].astype(jnp.float32), axis=-1)
    dropped = values.dropout(probs[:, :, None], keep, rate)[:, :, 0].astype(dt)  # [B, h, S]
    context = jnp.einsum("bhH,Hhd->bhd", jnp.einsum("bhs,bsH->bhH", dropped, x), wv)
    context = context + jnp.sum(dropped, axis=-1)[..., None] * value_bias.astype(dt).reshape(h, d)
    return context[:, None]


# ----------------------------------------------------------------------------------------------
# Inference alternatives: `jax.nn.dot_product_attention` (opt-in, eval only; "default" is the above)

# "default": `attention` / `attention_autodiff` above, as the layer always ran. The other two call
# `jax.nn.dot_product_attention`: "dot_product_attention" lets JAX choose the implementation
# (`implementation=None`), "cudnn" asks for cuDNN's fused kernel (NVIDIA GPUs, bf16 or fp16).
ATTENTION_IMPLS = ("default", "dot_product_attention", "cudnn")


def attention_impl_problem(impl: str, dtype=None, *, backend: str | None = None,
                           dropout: bool = False) -> str | None:
    """Why `impl` cannot run here (None when it can): an unknown name; a fused choice asked for
    attention-probs dropout (training), which `jax.nn.dot_product_attention` does not offer;
    "cudnn" off an NVIDIA GPU (`backend`, default `jax.default_backend()`) or at a compute
    `dtype` other than bfloat16 / float16."""
    if impl not in ATTENTION_IMPLS:
        return f"expected one of {', '.join(ATTENTION_IMPLS)}"
    if impl == "default":
        return None
    if dropout:
        return ("jax.nn.dot_product_attention has no attention-probs dropout, so it serves inference only; "
                "train with 'default' (or attention_probs_dropout_prob=0)")
    if impl == "cudnn":
        backend = backend or jax.default_backend()
        if backend != "gpu":
            return (f"cuDNN's fused attention needs an NVIDIA GPU, and JAX is running on {backend}; "
                    "'dot_product_attention' runs anywhere")
        if dtype is not None and jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return f"cuDNN's fused attention computes in bfloat16 or float16, not {jnp.dtype(dtype).name} (use precision bf16)"
    return None


def check_attention_impl(impl: str, dtype=None, *, backend: str | None = None, dropout: bool = False) -> None:
    """Raises ValueError("attention_impl=...: why") when `attention_impl_problem` finds one."""
    problem = attention_impl_problem(impl, dtype, backend=backend, dropout=dropout)
    if problem:
        raise InputError(f"attention_impl={impl!r}: {problem}")


def fused_attention(q, k, v, mask_bias, impl: str):
    """`jax.nn.dot_product_attention` in the layer's terms, eval only (no dropout): q [B, Sq, h, d],
    k and v [B, S, h, d], mask_bias [B, S] additive (0 on real keys, as `modeling.attention_bias`
    makes it) -> context [B, Sq, h, d] in q's dtype.

    "dot_product_attention" adds the same additive bias to float32 scores, as `attention` does, so
    padded keys get exactly zero weight and an all-padding row the same uniform weights; in
    bfloat16 its scores leave the matmul as float32 (`attention` rounds them to bfloat16 first).
    "cudnn" takes the padding as a boolean mask, which JAX turns into a bias of q's dtype holding
    the large negative it picks for cuDNN (-2**41 in bfloat16: cuDNN mishandles the difference of
    two dtype minimums), broadcast over the queries because cuDNN reads a bias row per query.
    """
    if impl == "cudnn":
        B, Sq, S = q.shape[0], q.shape[1], k.shape[1]
        keep = jnp.broadcast_to((mask_bias == 0)[:, None, None, :], (B, 1, Sq, S))
        return jax.nn.dot_product_attention(q, k, v, mask=keep, implementation="cudnn")
    if impl == "dot_product_attention":
        bias = mask_bias[:, None, None, :].astype(jnp.float32)
        return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=None)
    raise InputError(f"attention_impl={impl!r}: fused_attention runs 'dot_product_attention' or 'cudnn'")
