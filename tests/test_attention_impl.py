"""The opt-in attention cores (`attention_impl`): `jax.nn.dot_product_attention` gives the default's
logits and exits to float32 rounding, padding included; what cannot run here is refused in one line
before anything compiles; "default" builds the graph it always built."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deebert_jax.model import attention
from deebert_jax.inference import early_exit
from deebert_jax.model import modeling
from deebert_jax.model import layouts
from deebert_jax.model import inference_step
from deebert_jax.core.config import tiny_config

CONFIG = tiny_config()   # 2 layers, width 32
ATOL = 1e-5


@pytest.fixture(scope="module")
def params():
    """Stacked params of the model's shapes, every leaf normal(0, 0.5): wide, so that exits differ
    between rows (and drawn in numpy: initialising through Flax would compile for seconds)."""
    shapes = jax.eval_shape(lambda: modeling.init_params(CONFIG, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map(lambda s: rng.normal(0.0, 0.5, s.shape).astype(s.dtype), shapes)


@pytest.fixture(scope="module")
def batch():
    """Rows of 12, 7, 3 and 9 real tokens (padding after them) and one row that is all padding."""
    ids = np.random.default_rng(3).integers(1, CONFIG.vocab_size, (5, 12)).astype(np.int32)
    mask = (np.arange(12)[None, :] < np.array([12, 7, 3, 9, 0])[:, None]).astype(np.int32)
    return ids * mask, mask, (np.arange(12)[None, :] >= 5).astype(np.int32) * mask


@functools.partial(jax.jit, static_argnames="attention_impl")
def _forward(params, ids, mask, types, attention_impl):
    return inference_step.forward(CONFIG, params, ids, mask, types, attention_impl=attention_impl)


def test_full_forward_matches_default(params, batch):
    # Stacked params: the Flax module (`DeeBert`); the predictor below runs the per-layer steps.
    default = _forward(params, *batch, attention_impl="default")
    fused = _forward(params, *batch, attention_impl="dot_product_attention")
    assert fused.shape == (CONFIG.num_hidden_layers, 5, CONFIG.num_labels)
    assert np.isfinite(np.asarray(fused)).all()   # the all-padding row too
    np.testing.assert_allclose(fused, default, atol=ATOL, rtol=0)


def test_early_exit_predictor_matches_default(params, batch):
    params = layouts.unstack_params(params)   # the serving layout: `layer_step` under a lax.switch
    for threshold in (0.0, 0.4):
        default = early_exit.early_exit_predict(CONFIG, params, *batch, threshold)
        fused = early_exit.early_exit_predict(CONFIG, params, *batch, threshold, attention_impl="dot_product_attention")
        np.testing.assert_array_equal(fused.exit_layer, default.exit_layer)
        np.testing.assert_allclose(fused.logits, default.logits, atol=ATOL, rtol=0)
    assert set(np.asarray(default.exit_layer[:4]).tolist()) == {1, 2}   # at 0.4 rows leave at both ramps


def test_default_graph_is_the_one_built_without_the_argument(params, batch):
    unstacked = layouts.unstack_params(params)
    trace = lambda **kw: str(jax.make_jaxpr(lambda p: inference_step.forward(CONFIG, p, *batch, **kw))(unstacked))
    assert trace(attention_impl="default") == trace()
    assert "dot_product_attention" not in trace()


def test_what_cannot_run_here_is_refused_in_one_line(params, batch):
    on = jax.default_backend()
    with pytest.raises(ValueError, match=rf"attention_impl='cudnn': .*needs an NVIDIA GPU, and JAX is running on {on}"):
        early_exit.early_exit_predict(CONFIG, params, *batch, 0.5, attention_impl="cudnn")
    with pytest.raises(ValueError, match="attention_impl='cudnn'"):
        inference_step.forward(CONFIG, params, *batch, attention_impl="cudnn")
    with pytest.raises(ValueError, match="attention_impl='flash': expected one of default, dot_product_attention, cudnn"):
        inference_step.forward(CONFIG, params, *batch, attention_impl="flash")
    # On a GPU cuDNN's kernel still wants half precision.
    assert "bfloat16 or float16, not float32" in attention.attention_impl_problem("cudnn", jnp.float32, backend="gpu")
    assert attention.attention_impl_problem("cudnn", jnp.bfloat16, backend="gpu") is None
    # Training: jax.nn.dot_product_attention has no attention-probs dropout.
    train = lambda p: modeling.DeeBert(CONFIG, attention_impl="dot_product_attention").apply(
        {"params": p}, *batch, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    with pytest.raises(ValueError, match="attention_impl='dot_product_attention': .*no attention-probs dropout"):
        jax.eval_shape(train, params)
