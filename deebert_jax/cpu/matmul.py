"""The dense layers' matmul, with a backward pass laid out for XLA's CPU matmul kernels.

Forward it is `lax.dot_general` as `nn.Dense` calls it. Backward, autodiff asks for the kernel
gradient as `x^T @ g` with both operands contracted over their leading (token) dimension. XLA's
CPU backend hands only matmuls contracting the left operand's last dimension to its fast
library kernels; the transposed form went to a generic loop that ran a MiniLM-L6 training step's
weight gradients at about half the forward matmuls' rate (`git log -p --
docs/performance-history.md`). Here `x^T` is materialized once (an optimization barrier stops XLA
folding the transpose back into the matmul), so the kernel gradient is a plain matmul; where the
output gradient g is the narrower operand (the FFN's output layer: g [tokens, 384] against x
[tokens, 1536]), g^T is transposed instead and the small [n_out, n_in] product transposed back.
Values agree with autodiff's to float rounding (tests/test_matmul.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


@jax.custom_vjp
def dense_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., n_in] @ kernel [n_in, n_out] -> [..., n_out]."""
    return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _forward(x, kernel):
    return dense_matmul(x, kernel), (x, kernel)


def _backward(residuals, g):
    x, kernel = residuals
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    if g2.shape[1] < x2.shape[1]:
        # The narrower operand is transposed: for the FFN's output layer ([tokens, 1536] in,
        # [tokens, 384] out) g^T is a quarter of x^T's size, and the [n_out, n_in] product's
        # transpose is small. Both barriers keep XLA from folding a transpose back into the dot.
        d_kernel = lax.optimization_barrier(lax.optimization_barrier(g2.T) @ x2).T  # ([n_out, tokens] @ [tokens, n_in])^T
    else:
        d_kernel = lax.optimization_barrier(x2.T) @ g2                   # [n_in, tokens] @ [tokens, n_out]
    d_x = lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))  # g @ kernel^T
    return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


dense_matmul.defvjp(_forward, _backward)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """A `dot_general` for `nn.Dense(dot_general=...)`: `dense_matmul` for Dense's own contraction
    (last dimension of the input with the kernel's first, no batch), `lax.dot_general` otherwise."""
    (lhs_contract, rhs_contract), batch = dimension_numbers
    if (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,) and rhs.ndim == 2
            and batch == ((), ()) and precision is None and preferred_element_type is None):
        return dense_matmul(jnp.asarray(lhs), jnp.asarray(rhs))   # custom_vjp takes JAX arrays only
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)
