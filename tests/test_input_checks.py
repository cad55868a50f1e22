"""Model inputs checked at the edges: values, dtypes and shapes named by array, row and position;
the predictors, the evaluation and the forward check before they run (traced inputs: shapes only)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deebert_jax.core.config import tiny_config
from deebert_jax.data.validation import check_model_inputs, is_tracer
from deebert_jax.model import inference_step, layouts
from tests.conftest import initial_params

CONFIG = tiny_config(num_labels=3)


@pytest.fixture(scope="module")
def params():
    return initial_params(CONFIG)


# ----------------------------------------------------------------------------------------------
# Model inputs

def _inputs(b=2, s=6):
    ids = np.arange(1, b * s + 1, dtype=np.int32).reshape(b, s)
    return ids, np.ones((b, s), np.int32), np.zeros((b, s), np.int32)


@pytest.mark.parametrize("edit, message", [
    (lambda i, m, t: i.__setitem__((1, 4), 100), r"input_ids\[1, 4\] = 100: expected a value in \[0, vocab_size=100\)"),
    (lambda i, m, t: i.__setitem__((0, 2), -1), r"input_ids\[0, 2\] = -1: expected a value in \[0, vocab_size=100\)"),
    (lambda i, m, t: t.__setitem__((1, slice(3, None)), 2),
     r"token_type_ids\[1, 3\] = 2: expected a value in \[0, type_vocab_size=2\) \(2 more values like it\)"),
    (lambda i, m, t: m.__setitem__((0, 5), 2), r"attention_mask\[0, 5\] = 2: expected 0 or 1"),
])
def test_out_of_range_values_name_array_row_position(edit, message):
    arrays = _inputs()
    edit(*arrays)
    with pytest.raises(ValueError, match=message):
        check_model_inputs(CONFIG, *arrays)
    with pytest.raises(ValueError, match=message):  # the same from device arrays
        check_model_inputs(CONFIG, *map(jnp.asarray, arrays))


@pytest.mark.parametrize("arrays, message", [
    (lambda i, m, t: (i.astype(np.float32), m, t), "input_ids has dtype float32: expected integers"),
    (lambda i, m, t: (i, m.astype(np.float32), t), "attention_mask has dtype float32"),
    (lambda i, m, t: (i[0], m[0], t[0]), r"input_ids has shape \(6,\): expected \[batch, sequence\]"),
    (lambda i, m, t: (i, m[:, :5], t), r"attention_mask has shape \(2, 5\), input_ids \(2, 6\)"),
    (lambda i, m, t: (np.ones((1, 65), np.int32),) * 3, "sequence length 65: longer than the model's "
                                                       "max_position_embeddings=64"),
    (lambda i, m, t: (i, None, t), "attention_mask is missing"),
])
def test_bad_dtypes_and_shapes(arrays, message):
    with pytest.raises(ValueError, match=message):
        check_model_inputs(CONFIG, *arrays(*_inputs()))


def test_good_inputs_and_tracers():
    ids, mask, types = _inputs()
    mask[1, 3:] = 0
    check_model_inputs(CONFIG, ids, mask.astype(bool), types)
    check_model_inputs(CONFIG, ids.tolist(), mask.tolist(), types.tolist())
    check_model_inputs(CONFIG, *map(jnp.asarray, (ids, mask, types)))

    @jax.jit
    def f(i, m, t):
        assert is_tracer(i) and not is_tracer(ids)
        check_model_inputs(CONFIG, i, m, t)  # values unknown here: shapes and dtypes only
        return i.sum()

    ids[0, 0] = 10_000
    assert int(f(ids, mask, types)) == ids.sum()
    with pytest.raises(ValueError, match="input_ids has dtype float32"):
        f(ids.astype(np.float32), mask, types)


def test_predictors_and_evaluate_check_values_before_running(params):
    """The checks sit at every public predictor's edge (and `evaluate` checks its data set once)."""
    from deebert_jax.evaluation import sweep as evaluation
    from deebert_jax.inference.early_exit import early_exit_predict, early_exit_predict_pmap
    from deebert_jax.inference.exit_aware import exit_aware_predict

    params = jax.tree_util.tree_map(jnp.asarray, params)
    ids, mask, types = _inputs()
    ids[1, 4] = CONFIG.vocab_size
    message = r"input_ids\[1, 4\] = 100: expected a value in \[0, vocab_size=100\)"
    for predict in (early_exit_predict, early_exit_predict_pmap, exit_aware_predict):
        with pytest.raises(ValueError, match=message):
            predict(CONFIG, params, ids, mask, types, 0.5)
    arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
              "labels": np.zeros(len(ids), np.int32)}
    with pytest.raises(ValueError, match=message):
        evaluation.evaluate(CONFIG, params, arrays, "synthetic", thresholds=[0.5], progress=False)
    # A caller that checked its data once may skip the per-call check (benchmarks time the loop alone).
    ids[1, 4] = 1
    out = early_exit_predict(CONFIG, params, ids, mask, types, 0.5, validate_inputs=False)
    assert out.exit_layer.shape == (len(ids),)


def test_forward_checks_concrete_inputs_and_traced_shapes(params):
    params = jax.tree_util.tree_map(jnp.asarray, params)
    ids, mask, types = _inputs()
    mask[0, 5] = 2
    with pytest.raises(ValueError, match=r"attention_mask\[0, 5\] = 2: expected 0 or 1"):
        inference_step.forward(CONFIG, layouts.unstack_params(params), ids, mask, types)
    mask[0, 5] = 1
    with pytest.raises(ValueError, match="must share one"):   # under jit: shapes are still checked
        jax.jit(inference_step.forward, static_argnums=0)(CONFIG, params, ids, mask[:, :4], types)
