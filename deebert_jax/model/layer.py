"""One post-LayerNorm BERT encoder layer (`Layer`) and the pieces it is built of: the dense and
LayerNorm layers as every module of the model makes them, the activations, the dropout masks and
the mean of the real tokens an off-ramp may read.

Below `modeling` (the whole DeeBert) and `training_graph` (training's layer stack), which both
build `Layer`s, so neither imports the other.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deebert_jax.core.config import DeeBertConfig
from deebert_jax.cpu.fusion import computed_once, stored_derivative
from deebert_jax.model import attention as attention_lib
from deebert_jax.model import kernels as kernels_lib


def activation(name: str):
    return {
        "gelu": functools.partial(jax.nn.gelu, approximate=False),
        "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
        "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
        "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
        "relu": jax.nn.relu,
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
        "tanh": jnp.tanh,
    }[name]


def dense(config: DeeBertConfig, features: int, name: str, dtype, kernels: str = "reference",
           encoder: bool = True) -> nn.Dense:
    # The encoder's dense layers take the kernels' dot_general (`cpu.matmul`: kernel gradients as
    # plain matmuls). The ramps' small heads keep lax's: they run under `nn.vmap`, where a custom
    # VJP rejects NumPy parameters, and their gradients cost next to nothing.
    dot_general = kernels_lib.dense_dot_general(kernels) if encoder else None
    return nn.Dense(features, dtype=dtype, name=name, dot_general=dot_general,
                    kernel_init=nn.initializers.normal(config.initializer_range))


def layer_norm(config: DeeBertConfig, name: str) -> nn.LayerNorm:
    # LayerNorm in float32 whatever the compute dtype: bf16 statistics cost accuracy for nothing.
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=jnp.float32, name=name)


class _DropoutMask(nn.Module):
    """The keep mask `nn.Dropout(rate)` would draw for an input of `shape` (bool); with `rows`, its
    first `rows` along axis -2 (positions, or query rows of attention probabilities)."""

    rate: float
    draw: int = 1   # which of the scope's `make_rng("dropout")` keys (`Layer.dropout_key_draw`)
    computed_once: bool = False   # `fusion.computed_once` (the tuned training layout)

    @nn.compact
    def __call__(self, shape, rows: int | None = None):
        for _ in range(self.draw - 1):
            self.make_rng("dropout")
        keep = jax.random.bernoulli(self.make_rng("dropout"), p=1.0 - self.rate, shape=shape)
        if rows is not None and rows < shape[-2]:
            # Drawn whole and sliced: a smaller draw gives other bits. Threefry's bits are a function
            # of each element's index, so XLA computes only the rows kept.
            keep = keep[..., :rows, :]
        return computed_once(keep) if self.computed_once else keep


class Layer(nn.Module):
    """One post-LayerNorm BERT encoder layer."""

    config: DeeBertConfig
    dtype: Any = jnp.float32
    deterministic: bool = True
    # Only position 0 as queries: all the ramps read, so the last layer needs no more. Output
    # [B, 1, H]; parameters are the same. With dropout on, its masks are row 0 of the full layer's.
    first_token_only: bool = False
    # Self-attention's core (`attention.ATTENTION_IMPLS`): "default" as always, or, for inference,
    # `jax.nn.dot_product_attention` ("dot_product_attention", "cudnn"); same parameters.
    attention_impl: str = "default"
    # Which `make_rng` of each dropout's scope gives its key. Under `nn.scan` it is the second:
    # flax.core.axes_scan traces the body twice (its loop-invariant check) and the scopes' rng
    # counters outlive the first trace. `training_graph.training_layers`, running layers outside a scan, says 2.
    dropout_key_draw: int = 1
    # `model.kernels`: "reference" (Flax's graph) or "cpu_tuned".
    kernels: str = "reference"

    @nn.compact
    def __call__(self, hidden, mask_bias):
        """hidden [B, S, H], mask_bias [B, S] additive -> [B, S, H] ([B, 1, H] if first_token_only)."""
        c, dt = self.config, self.dtype
        B, S, H = hidden.shape
        queries = hidden[:, :1] if self.first_token_only else hidden
        # Heads as [B, heads, S, head_dim] and keys as [B, heads, head_dim, S]: batch dimensions
        # leading and each operand laid out for a plain batched matmul. XLA's CPU backend ran the
        # equivalent einsums 3-4x slower (same values, bit for bit; the figures:
        # `git log -p -- docs/performance-history.md`).
        # (`attention.attention` lays them out; its backward keeps those layouts.)
        heads = lambda t: t.reshape(B, t.shape[1], c.num_attention_heads, c.head_dim)
        q = heads(dense(c, H, "query", dt, self.kernels)(queries))
        rate = c.attention_probs_dropout_prob
        keep = None
        if not self.deterministic and rate > 0.0 and self.attention_impl == "default":
            # nn.Dropout's own draw (same scope name, same key, same bits); applied in `attention`.
            keep = _DropoutMask(rate, self.dropout_key_draw, kernels_lib.tuned_training_layout(self.kernels),
                                name="Dropout_0")(
                (B, c.num_attention_heads, S, S), rows=queries.shape[1])
        if self.first_token_only and self.attention_impl == "default" and not self.is_initializing():
            # One query: the key and value projections folded into it, not applied to all S rows.
            p = self.variables["params"]
            context = attention_lib.first_query_attention(
                q, hidden, p["key"]["kernel"], p["key"]["bias"], p["value"]["kernel"], p["value"]["bias"],
                mask_bias, keep, rate).reshape(queries.shape)
            return self._after_attention(context, queries, S)
        k = heads(dense(c, H, "key", dt, self.kernels)(hidden))
        v = heads(dense(c, H, "value", dt, self.kernels)(hidden))
        if self.attention_impl != "default":
            attention_lib.check_attention_impl(self.attention_impl, dt, dropout=not self.deterministic and rate > 0.0)
            context = attention_lib.fused_attention(q, k, v, mask_bias, self.attention_impl).reshape(queries.shape)
        else:
            core = kernels_lib.attention_core(self.kernels)
            context = core(q, k, v, mask_bias, keep, rate).reshape(queries.shape)
        return self._after_attention(context, queries, S)

    def _after_attention(self, context, queries, S):
        """context [B, S', H] (S' = queries' positions) -> the layer's output [B, S', H]."""
        c, dt = self.config, self.dtype
        H = c.hidden_size
        tuned = kernels_lib.tuned_training_layout(self.kernels)
        attn = dense(c, H, "attention_output", dt, self.kernels)(context)
        attn = self._dropout(attn, c.hidden_dropout_prob, "Dropout_1", S)
        attn = layer_norm(c, "attention_LayerNorm")(attn + queries).astype(dt)
        act = activation(c.hidden_act)
        if tuned and not self.deterministic:
            act = stored_derivative(act)
        ff = act(dense(c, c.intermediate_size, "intermediate", dt, self.kernels)(attn))
        ff = dense(c, H, "output", dt, self.kernels)(ff)
        ff = self._dropout(ff, c.hidden_dropout_prob, "Dropout_2", S)
        return layer_norm(c, "output_LayerNorm")(ff + attn).astype(dt)

    def _dropout(self, x, rate, name, positions):
        """`nn.Dropout(rate, name=name)`'s output, bit for bit (same key, same select), the mask
        drawn once (`fusion.computed_once`). x [B, S', H]: the mask is rows 0..S'-1 of the one
        drawn for all `positions`, so a first-token-only layer drops what the full layer drops."""
        tuned = kernels_lib.tuned_training_layout(self.kernels)
        if not tuned and x.shape[-2] == positions and self.dropout_key_draw == 1:
            return nn.Dropout(rate, name=name)(x, deterministic=self.deterministic)
        if self.deterministic or rate == 0.0:
            return x
        keep = _DropoutMask(rate, self.dropout_key_draw, tuned, name=name)(
            (*x.shape[:-2], positions, x.shape[-1]), rows=x.shape[-2])
        return jax.lax.select(keep, x / (1.0 - rate), jnp.zeros_like(x))


def mean_of_real_tokens(hidden, mask_bias) -> jax.Array:
    """hidden [..., S, H], additive mask_bias [..., S] -> [..., H], the mean over non-padding tokens.

    Summed in float32; an all-padding row gives zeros, not NaNs.
    """
    real = (mask_bias == 0).astype(jnp.float32)
    # A [1, S] x [S, H] product per row: XLA's CPU backend reduced over the positions axis several
    # times slower at one row (docs/performance.md). HIGHEST: float32 on every backend.
    total = jnp.matmul(real[..., None, :], hidden.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)[..., 0, :]
    return (total / jnp.maximum(jnp.sum(real, axis=-1, keepdims=True), 1.0)).astype(hidden.dtype)
