"""The serving layout (`layouts.PerLayerParams`) and the inference step: the same numbers as the
Flax module, without per-layer weight copies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deebert_jax.core.config import tiny_config
from deebert_jax.model import inference_step, layouts, modeling
from tests import layer_access

CONFIG = tiny_config(num_hidden_layers=3)


@pytest.fixture(scope="module")
def params():
    return modeling.init_params(CONFIG, jax.random.PRNGKey(0))


def _batch(b=3, s=10, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, CONFIG.vocab_size, (b, s)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[-1] = 0  # a row that is all padding
    return ids, mask, np.zeros_like(ids)


def test_unstack_round_trip(params):
    unstacked = layouts.unstack_params(params)
    assert layouts.is_unstacked(unstacked) and len(unstacked["layers"]) == CONFIG.num_hidden_layers
    assert isinstance(unstacked, layouts.PerLayerParams) and not layouts.is_unstacked(params)
    # A pytree like the dict it is: mapped, it keeps its type (and so its layout).
    assert layouts.is_unstacked(jax.tree_util.tree_map(jnp.asarray, unstacked))
    assert layouts.unstack_params(unstacked) is unstacked
    assert unstacked["layers"][1]["query"]["kernel"].shape == (CONFIG.hidden_size, CONFIG.hidden_size)
    again = layouts.stack_params(unstacked)
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_forward_on_inference_layout_matches_module(params):
    ids, mask, types = _batch()
    reference = modeling.DeeBert(CONFIG).apply({"params": params}, ids, mask, types)
    fast = jax.jit(inference_step.forward, static_argnums=0)(CONFIG, layouts.unstack_params(params), ids, mask, types)
    assert fast.shape == (CONFIG.num_hidden_layers, 3, CONFIG.num_labels)
    np.testing.assert_allclose(fast, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("unstacked", [False, True])
@pytest.mark.parametrize("first_token_only_at_last", [False, True])
def test_layer_loop_with_traced_index_matches_module(params, unstacked, first_token_only_at_last):
    ids, mask, types = _batch()
    reference = modeling.DeeBert(CONFIG).apply({"params": params}, ids, mask, types)
    p = layouts.unstack_params(params) if unstacked else params
    L = CONFIG.num_hidden_layers

    @jax.jit
    def loop(p, ids, mask, types):
        bias = modeling.attention_bias(mask)

        def body(i, carry):
            hidden, logits = carry
            hidden = layer_access.layer_forward_at(CONFIG, p, i, hidden, bias,
                                               first_token_only_at_last=first_token_only_at_last)
            return hidden, logits.at[i].set(layer_access.ramp_forward_at(CONFIG, p, i, hidden, bias))

        start = (inference_step.embed(CONFIG, p, ids, types), jnp.zeros((L, ids.shape[0], CONFIG.num_labels)))
        return jax.lax.fori_loop(0, L, body, start)[1]

    np.testing.assert_allclose(loop(p, ids, mask, types), reference, atol=1e-5, rtol=1e-5)
    leaf = jax.jit(lambda p, i: layer_access.layer_params_at(p, i)["output"]["kernel"])(p, 1)
    np.testing.assert_array_equal(leaf, params["layers"]["output"]["kernel"][1])


def test_first_token_only_layer_matches_position_zero(params):
    ids, mask, types = _batch()
    hidden = inference_step.embed(CONFIG, params, ids, types)
    bias = modeling.attention_bias(mask)
    layer = layer_access.layer_params_at(params, 0)
    full = inference_step.layer_forward(CONFIG, layer, hidden, bias)
    first = inference_step.layer_forward(CONFIG, layer, hidden, bias, first_token_only=True)
    assert first.shape == (3, 1, CONFIG.hidden_size)
    np.testing.assert_allclose(first[:, 0], full[:, 0], atol=1e-6, rtol=1e-6)



def test_a_layer_step_on_its_own_weights_is_the_step_on_the_whole_tree(params):
    """`own_layer_step` (one layer's weights and ramp) computes what `layer_step` computes on the
    whole tree: bit for bit with the layer static, to float rounding with it traced under jit."""
    unstacked = layouts.unstack_params(params)
    ids, mask, types = _batch()
    hidden = inference_step.embed(CONFIG, unstacked, ids, types)
    bias = modeling.attention_bias(mask, jnp.float32)
    whole = inference_step.layer_step(CONFIG, unstacked, first_token_only_at_last=True)
    whole_traced = jax.jit(whole)
    for layer in range(CONFIG.num_hidden_layers):
        own = inference_step.own_layer_step(CONFIG, unstacked["layers"][layer], unstacked["ramps"][layer],
                                            first_token_only_at_last=True)
        for a, b in zip(own(layer, hidden, bias), whole(layer, hidden, bias)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        traced = jax.jit(own)(jnp.int32(layer), hidden, bias)
        for a, b in zip(traced, whole_traced(jnp.int32(layer), hidden, bias)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
