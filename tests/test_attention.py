"""`attention.attention`: forward bit for bit the layer's old attention, gradients autodiff's to
rounding, and the backward free of transposed-left batched matmuls."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deebert_jax.attention import attention, attention_autodiff


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
