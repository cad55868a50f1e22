import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deebert_jax.model import modeling
from tests import layer_access
from deebert_jax.model import inference_step
from deebert_jax.core.config import tiny_config
from deebert_jax.weights.model_loading import jitted_init_params

CONFIG = tiny_config(num_labels=3)


@pytest.fixture(scope="module")
def params():
    return modeling.init_params(CONFIG, jax.random.PRNGKey(0))


def batch(b=3, s=10, seed=1):
    ids = np.array(jax.random.randint(jax.random.PRNGKey(seed), (b, s), 1, CONFIG.vocab_size))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0   # a padded row
    ids[1, 6:] = 0
    types = np.zeros_like(ids)
    types[2, 5:] = 1  # a sentence pair
    return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)


def test_stacked_layout(params):
    L, H = CONFIG.num_hidden_layers, CONFIG.hidden_size
    assert set(params) == {"embeddings", "layers", "ramps"}
    for leaf in jax.tree_util.tree_leaves(params["layers"]) + jax.tree_util.tree_leaves(params["ramps"]):
        assert leaf.shape[0] == L
    assert params["layers"]["query"]["kernel"].shape == (L, H, H)
    assert params["ramps"]["classifier"]["kernel"].shape == (L, H, CONFIG.num_labels)


def test_eval_output_shape_and_determinism(params):
    ids, mask, types = batch()
    out = modeling.DeeBert(CONFIG).apply({"params": params}, ids, mask, types)
    assert out.shape == (CONFIG.num_hidden_layers, 3, CONFIG.num_labels) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, inference_step.forward(CONFIG, params, ids, mask, types))


def test_train_mode_uses_dropout_rng(params):
    ids, mask, types = batch()
    model = modeling.DeeBert(CONFIG)
    a = model.apply({"params": params}, ids, mask, types, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    b = model.apply({"params": params}, ids, mask, types, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    c = model.apply({"params": params}, ids, mask, types, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    ev = model.apply({"params": params}, ids, mask, types)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, ev)


def test_layer_by_layer_pieces_match_scanned_forward(params):
    ids, mask, types = batch()
    logits, states = modeling.DeeBert(CONFIG).apply({"params": params}, ids, mask, types, output_hidden_states=True)
    hidden = inference_step.embed(CONFIG, params, ids, types)
    bias = modeling.attention_bias(mask)
    for i in range(CONFIG.num_hidden_layers):
        hidden = inference_step.layer_forward(CONFIG, layer_access.layer_params_at(params, i), hidden, bias)
        np.testing.assert_allclose(hidden, states[i], atol=1e-6)
        ramp = inference_step.ramp_forward(CONFIG, layer_access.ramp_params_at(params, i), hidden, bias, i)
        np.testing.assert_allclose(ramp, logits[i], atol=1e-6)


def test_padding_does_not_change_real_tokens(params):
    ids, mask, types = batch()
    other = ids.at[1, 6:].set(7)  # different ids under the padding
    a = inference_step.forward(CONFIG, params, ids, mask, types)
    b = inference_step.forward(CONFIG, params, other, mask, types)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_stop_backbone_gradient(params):
    ids, mask, types = batch()

    def loss(p, stop):
        out = modeling.DeeBert(CONFIG).apply({"params": p}, ids, mask, types, stop_backbone_gradient=stop)
        return jnp.sum(out ** 2)

    free = jax.grad(loss)(params, False)
    stopped = jax.grad(loss)(params, True)
    for tree in (stopped["embeddings"], stopped["layers"]):
        assert all(not np.any(g) for g in jax.tree_util.tree_leaves(tree))
    assert any(np.any(g) for g in jax.tree_util.tree_leaves(free["layers"]))
    jax.tree_util.tree_map(np.testing.assert_allclose, stopped["ramps"], free["ramps"])


def test_bf16_compute_is_close(params):
    ids, mask, types = batch()
    full = inference_step.forward(CONFIG, params, ids, mask, types)
    half = inference_step.forward(CONFIG, params, ids, mask, types, dtype=jnp.bfloat16)
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(half, full, atol=5e-2)


def _cross_entropy_all_ramps(logits, labels):
    """logits [L, B, K], labels [B] -> the summed cross-entropy of every ramp (reaches every parameter)."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.take_along_axis(log_probs, labels[None, :, None], axis=-1))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_training_last_layer_on_first_token_matches_full_stack(dtype):
    """Training computes the last layer for position 0 only; `output_hidden_states` runs the
    `nn.scan` of full layers. Same dropout keys and masks, so the same logits and gradients to
    rounding (a different mask moves them by 1e-3 here). Off-ramps read the mean of real tokens,
    ramp L the first token."""
    config = tiny_config(num_labels=3, ramp_pooling="mean")
    params = jitted_init_params(config, jax.random.PRNGKey(3))
    ids, mask, types = batch()
    labels = jnp.array([0, 2, 1])
    model = modeling.DeeBert(config, dtype)

    def loss(p, full):
        out = model.apply({"params": p}, ids, mask, types, train=True, output_hidden_states=full,
                          rngs={"dropout": jax.random.PRNGKey(5)})
        logits = out[0] if full else out
        return _cross_entropy_all_ramps(logits, labels), logits

    @jax.jit
    def both(p):   # one compile
        return (jax.value_and_grad(lambda p: loss(p, False), has_aux=True)(p),
                jax.value_and_grad(lambda p: loss(p, True), has_aux=True)(p),
                model.apply({"params": p}, ids, mask, types))

    ((ours, logits), grads), ((full, full_logits), full_grads), eval_logits = both(params)
    assert not np.allclose(logits, eval_logits, atol=1e-3)  # dropout on
    if dtype == jnp.float32:   # the last layer's matmuls have B rows, not B * S: float rounding
        np.testing.assert_allclose(logits, full_logits, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(ours, full, rtol=1e-6)
    else:
        np.testing.assert_allclose(logits, full_logits, rtol=1e-3, atol=1e-4)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(grads),
                                 jax.tree_util.tree_leaves_with_path(full_grads)):
        name = jax.tree_util.keystr(path)
        if dtype == jnp.float32:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=name)
        else:   # bf16 matmuls: within a small part of bf16's own error (1e-2 against float32 here)
            assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b) + 1e-6, name


def _dot_output_shapes(jaxpr) -> list:
    """Output shapes of every dot_general in a (closed) jaxpr and the jaxprs nested in it."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    shapes += _dot_output_shapes(sub)
    return shapes


def test_training_computes_last_layer_for_one_position(params):
    """The FFN's first dense layer in training: [B, S, I] in layer 1, [B, 1, I] in layer 2, the
    last; the full stack (`output_hidden_states`: one `nn.scan` body) has only [B, S, I]."""
    ids, mask, types = batch()
    (B, S), inner = ids.shape, CONFIG.intermediate_size

    def ffn_shapes(full):
        def fn(p):
            return modeling.DeeBert(CONFIG).apply({"params": p}, ids, mask, types, train=True,
                                                  output_hidden_states=full, rngs={"dropout": jax.random.PRNGKey(0)})

        return sorted(s for s in _dot_output_shapes(jax.make_jaxpr(fn)(params)) if s[-1] == inner)

    assert ffn_shapes(False) == [(B, 1, inner), (B, S, inner)]
    assert ffn_shapes(True) == [(B, S, inner)]


@pytest.mark.parametrize("pooling,cpu_layout,layers", [("first", True, 3), ("mean", True, 3), ("first", False, 3),
                                                        ("first", True, 2)])
def test_off_ramps_only_matches_the_full_output_and_skips_layer_l(pooling, cpu_layout, layers):
    """Stage 2's forward (`off_ramps_only`): the off-ramps' logits and their gradients as the full
    training forward gives them (same dropout bits), without layer L's FFN; under "first" pooling
    layer L-1 runs for position 0 only (its matmuls have B rows: float rounding), under "mean" in
    full. Unrolled (the CPU layout) and as a scan (elsewhere)."""
    config = tiny_config(num_labels=3, num_hidden_layers=layers, ramp_pooling=pooling)
    params = jitted_init_params(config, jax.random.PRNGKey(3))
    ids, mask, types = batch()
    labels = jnp.array([0, 2, 1])
    model = modeling.DeeBert(config, kernels="cpu_tuned" if cpu_layout else "reference")

    def loss(p, off_ramps_only):
        logits = model.apply({"params": p}, ids, mask, types, train=True, stop_backbone_gradient=True,
                             off_ramps_only=off_ramps_only, rngs={"dropout": jax.random.PRNGKey(5)})
        logits = logits if off_ramps_only else logits[:-1]
        return _cross_entropy_all_ramps(logits, labels), logits

    @jax.jit
    def both(p):
        return (jax.value_and_grad(lambda p: loss(p, True), has_aux=True)(p),
                jax.value_and_grad(lambda p: loss(p, False), has_aux=True)(p))

    ((ours, logits), grads), ((full, full_logits), full_grads) = both(params)
    assert logits.shape == (config.num_hidden_layers - 1, 3, 3)
    np.testing.assert_allclose(logits, full_logits, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours, full, rtol=1e-6)
    assert float(jnp.max(jnp.abs(grads["ramps"]["classifier"]["kernel"]))) > 0
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(grads),
                                 jax.tree_util.tree_leaves_with_path(full_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))

    inner = config.intermediate_size

    def ffn_shapes(p):
        fn = lambda p: model.apply({"params": p}, ids, mask, types, train=True, off_ramps_only=True,
                                   rngs={"dropout": jax.random.PRNGKey(0)})
        return sorted(s for s in _dot_output_shapes(jax.make_jaxpr(fn)(p)) if s[-1] == inner)

    B, S = ids.shape
    # Layers 1..L-1 of L: the last of them for one position unless its ramp reads the mean.
    full = [(B, S, inner)] * (layers - 2)
    assert ffn_shapes(params) == sorted(full + [(B, 1, inner) if pooling == "first" else (B, S, inner)])
