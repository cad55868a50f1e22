"""Flax DeeBERT: a BERT (or RoBERTa) encoder with stacked layers and one off-ramp per layer.

Parameter tree (L = num_hidden_layers, every `layers` and `ramps` leaf has a leading L axis):

    embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
    embeddings/LayerNorm/{scale,bias}
    layers/{query,key,value,attention_output,intermediate,output}/{kernel,bias}
    layers/{attention_LayerNorm,output_LayerNorm}/{scale,bias}
    ramps/{pooler,classifier}/{kernel,bias}

Ramp l (1-based) reads layer l's output; ramp L is the usual pooler + classifier on the first
token, ramps 1..L-1 are DeeBERT's off-ramps ("highways"), reading the first token too, or the
mean of the real tokens with `ramp_pooling="mean"` (`ramp_input`).

RoBERTa (`model_type="roberta"`) differs only in its position ids (`position_ids`); its
`RobertaForSequenceClassification` head (dense + tanh + out_proj on the first token) is ramp L.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deebert_jax.core.errors import InputError
from deebert_jax.model import kernels as kernels_lib
from deebert_jax.core.config import DeeBertConfig
from deebert_jax.model.layer import Layer, activation, dense, layer_norm, mean_of_real_tokens  # noqa: F401 (Layer, activation: importable here, as before)
from deebert_jax.model.layouts import static_index
from deebert_jax.model.training_graph import training_layers

Params = Any

def attention_bias(attention_mask: jax.Array, dtype=jnp.float32) -> jax.Array:
    """[B, S] 0/1 mask -> [B, S] additive bias: 0 on real keys, the dtype's minimum on padding.

    Same convention as Hugging Face BERT, so padded keys get exactly zero attention weight.
    """
    return jnp.where(attention_mask.astype(bool), 0.0, jnp.finfo(dtype).min).astype(dtype)


def position_ids(config: DeeBertConfig, input_ids) -> jax.Array:
    """[B, S] token ids -> [B, S] rows of the position table ([1, S] for BERT: 0..S-1).

    RoBERTa, as `transformers`' `create_position_ids_from_input_ids`: the non-padding tokens count
    from `pad_token_id + 1`, every `pad_token_id` token sits at `pad_token_id`. Decided by the
    ids, not the attention mask, exactly as there.
    """
    if config.model_type == "roberta":
        real = (input_ids != config.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(real, axis=-1) * real + config.pad_token_id
    return jnp.arange(input_ids.shape[-1])[None, :]


class Embeddings(nn.Module):
    config: DeeBertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, deterministic: bool = True):
        """input_ids, token_type_ids [B, S] int -> [B, S, H]."""
        c = self.config
        embed = functools.partial(nn.Embed, features=c.hidden_size,
                                  embedding_init=nn.initializers.normal(c.initializer_range))
        # torch's `padding_idx` (RoBERTa's word and position tables) only zeroes the padding row's
        # gradient; no loss reads a padding position's output, so that gradient is zero here too.
        positions = position_ids(c, input_ids)
        x = (embed(c.vocab_size, name="word_embeddings")(input_ids)
             + embed(c.type_vocab_size, name="token_type_embeddings")(token_type_ids)
             + embed(c.max_position_embeddings, name="position_embeddings")(positions))
        x = layer_norm(c, "LayerNorm")(x)
        x = nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)
        return x.astype(self.dtype)


class Ramp(nn.Module):
    """Off-ramp: pooler (dense + tanh on what `ramp_input` picks) -> dropout -> classifier.

    `RobertaForSequenceClassification`'s head is ramp L with `classifier.dense` as the pooler and
    `classifier.out_proj` as the classifier; it also applies dropout before the dense layer, which
    changes training only (at eval both are the same function).
    """

    config: DeeBertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features, deterministic: bool = True):
        """features [B, H] (`ramp_input`) -> logits [B, K] (float32)."""
        c = self.config
        pooled = jnp.tanh(dense(c, c.hidden_size, "pooler", self.dtype, encoder=False)(features))
        pooled = nn.Dropout(c.hidden_dropout_prob)(pooled, deterministic=deterministic)
        return dense(c, c.num_labels, "classifier", self.dtype, encoder=False)(pooled).astype(jnp.float32)


class DeeBert(nn.Module):
    """BERT with an off-ramp after every layer.

    `apply({"params": p}, input_ids, attention_mask, token_type_ids)` -> ramp logits [L, B, K].
    With `train=True` dropout is on (pass `rngs={"dropout": key}`) and the last layer is computed
    for the first token only, all the ramps read of it (`training_graph.training_layers`). `stop_backbone_gradient`
    cuts gradients from the ramps into the encoder (stage 2). `off_ramps_only` returns the
    off-ramps' logits [L-1, B, K], the same as the first L-1 rows of the full output; in training
    it skips layer L and, where off-ramp L-1 reads the first token, computes layer L-1 for that
    position only (stage 2, which trains the off-ramps alone). `output_hidden_states` also
    returns every layer's output [L, B, S, H] (every layer computed in full). `attention_impl`: see
    `Layer` (a fused choice refuses training with attention-probs dropout). `kernels`: see
    `model.kernels` (what the training graph is built from; eval is the same program either way).
    """

    config: DeeBertConfig
    dtype: Any = jnp.float32
    attention_impl: str = "default"
    kernels: str = "reference"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, train: bool = False,
                 stop_backbone_gradient: bool = False, output_hidden_states: bool = False,
                 off_ramps_only: bool = False):
        c = self.config
        if off_ramps_only and (output_hidden_states or c.num_hidden_layers < 2):
            raise InputError("off_ramps_only needs at least 2 layers and no output_hidden_states")
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        hidden = Embeddings(c, self.dtype, name="embeddings")(input_ids, token_type_ids, deterministic=not train)
        keep = output_hidden_states
        mean = c.ramp_pooling == "mean"
        mask_bias = attention_bias(attention_mask, self.dtype)
        # Training computes the last layer for position 0 only (`training_graph.training_layers`). The full
        # stack below creates the parameters, serves eval and returns every layer's output.
        if train and not output_hidden_states and not self.is_initializing() and self.attention_impl == "default":
            rngs = self.scope.rngs   # make_rng("dropout") falls back on "params", as Flax does
            features = training_layers(c, self.dtype, self.get_variable("params", "layers"),
                                        rngs.get("dropout", rngs.get("params")), hidden, mask_bias,
                                        c.num_hidden_layers - 1 if off_ramps_only else c.num_hidden_layers,
                                        kernels=self.kernels)
            if off_ramps_only:
                # Ramp L's parameters ride along in the vmapped ramps below; zeros for it to read,
                # and its logits are dropped (its dropout key is its own: the others' bits stand).
                features = jnp.concatenate([features, jnp.zeros_like(features[:1])])
        else:
            def body(layer, hidden, mask_bias):
                hidden = layer(hidden, mask_bias)
                if keep:
                    return hidden, hidden
                return hidden, (hidden[:, 0], mean_of_real_tokens(hidden, mask_bias) if mean else None)

            # Lifting a bound Layer keeps its parameters at params["layers"] with a leading L axis.
            # Unrolled in training with the tuned layout, as `training_graph.training_layers` (why there).
            scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                           in_axes=nn.broadcast, length=c.num_hidden_layers,
                           unroll=c.num_hidden_layers if train and kernels_lib.tuned_training_layout(self.kernels) else 1)
            layer = Layer(c, self.dtype, not train, attention_impl=self.attention_impl, kernels=self.kernels,
                          name="layers")
            _, per_layer = scan(layer, hidden, mask_bias)
            if output_hidden_states:
                first_tokens = per_layer[:, :, 0]                                  # [L, B, H]
                means = mean_of_real_tokens(per_layer, mask_bias[None]) if mean else None
            else:
                first_tokens, means = per_layer
            # What each ramp reads [L, B, H]: off-ramps the mean under "mean", ramp L the first token.
            features = jnp.concatenate([means[:-1], first_tokens[-1:]]) if mean else first_tokens
        if stop_backbone_gradient:
            features = jax.lax.stop_gradient(features)
        ramps = nn.vmap(
            Ramp,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, None),
            out_axes=0,
        )
        logits = ramps(c, self.dtype, name="ramps")(features, not train)
        if off_ramps_only:
            return logits[:-1]
        return (logits, per_layer) if output_hidden_states else logits


def ramp_input(config: DeeBertConfig, hidden, mask_bias, layer) -> jax.Array:
    """What ramp `layer` (0-based, may be traced) reads of that layer's output hidden [B, S, H] -> [B, H].

    The first token, except for off-ramps (layer < L-1) under `ramp_pooling="mean"`: the mean of
    the real tokens (mask_bias [B, S] additive, as `attention_bias` makes it).
    """
    first = hidden[:, 0]
    if config.ramp_pooling == "first":
        return first
    last = config.num_hidden_layers - 1
    static = static_index(layer)
    if static is not None:
        return first if static == last else mean_of_real_tokens(hidden, mask_bias)
    return jnp.where(layer == last, first, mean_of_real_tokens(hidden, mask_bias))


def init_params(config: DeeBertConfig, rng: jax.Array, seq_len: int = 8) -> Params:
    """Random parameters with the layout documented above."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    params = DeeBert(config).init(rng, ids, jnp.ones_like(ids), ids)["params"]
    return jax.tree_util.tree_map(jnp.asarray, nn.unbox(params))
