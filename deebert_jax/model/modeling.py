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
import operator
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core.scope import LazyRng

from deebert_jax.model import attention as attention_lib
from deebert_jax.core.config import DeeBertConfig
from deebert_jax.cpu.fusion import computed_once, stored_derivative
from deebert_jax.cpu.matmul import dense_dot_general
from deebert_jax.core.trees import stack_trees, unstack_tree
from deebert_jax.data.validation import check_model_inputs

Params = Any

# Self-attention's core; `train.benchmark_train.jax_defaults` swaps in the autodiff form.
attention_core = attention_lib.attention
# The training graph's CPU layout: layers unrolled, dropout masks and the activation's derivative
# computed once (`fusion`). `jax_defaults` turns it off to build the graph as Flax ships it.
_cpu_training_layout = True


def _on_cpu() -> bool:
    """Whether the graph being traced is for the CPU. The CPU-tuned pieces (`matmul`, `attention`'s
    backward, `fusion`, unrolled training layers) were chosen by CPU profiles; elsewhere the graph
    stays as JAX and Flax build it until measurements there say otherwise (docs/performance.md)."""
    return jax.default_backend() == "cpu"


def _cpu_layout() -> bool:
    return _cpu_training_layout and _on_cpu()


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


def attention_bias(attention_mask: jax.Array, dtype=jnp.float32) -> jax.Array:
    """[B, S] 0/1 mask -> [B, S] additive bias: 0 on real keys, the dtype's minimum on padding.

    Same convention as Hugging Face BERT, so padded keys get exactly zero attention weight.
    """
    return jnp.where(attention_mask.astype(bool), 0.0, jnp.finfo(dtype).min).astype(dtype)


def _dense(config: DeeBertConfig, features: int, name: str, dtype, encoder: bool = True) -> nn.Dense:
    # The encoder's dense layers take `matmul.dense_dot_general` (kernel gradients as plain
    # matmuls on the CPU). The ramps' small heads keep lax's: they run under `nn.vmap`, where a
    # custom VJP rejects NumPy parameters, and their gradients cost next to nothing.
    dot_general = dense_dot_general if encoder and _on_cpu() else None
    return nn.Dense(features, dtype=dtype, name=name, dot_general=dot_general,
                    kernel_init=nn.initializers.normal(config.initializer_range))


def _layer_norm(config: DeeBertConfig, name: str) -> nn.LayerNorm:
    # LayerNorm in float32 whatever the compute dtype: bf16 statistics cost accuracy for nothing.
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=jnp.float32, name=name)


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
        x = _layer_norm(c, "LayerNorm")(x)
        x = nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)
        return x.astype(self.dtype)


class _DropoutMask(nn.Module):
    """The keep mask `nn.Dropout(rate)` would draw for an input of `shape` (bool); with `rows`, its
    first `rows` along axis -2 (positions, or query rows of attention probabilities)."""

    rate: float
    draw: int = 1   # which of the scope's `make_rng("dropout")` keys (`Layer.dropout_key_draw`)

    @nn.compact
    def __call__(self, shape, rows: int | None = None):
        for _ in range(self.draw - 1):
            self.make_rng("dropout")
        keep = jax.random.bernoulli(self.make_rng("dropout"), p=1.0 - self.rate, shape=shape)
        if rows is not None and rows < shape[-2]:
            # Drawn whole and sliced: a smaller draw gives other bits. Threefry's bits are a function
            # of each element's index, so XLA computes only the rows kept.
            keep = keep[..., :rows, :]
        return computed_once(keep) if _cpu_layout() else keep


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
    # counters outlive the first trace. `_training_layers`, running layers outside a scan, says 2.
    dropout_key_draw: int = 1

    @nn.compact
    def __call__(self, hidden, mask_bias):
        """hidden [B, S, H], mask_bias [B, S] additive -> [B, S, H] ([B, 1, H] if first_token_only)."""
        c, dt = self.config, self.dtype
        B, S, H = hidden.shape
        queries = hidden[:, :1] if self.first_token_only else hidden
        # Heads as [B, heads, S, head_dim] and keys as [B, heads, head_dim, S]: batch dimensions
        # leading and each operand laid out for a plain batched matmul. XLA's CPU backend ran the
        # equivalent einsums 3-4x slower (same values, bit for bit; docs/performance.md).
        # (`attention.attention` lays them out; its backward keeps those layouts.)
        heads = lambda t: t.reshape(B, t.shape[1], c.num_attention_heads, c.head_dim)
        q = heads(_dense(c, H, "query", dt)(queries))
        rate = c.attention_probs_dropout_prob
        keep = None
        if not self.deterministic and rate > 0.0 and self.attention_impl == "default":
            # nn.Dropout's own draw (same scope name, same key, same bits); applied in `attention`.
            keep = _DropoutMask(rate, self.dropout_key_draw, name="Dropout_0")(
                (B, c.num_attention_heads, S, S), rows=queries.shape[1])
        if self.first_token_only and self.attention_impl == "default" and not self.is_initializing():
            # One query: the key and value projections folded into it, not applied to all S rows.
            p = self.variables["params"]
            context = attention_lib.first_query_attention(
                q, hidden, p["key"]["kernel"], p["key"]["bias"], p["value"]["kernel"], p["value"]["bias"],
                mask_bias, keep, rate).reshape(queries.shape)
            return self._after_attention(context, queries, S)
        k = heads(_dense(c, H, "key", dt)(hidden))
        v = heads(_dense(c, H, "value", dt)(hidden))
        if self.attention_impl != "default":
            attention_lib.check_attention_impl(self.attention_impl, dt, dropout=not self.deterministic and rate > 0.0)
            context = attention_lib.fused_attention(q, k, v, mask_bias, self.attention_impl).reshape(queries.shape)
        else:
            core = attention_core if _on_cpu() else attention_lib.attention_autodiff
            context = core(q, k, v, mask_bias, keep, rate).reshape(queries.shape)
        return self._after_attention(context, queries, S)

    def _after_attention(self, context, queries, S):
        """context [B, S', H] (S' = queries' positions) -> the layer's output [B, S', H]."""
        c, dt = self.config, self.dtype
        H = c.hidden_size
        attn = _dense(c, H, "attention_output", dt)(context)
        attn = self._dropout(attn, c.hidden_dropout_prob, "Dropout_1", S)
        attn = _layer_norm(c, "attention_LayerNorm")(attn + queries).astype(dt)
        act = activation(c.hidden_act)
        if _cpu_layout() and not self.deterministic:
            act = stored_derivative(act)
        ff = act(_dense(c, c.intermediate_size, "intermediate", dt)(attn))
        ff = _dense(c, H, "output", dt)(ff)
        ff = self._dropout(ff, c.hidden_dropout_prob, "Dropout_2", S)
        return _layer_norm(c, "output_LayerNorm")(ff + attn).astype(dt)

    def _dropout(self, x, rate, name, positions):
        """`nn.Dropout(rate, name=name)`'s output, bit for bit (same key, same select), the mask
        drawn once (`fusion.computed_once`). x [B, S', H]: the mask is rows 0..S'-1 of the one
        drawn for all `positions`, so a first-token-only layer drops what the full layer drops."""
        if not _cpu_layout() and x.shape[-2] == positions and self.dropout_key_draw == 1:
            return nn.Dropout(rate, name=name)(x, deterministic=self.deterministic)
        if self.deterministic or rate == 0.0:
            return x
        keep = _DropoutMask(rate, self.dropout_key_draw, name=name)((*x.shape[:-2], positions, x.shape[-1]),
                                                                    rows=x.shape[-2])
        return jax.lax.select(keep, x / (1.0 - rate), jnp.zeros_like(x))


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
        pooled = jnp.tanh(_dense(c, c.hidden_size, "pooler", self.dtype, encoder=False)(features))
        pooled = nn.Dropout(c.hidden_dropout_prob)(pooled, deterministic=deterministic)
        return _dense(c, c.num_labels, "classifier", self.dtype, encoder=False)(pooled).astype(jnp.float32)


class DeeBert(nn.Module):
    """BERT with an off-ramp after every layer.

    `apply({"params": p}, input_ids, attention_mask, token_type_ids)` -> ramp logits [L, B, K].
    With `train=True` dropout is on (pass `rngs={"dropout": key}`) and the last layer is computed
    for the first token only, all the ramps read of it (`_training_layers`). `stop_backbone_gradient`
    cuts gradients from the ramps into the encoder (stage 2). `off_ramps_only` returns the
    off-ramps' logits [L-1, B, K], the same as the first L-1 rows of the full output; in training
    it skips layer L and, where off-ramp L-1 reads the first token, computes layer L-1 for that
    position only (stage 2, which trains the off-ramps alone). `output_hidden_states` also
    returns every layer's output [L, B, S, H] (every layer computed in full). `attention_impl`: see
    `Layer` (a fused choice refuses training with attention-probs dropout).
    """

    config: DeeBertConfig
    dtype: Any = jnp.float32
    attention_impl: str = "default"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, train: bool = False,
                 stop_backbone_gradient: bool = False, output_hidden_states: bool = False,
                 off_ramps_only: bool = False):
        c = self.config
        if off_ramps_only and (output_hidden_states or c.num_hidden_layers < 2):
            raise ValueError("off_ramps_only needs at least 2 layers and no output_hidden_states")
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        hidden = Embeddings(c, self.dtype, name="embeddings")(input_ids, token_type_ids, deterministic=not train)
        keep = output_hidden_states
        mean = c.ramp_pooling == "mean"
        mask_bias = attention_bias(attention_mask, self.dtype)
        # Training computes the last layer for position 0 only (`_training_layers`). The full
        # stack below creates the parameters, serves eval and returns every layer's output.
        if train and not output_hidden_states and not self.is_initializing() and self.attention_impl == "default":
            rngs = self.scope.rngs   # make_rng("dropout") falls back on "params", as Flax does
            features = _training_layers(c, self.dtype, self.get_variable("params", "layers"),
                                        rngs.get("dropout", rngs.get("params")), hidden, mask_bias,
                                        c.num_hidden_layers - 1 if off_ramps_only else c.num_hidden_layers)
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
            # Unrolled in training on the CPU, as `_training_layers` (why there).
            scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                           in_axes=nn.broadcast, length=c.num_hidden_layers,
                           unroll=c.num_hidden_layers if train and _cpu_layout() else 1)
            layer = Layer(c, self.dtype, not train, attention_impl=self.attention_impl, name="layers")
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


def _training_layers(config: DeeBertConfig, dtype, layer_params: Params, rng, hidden, mask_bias,
                     layers: int | None = None) -> jax.Array:
    """The first `layers` layers (default all L) in training (dropout on) -> what ramps 1..layers
    read [layers, B, H] (as `ramp_input`).

    `DeeBert`'s `nn.scan` over the layers, written out so that the last layer computed, whose
    output only its ramp reads (the first token: ramp L, or any ramp under "first" pooling),
    computes position 0 alone: the query projection, attention for one query row, the output
    dense, layer norms and FFN on one position of each row; keys and values for all. Every layer
    gets what the scan gives it: its slice of `layer_params` (the stacked tree, leading L axis),
    the dropout key `flax.core.lift.scan` splits off `rng` (the module's dropout rng, None without
    one) under the scope name "layers", and the scan's second draw of it (`Layer.dropout_key_draw`);
    a first-token-only layer takes row 0 of its full-size masks (`Layer.first_token_only`). Same
    values and dropout bits as the scan (tests/test_modeling.py). hidden [B, S, H], mask_bias [B, S].
    """
    L = config.num_hidden_layers
    n = L if layers is None else layers
    if not 1 <= n <= L:
        raise ValueError(f"layers={layers!r}: expected 1..{L}")
    mean = config.ramp_pooling == "mean"
    # Ramp n reads the first token unless it is an off-ramp under "mean" pooling.
    last_first_token_only = n == L or not mean
    keys = suffix = None
    if rng is not None:
        # As nn.scan: the "layers" scope's key split L ways; its static path suffix (folded in
        # when a dropout draws its key) kept.
        scoped = LazyRng.create(rng, "layers")
        keys, suffix = jax.random.split(jax.random.clone(scoped.rng), L), scoped.suffix
    rng_at = lambda i: None if keys is None else LazyRng(keys[i], suffix)

    def run(params, layer_rng, hidden, first_token_only):
        layer = Layer(config, dtype, deterministic=False, first_token_only=first_token_only, dropout_key_draw=2)
        return layer.apply({"params": params}, hidden, mask_bias,
                           rngs={} if layer_rng is None else {"dropout": layer_rng})

    def ramp_features(hidden):
        return mean_of_real_tokens(hidden, mask_bias) if mean else hidden[:, 0]

    leaves, treedef = jax.tree_util.tree_flatten(layer_params)
    features = []
    if _cpu_layout():
        # Unrolled: a rolled scan keeps the backward's residuals in zero-filled [L, ...] buffers
        # written one layer at a time (0.6 s of a 5 s MiniLM step on one CPU thread); unrolled,
        # each layer's are buffers of their own. One split per leaf: the gradients are joined by
        # one concatenation.
        parts = [jnp.split(leaf, L) for leaf in leaves]
        layer_at = lambda i: treedef.unflatten([p[i][0] for p in parts])
        for i in range(n - 1):
            hidden = run(layer_at(i), rng_at(i), hidden, False)
            features.append(ramp_features(hidden)[None])
        last = layer_at(n - 1)
    else:
        parts = [jnp.split(leaf, [n - 1, n]) for leaf in leaves]
        if n > 1:
            def body(hidden, xs):
                hidden = run(*xs, hidden, False)
                return hidden, ramp_features(hidden)

            head = treedef.unflatten([p[0] for p in parts])
            hidden, head_features = jax.lax.scan(body, hidden, (head, rng_at(slice(0, n - 1))))
            features.append(head_features)
        last = treedef.unflatten([p[1][0] for p in parts])
    if last_first_token_only:
        features.append(run(last, rng_at(n - 1), hidden, True)[:, 0][None])
    else:
        features.append(ramp_features(run(last, rng_at(n - 1), hidden, False))[None])
    return jnp.concatenate(features)


def mean_of_real_tokens(hidden, mask_bias) -> jax.Array:
    """hidden [..., S, H], additive mask_bias [..., S] -> [..., H], the mean over non-padding tokens.

    Summed in float32; an all-padding row gives zeros, not NaNs.
    """
    real = (mask_bias == 0).astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * real, axis=-2)
    return (total / jnp.maximum(jnp.sum(real, axis=-2), 1.0)).astype(hidden.dtype)


def ramp_input(config: DeeBertConfig, hidden, mask_bias, layer) -> jax.Array:
    """What ramp `layer` (0-based, may be traced) reads of that layer's output hidden [B, S, H] -> [B, H].

    The first token, except for off-ramps (layer < L-1) under `ramp_pooling="mean"`: the mean of
    the real tokens (mask_bias [B, S] additive, as `attention_bias` makes it).
    """
    first = hidden[:, 0]
    if config.ramp_pooling == "first":
        return first
    last = config.num_hidden_layers - 1
    static = _static_index(layer)
    if static is not None:
        return first if static == last else mean_of_real_tokens(hidden, mask_bias)
    return jnp.where(layer == last, first, mean_of_real_tokens(hidden, mask_bias))


def init_params(config: DeeBertConfig, rng: jax.Array, seq_len: int = 8) -> Params:
    """Random parameters with the layout documented above."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    params = DeeBert(config).init(rng, ids, jnp.ones_like(ids), ids)["params"]
    return jax.tree_util.tree_map(jnp.asarray, nn.unbox(params))


def forward(config: DeeBertConfig, params: Params, input_ids, attention_mask, token_type_ids,
            dtype=jnp.float32, *, attention_impl: str = "default") -> jax.Array:
    """Full-depth eval forward -> ramp logits [L, B, K].

    Stacked params run the Flax module (the training graph, `nn.scan` over layers). Params from
    `unstack_params` take the inference path: a loop over `layer_step` (the same step as the
    early-exit loops, each layer's weights read in place), the last layer computed for the first
    token only, which is all the ramps read. Both agree to float32 rounding
    (`docs/performance.md`). Inputs are checked (`validation.check_model_inputs`); under a
    caller's `jit` only their shapes and dtypes can be. `attention_impl`: self-attention's core
    (`attention.ATTENTION_IMPLS`; "default" unless asked).
    """
    check_model_inputs(config, input_ids, attention_mask, token_type_ids)
    attention_lib.check_attention_impl(attention_impl, dtype)
    if not is_unstacked(params):
        return DeeBert(config, dtype, attention_impl).apply({"params": params}, input_ids, attention_mask,
                                                            token_type_ids)
    step = layer_step(config, params, dtype, first_token_only_at_last=True, attention_impl=attention_impl)
    mask_bias = attention_bias(attention_mask, dtype)
    L, K = config.num_hidden_layers, config.num_labels

    def body(i, carry):
        hidden, logits = carry
        hidden, ramp_logits = step(i, hidden, mask_bias)
        return hidden, logits.at[i].set(ramp_logits)

    # A loop rather than L unrolled layers: as fast in float32, and XLA's CPU fusion of bf16
    # converts across unrolled layer boundaries made the unrolled graph 1.5x slower in bf16.
    hidden = embed(config, params, input_ids, token_type_ids, dtype)
    logits = jnp.zeros((L, input_ids.shape[0], K), jnp.float32)
    hidden, logits = jax.lax.fori_loop(0, L - 1, body, (hidden, logits))
    _, last_logits = step(L - 1, hidden, mask_bias)
    return logits.at[L - 1].set(last_logits)


# The inference layout: the same arrays, with the L axis split into a tuple of per-layer trees.

def is_unstacked(params: Params) -> bool:
    """True for params from `unstack_params` (`layers` and `ramps` are tuples of L trees)."""
    return isinstance(params["layers"], (tuple, list))


def unstack_params(params: Params) -> Params:
    """Stacked params -> the inference layout: `layers` and `ramps` as tuples of L per-layer trees.

    Do it once after loading: `forward` and `layer_step` then read each layer's weights in place.
    Numpy leaves stay numpy (views); device arrays are sliced once.
    """
    if is_unstacked(params):
        return params
    L = jax.tree_util.tree_leaves(params["layers"])[0].shape[0]
    return {**params, "layers": unstack_tree(params["layers"], L), "ramps": unstack_tree(params["ramps"], L)}


def stack_params(params: Params) -> Params:
    """The inverse of `unstack_params` (for saving, exporting and training)."""
    if not is_unstacked(params):
        return params
    return {**params, "layers": stack_trees(params["layers"]), "ramps": stack_trees(params["ramps"])}


# Pieces of the model as pure functions, for loops that run one layer at a time.

def embed(config: DeeBertConfig, params: Params, input_ids, token_type_ids, dtype=jnp.float32) -> jax.Array:
    """[B, S] ids -> [B, S, H] (eval mode)."""
    return Embeddings(config, dtype).apply({"params": params["embeddings"]}, input_ids, token_type_ids)


def layer_forward(config: DeeBertConfig, layer_params: Params, hidden, mask_bias, dtype=jnp.float32,
                  first_token_only: bool = False, *, attention_impl: str = "default") -> jax.Array:
    """One layer's parameters (no L axis), hidden [B, S, H] -> [B, S, H] (eval mode).

    `first_token_only`: position 0 alone as queries -> [B, 1, H] (what the ramps read).
    `attention_impl`: see `Layer`.
    """
    layer = Layer(config, dtype, first_token_only=first_token_only, attention_impl=attention_impl)
    return layer.apply({"params": layer_params}, hidden, mask_bias)


def ramp_forward(config: DeeBertConfig, ramp_params: Params, hidden, mask_bias, layer,
                 dtype=jnp.float32) -> jax.Array:
    """Ramp `layer`'s parameters (no L axis), that layer's output hidden [B, S, H] -> logits [B, K].

    `layer` (0-based, may be traced) and mask_bias [B, S] decide what the ramp reads (`ramp_input`).
    """
    return Ramp(config, dtype).apply({"params": ramp_params}, ramp_input(config, hidden, mask_bias, layer))


def _static_index(index) -> int | None:
    try:
        return operator.index(index)
    except TypeError:  # a tracer
        return None


def per_layer(params: Params, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Binds the whole model's params once -> `run(layer, *args) = fn(layer_params, ramp_params, layer, *args)`.

    The one place that decides how a layer's weights are reached. `layer` is 0-based: a Python
    int indexes directly; a traced index on params from `unstack_params` is a `lax.switch` whose
    branch i calls `fn` with layer i's own weights (read in place) and a static `layer`; on stacked
    params it slices the L axis (a copy of the layer's weights per call) and `fn` gets the
    traced index.
    """
    unstacked = is_unstacked(params)

    def weights(i):
        if unstacked:
            return params["layers"][i], params["ramps"][i]
        take = lambda x: x[i] if isinstance(i, int) else jax.lax.dynamic_index_in_dim(x, i, keepdims=False)
        return jax.tree_util.tree_map(take, params["layers"]), jax.tree_util.tree_map(take, params["ramps"])

    def run(layer, *args):
        static = _static_index(layer)
        if static is not None:
            return fn(*weights(static), static, *args)
        if unstacked:
            branches = [functools.partial(fn, *weights(i), i) for i in range(len(params["layers"]))]
            return jax.lax.switch(layer, branches, *args)
        return fn(*weights(layer), layer, *args)

    return run


def _layer_apply(config, layer_params, layer, hidden, mask_bias, dtype, first_token_only_at_last,
                 attention_impl: str = "default"):
    """Layer `layer` (0-based, int or traced) -> [B, S, H]; with `first_token_only_at_last` the last
    layer updates position 0 only (the other positions keep their input), all a ramp reads there."""
    whole = functools.partial(layer_forward, config, layer_params, mask_bias=mask_bias, dtype=dtype,
                              attention_impl=attention_impl)
    if not first_token_only_at_last:
        return whole(hidden=hidden)

    def first_only(hidden):
        first = whole(hidden=hidden, first_token_only=True)
        return jax.lax.dynamic_update_slice_in_dim(hidden, first.astype(hidden.dtype), 0, axis=1)

    last = config.num_hidden_layers - 1
    static = _static_index(layer)
    if static is not None:
        return first_only(hidden) if static == last else whole(hidden=hidden)
    return jax.lax.cond(layer == last, first_only, lambda h: whole(hidden=h), hidden)


def layer_step(config: DeeBertConfig, params: Params, dtype=jnp.float32, *,
               first_token_only_at_last: bool = False,
               attention_impl: str = "default") -> Callable[..., tuple[jax.Array, jax.Array]]:
    """-> `step(layer, hidden [B, S, H], mask_bias [B, S]) -> (hidden [B, S, H], ramp_logits [B, K])`.

    One layer and its ramp, eval mode, `layer` 0-based (int or traced); the params layout is
    decided here, once per call site (`per_layer`). Every inference loop runs on this step:
    `forward`, the while_loop predictor and exit-aware batching.
    `first_token_only_at_last`: see `_layer_apply`; `attention_impl`: see `Layer`.
    """
    def one(layer_params, ramp_params, layer, hidden, mask_bias):
        hidden = _layer_apply(config, layer_params, layer, hidden, mask_bias, dtype, first_token_only_at_last,
                              attention_impl)
        return hidden, ramp_forward(config, ramp_params, hidden, mask_bias, layer, dtype)

    return per_layer(params, one)


def layer_params_at(params: Params, index) -> Params:
    """The parameters of layer `index` (0-based, may be traced) without the L axis.

    A copy of the layer's weights when `index` is traced; `layer_step` avoids it.
    """
    return per_layer(params, lambda layer_params, ramp_params, layer: layer_params)(index)


def ramp_params_at(params: Params, index) -> Params:
    """The parameters of ramp `index` (0-based, may be traced) without the L axis."""
    return per_layer(params, lambda layer_params, ramp_params, layer: ramp_params)(index)


def layer_forward_at(config: DeeBertConfig, params: Params, index, hidden, mask_bias, dtype=jnp.float32,
                     first_token_only_at_last: bool = False) -> jax.Array:
    """Layer `index` (0-based, may be traced) of the whole model's params, hidden [B, S, H] -> [B, S, H].

    `layer_step` without the ramp; `first_token_only_at_last` as there.
    """
    run = per_layer(params, lambda lp, rp, layer, hidden: _layer_apply(
        config, lp, layer, hidden, mask_bias, dtype, first_token_only_at_last))
    return run(index, hidden)


def ramp_forward_at(config: DeeBertConfig, params: Params, index, hidden, mask_bias, dtype=jnp.float32) -> jax.Array:
    """Ramp `index` (0-based, may be traced) of the whole model's params, hidden [B, S, H],
    mask_bias [B, S] -> [B, K]."""
    run = per_layer(params, lambda lp, rp, layer, hidden: ramp_forward(
        config, rp, hidden, mask_bias, layer, dtype))
    return run(index, hidden)
