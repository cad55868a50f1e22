"""`cpu.attention.attention`: forward bit for bit the layer's old attention, gradients autodiff's to
rounding, and the backward free of transposed-left batched matmuls."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deebert_jax.cpu.attention import attention
from deebert_jax.model.attention import attention_autodiff


def _reference(q, k, v, mask_bias, keep, rate):
    """The layer's attention before the custom VJP (heads transposed, plain batched matmuls, nn.Dropout)."""
    qh, kt, vh = jnp.transpose(q, (0, 2, 1, 3)), jnp.transpose(k, (0, 2, 3, 1)), jnp.transpose(v, (0, 2, 1, 3))
    scores = (qh @ kt).astype(jnp.float32) / jnp.sqrt(q.shape[-1]).astype(jnp.float32)
    probs = jax.nn.softmax(scores + mask_bias[:, None, None, :].astype(jnp.float32), axis=-1)
    if keep is not None:
        probs = jax.lax.select(keep, probs / (1.0 - rate), jnp.zeros_like(probs))
    return jnp.transpose(probs.astype(q.dtype) @ vh, (0, 2, 1, 3))


def _inputs(dtype, sq=5, s=5, dropout=True):
    ks = jax.random.split(jax.random.PRNGKey(1), 5)
    q = jax.random.normal(ks[0], (2, sq, 3, 4), dtype)
    k, v = (jax.random.normal(key, (2, s, 3, 4), dtype) for key in ks[1:3])
    mask_bias = jnp.where(jnp.arange(s) < s - 1, 0.0, -1e9)[None].repeat(2, 0).at[0].set(0.0).astype(dtype)
    keep = jax.random.bernoulli(ks[3], 0.8, (2, 3, sq, s)) if dropout else None
    probe = jax.random.normal(ks[4], (2, sq, 3, 4), jnp.float32)
    return (q, k, v, mask_bias, keep, 0.2), probe


@pytest.mark.parametrize("dtype, tol, sq, dropout", [(jnp.float32, 1e-5, 5, True), (jnp.float32, 1e-5, 5, False),
                                                     (jnp.bfloat16, 3e-2, 5, True)])
def test_values_and_gradients_match_autodiff(dtype, tol, sq, dropout):
    args, probe = _inputs(dtype, sq=sq, dropout=dropout)
    out = attention(*args)
    assert out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(_reference(*args), np.float32))

    def loss(f):
        return lambda q, k, v, m: jnp.sum(jnp.tanh(f(q, k, v, m, *args[4:]).astype(jnp.float32)) * probe)

    ours = jax.grad(loss(attention), argnums=(0, 1, 2, 3))(*args[:4])
    ref = jax.grad(loss(_reference), argnums=(0, 1, 2, 3))(*args[:4])
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = max(1.0, float(jnp.max(jnp.abs(b.astype(jnp.float32)))))
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol * scale)
    np.testing.assert_array_equal(np.asarray(attention_autodiff(*args)), np.asarray(out))


def test_backward_uses_plain_batched_matmuls():
    """Autodiff's backward contracts a batched matmul's left operand over its second-to-last
    dimension (XLA's slow CPU path); ours contracts only last dimensions on the left."""
    args, probe = _inputs(jnp.float32, sq=16, s=16)
    left_transposed = re.compile(r"lhs_batch_dims=\{0,1\}, lhs_contracting_dims=\{2\}")

    def hlo(f):
        grad = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v, *args[3:]) * probe), argnums=(0, 1, 2))
        return jax.jit(grad).lower(*args[:3]).compile().as_text()

    assert left_transposed.search(hlo(attention_autodiff))   # the check can fail: autodiff has them
    assert not left_transposed.search(hlo(attention))


@pytest.mark.parametrize("dtype, tol, dropout", [(jnp.float32, 1e-5, True), (jnp.float32, 1e-5, False),
                                                 (jnp.bfloat16, 5e-2, True)])
def test_first_query_attention_is_attention_on_projected_keys_and_values(dtype, tol, dropout):
    """`first_query_attention` folds the key and value projections into the one query: the same
    context and gradients (query, hidden, kernels, biases) as projecting every position first."""
    from deebert_jax.model.attention import first_query_attention

    B, S, H, h, d = 2, 6, 12, 3, 4
    ks = jax.random.split(jax.random.PRNGKey(2), 8)
    hidden = jax.random.normal(ks[0], (B, S, H), dtype)
    q = jax.random.normal(ks[1], (B, 1, h, d), dtype)
    wk, wv = (0.3 * jax.random.normal(k, (H, h * d), jnp.float32) for k in ks[2:4])
    bk, bv = (jax.random.normal(k, (h * d,), jnp.float32) for k in ks[4:6])
    mask_bias = jnp.zeros((B, S), dtype).at[1, S - 2:].set(-1e9)
    keep = jax.random.bernoulli(ks[6], 0.8, (B, h, 1, S)) if dropout else None
    probe = jax.random.normal(ks[7], (B, 1, h, d), jnp.float32)

    def projected(q, hidden, wk, bk, wv, bv):
        k = (hidden @ wk.astype(dtype) + bk.astype(dtype)).reshape(B, S, h, d)
        v = (hidden @ wv.astype(dtype) + bv.astype(dtype)).reshape(B, S, h, d)
        return attention_autodiff(q, k, v, mask_bias, keep, 0.2)

    def folded(q, hidden, wk, bk, wv, bv):
        return first_query_attention(q, hidden, wk, bk, wv, bv, mask_bias, keep, 0.2)

    args = (q, hidden, wk, bk, wv, bv)
    ours, ref = folded(*args), projected(*args)
    assert ours.dtype == dtype and ours.shape == (B, 1, h, d)
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol)
    grad = lambda fn: jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * probe), argnums=tuple(range(6)))(*args)
    for name, a, b in zip(("q", "hidden", "wk", "bk", "wv", "bv"), grad(folded), grad(projected)):
        scale = max(1.0, float(jnp.max(jnp.abs(b.astype(jnp.float32)))))
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol * scale,
                                   err_msg=name)
