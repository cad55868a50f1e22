import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deebert_jax import modeling
from deebert_jax.config import tiny_config

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
    np.testing.assert_array_equal(out, modeling.forward(CONFIG, params, ids, mask, types))


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
    hidden = modeling.embed(CONFIG, params, ids, types)
    bias = modeling.attention_bias(mask)
    for i in range(CONFIG.num_hidden_layers):
        hidden = modeling.layer_forward(CONFIG, modeling.layer_params_at(params, i), hidden, bias)
        np.testing.assert_allclose(hidden, states[i], atol=1e-6)
        ramp = modeling.ramp_forward(CONFIG, modeling.ramp_params_at(params, i), hidden, bias, i)
        np.testing.assert_allclose(ramp, logits[i], atol=1e-6)


def test_padding_does_not_change_real_tokens(params):
    ids, mask, types = batch()
    other = ids.at[1, 6:].set(7)  # different ids under the padding
    a = modeling.forward(CONFIG, params, ids, mask, types)
    b = modeling.forward(CONFIG, params, other, mask, types)
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
    full = modeling.forward(CONFIG, params, ids, mask, types)
    half = modeling.forward(CONFIG, params, ids, mask, types, dtype=jnp.bfloat16)
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(half, full, atol=5e-2)
