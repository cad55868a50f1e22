"""`matmul.dense_matmul`: forward bit for bit `lax.dot_general`, gradients autodiff's to rounding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from deebert_jax.cpu.matmul import dense_dot_general, dense_matmul

DENSE = (((2,), (0,)), ((), ()))


def _plain(x, w):
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("n_out", [6, 12])   # g narrower than x (g^T transposed) / wider (x^T)
def test_values_and_gradients_match_autodiff(dtype, tol, n_out):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k1, (3, 5, 8), dtype)
    w = jax.random.normal(k2, (8, n_out), dtype)
    probe = jax.random.normal(k3, (3, 5, n_out), jnp.float32)
    np.testing.assert_array_equal(np.asarray(dense_matmul(x, w), np.float32), np.asarray(_plain(x, w), np.float32))

    def loss(f):
        return lambda x, w: jnp.sum(jnp.tanh(f(x, w).astype(jnp.float32)) * probe)

    ours = jax.grad(loss(dense_matmul), argnums=(0, 1))(x, w)
    ref = jax.grad(loss(_plain), argnums=(0, 1))(x, w)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def test_other_contractions_fall_back_to_dot_general():
    a, b = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
    batched = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_array_equal(dense_dot_general(a, b, batched), lax.dot_general(a, b, batched))
    x, w = jnp.arange(24.0).reshape(2, 3, 4), jnp.arange(20.0).reshape(4, 5)
    np.testing.assert_array_equal(dense_dot_general(x, w, DENSE), _plain(x, w))
    # Under vmap (the off-ramps are a vmapped Dense) the gradient still matches.
    xs, ws = jnp.stack([x, x + 1]), jnp.stack([w, w * 2])
    f = lambda fn: jax.grad(lambda xs, ws: jnp.sum(jax.vmap(fn)(xs, ws) ** 2), argnums=1)(xs, ws)
    np.testing.assert_allclose(f(dense_matmul), f(_plain), rtol=1e-6)
