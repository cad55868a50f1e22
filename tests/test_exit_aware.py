"""exit_aware_predict gives row for row what early_exit_predict gives, at any pool size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ragged_batch

from deebert_jax.inference import exit_aware
from deebert_jax.model import layouts
from deebert_jax.core.config import tiny_config
from deebert_jax.inference.early_exit import early_exit_predict, entropy
from deebert_jax.inference.exit_aware import exit_aware_predict, padded_pool_size
from deebert_jax.model.modeling import init_params
from deebert_jax.model.inference_step import forward
from benchmarks.exit_aware_alternatives import exit_aware_predict_with

CONFIG = tiny_config(num_hidden_layers=4, num_labels=3)
SEQ = 12


def random_params(config, seed, ramp_scale=0.5):
    """Random weights in the model's layout (eval_shape: no slow init). Ramp classifiers are
    scaled up so that ramp entropies spread and thresholds send rows out at every layer."""
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0), SEQ))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(seed)
    values = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        if "scale" in name:  # LayerNorm
            value = 1.0 + rng.normal(0.0, 0.1, leaf.shape)
        else:
            value = rng.normal(0.0, ramp_scale if "classifier" in name else 0.3, leaf.shape)
        values.append(jnp.asarray(value, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, values)


def random_batch(n, seed, padding_rows=()):
    return ragged_batch(n, SEQ, CONFIG.vocab_size, seed, padding_rows=padding_rows, type_fraction=0.3)


def safe_thresholds(scores, rng, count, band):
    """Thresholds halfway between well-separated observed scores [L, N], so a 1e-7 numeric
    difference between batchings cannot flip an exit decision; drawn inside the `band` of
    quantiles of the first ramp's scores, so that rows exit at several layers."""
    scores = np.asarray(scores, np.float64)
    lo, hi = np.quantile(scores[0], band)
    v = np.unique(scores.ravel())
    gaps = [i for i in np.flatnonzero(np.diff(v) > 1e-4) if lo <= v[i] <= hi]
    picks = rng.choice(gaps, size=count, replace=False)
    return [float((v[i] + v[i + 1]) / 2) for i in picks]


@pytest.fixture(scope="module")
def models():
    return [random_params(CONFIG, seed) for seed in (0, 1)]


def assert_same(result, reference):
    np.testing.assert_array_equal(np.asarray(result.exit_layer), np.asarray(reference.exit_layer))
    np.testing.assert_allclose(np.asarray(result.logits), np.asarray(reference.logits), atol=1e-5, rtol=0)
    assert int(result.layers_run) == int(reference.layers_run)


@pytest.mark.parametrize("rule, bucket_sizes", [("entropy", (8, 2)), ("max_prob", (8,)), ("patience", (8, 2))])
def test_matches_early_exit_on_random_models_and_thresholds(models, rule, bucket_sizes):
    # 29 rows: not a multiple of any bucket; two all-padding rows.
    batch = random_batch(29, seed=7, padding_rows=(3, 17))
    rng = np.random.default_rng(11)
    spread = set()
    for params in models:
        ramp_logits = forward(CONFIG, params, *batch)  # [L, N, K]
        real = np.asarray(batch[1]).sum(-1) > 0
        if rule == "entropy":
            thresholds = safe_thresholds(entropy(ramp_logits)[:, real], rng, 3, (0.1, 0.5))
        elif rule == "max_prob":
            thresholds = safe_thresholds(jax.nn.softmax(ramp_logits, -1).max(-1)[:, real], rng, 3, (0.5, 0.9))
        else:
            thresholds = [0, 1, 2]
        for threshold in thresholds:
            reference = early_exit_predict(CONFIG, params, *batch, threshold, rule)
            result = exit_aware_predict(CONFIG, params, *batch, threshold, rule, bucket_sizes=bucket_sizes)
            assert_same(result, reference)
            if rule == "patience":  # the refill scheduler (per-slot rule state, 29 rows through 8 slots)
                assert_same(exit_aware_predict_with("refill", CONFIG, params, *batch, threshold, rule,
                                                    bucket_sizes=(8,)), reference)
            spread |= set(np.asarray(result.exit_layer).tolist())
    # The thresholds must actually exercise compaction: early and late exits, and padding rows.
    assert 0 in spread and len(spread - {0}) >= 3


def test_pools_bucket_remainders_and_host_scheduler(models):
    """Several pools (pool_size 16: the last holds 5 rows), one bucket size or two, host scheduler."""
    params = models[0]
    batch = random_batch(37, seed=3, padding_rows=(0,))
    real = np.asarray(batch[1]).sum(-1) > 0
    threshold = safe_thresholds(entropy(forward(CONFIG, params, *batch))[:, real], np.random.default_rng(5), 1,
                                (0.2, 0.4))[0]
    reference = early_exit_predict(CONFIG, params, *batch, threshold)
    assert len(set(np.asarray(reference.exit_layer).tolist())) >= 3
    for kwargs in (dict(bucket_sizes=(8, 2), pool_size=16), dict(bucket_sizes=(3,))):
        assert_same(exit_aware_predict(CONFIG, params, *batch, threshold, **kwargs), reference)
    assert_same(exit_aware_predict_with("host", CONFIG, params, *batch, threshold, bucket_sizes=(5,)), reference)


def test_threshold_zero_runs_every_row_to_the_last_layer_and_padding_rows_exit_at_zero(models):
    batch = random_batch(6, seed=2, padding_rows=(1,))
    result = exit_aware_predict(CONFIG, models[1], *batch, 0.0, bucket_sizes=(8, 2))
    expected = np.full(6, CONFIG.num_hidden_layers)
    expected[1] = 0
    np.testing.assert_array_equal(np.asarray(result.exit_layer), expected)
    np.testing.assert_array_equal(np.asarray(result.logits)[1], 0.0)
    final = forward(CONFIG, models[1], *batch)[-1]
    np.testing.assert_allclose(np.asarray(result.logits)[[0, 2, 3, 4, 5]], np.asarray(final)[[0, 2, 3, 4, 5]],
                               atol=1e-5, rtol=0)
    # The serving layout (per-layer trees) gives the same.
    assert_same(exit_aware_predict(CONFIG, layouts.unstack_params(models[1]), *batch, 0.0, bucket_sizes=(8, 2)),
                result)


def test_pool_sizes_share_compiled_programs(models):
    cache_size = getattr(exit_aware._pool_loop_device, "_cache_size", None)
    if cache_size is None:
        pytest.skip("this jax has no jit _cache_size")
    params = models[0]
    exit_aware_predict(CONFIG, params, *random_batch(9, seed=0), 0.5, bucket_sizes=(8, 2))
    before = cache_size()
    for n in (10, 13, 16):  # all pad to 2 * 8 rows
        exit_aware_predict(CONFIG, params, *random_batch(n, seed=n), 0.4 + n / 100, bucket_sizes=(8, 2))
    assert cache_size() == before
    assert [padded_pool_size(n, (8, 2), 1024) for n in (1, 8, 9, 16, 17, 100, 2000)] == [8, 8, 16, 16, 32, 128, 1024]
    assert padded_pool_size(50, (32,), 40) == 64  # the pool cap rounds up to the bucket


def test_empty_input_and_bad_arguments(models):
    params = models[0]
    empty = np.zeros((0, SEQ), np.int32)
    result = exit_aware_predict(CONFIG, params, empty, empty, empty, 0.5)
    assert result.logits.shape == (0, CONFIG.num_labels) and result.exit_layer.shape == (0,)
    batch = random_batch(4, seed=1)
    with pytest.raises(ValueError, match="attention_mask"):
        exit_aware_predict(CONFIG, params, batch[0], batch[1][:, :5], batch[2], 0.5)
    too_long = np.ones((2, CONFIG.max_position_embeddings + 1), np.int32)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        exit_aware_predict(CONFIG, params, too_long, too_long, too_long, 0.5)
    with pytest.raises(ValueError, match="bucket_sizes"):
        exit_aware_predict(CONFIG, params, *batch, 0.5, bucket_sizes=(0,))
    with pytest.raises(ValueError, match="scheduler"):
        exit_aware_predict(CONFIG, params, *batch, 0.5, scheduler="gpu")
    with pytest.raises(ValueError, match="pool_size"):
        exit_aware_predict(CONFIG, params, *batch, 0.5, pool_size=0)
    with pytest.raises(ValueError, match="threshold"):
        exit_aware_predict(CONFIG, params, *batch, -1.0)
    with pytest.raises(ValueError, match="unknown exit rule"):
        exit_aware_predict(CONFIG, params, *batch, 0.5, rule="vote")


def test_benchmark_threshold_choice_hits_targets_away_from_observed_scores():
    from train.benchmark_exit_aware import thresholds_for_savings
    rng = np.random.default_rng(0)
    scores = rng.random((6, 200))   # [L, N] entropies
    for target, threshold in zip([0.0, 0.3, 0.5, 0.8], thresholds_for_savings(scores, [0.0, 0.3, 0.5, 0.8])):
        below = scores < threshold
        below[-1] = True
        saving = 1 - (np.argmax(below, axis=0) + 1).mean() / 6
        assert abs(saving - target) < 0.02
        assert threshold == 0.0 or np.abs(scores - threshold).min() > 1e-6


def test_benchmark_cli_on_a_random_model_needs_no_files(tmp_path):
    """`--random-model` times exit-aware batching with no model or data files (as on a bare GPU host)."""
    import json

    from train.benchmark_exit_aware import main
    out = tmp_path / "ea.json"
    assert main(["--random-model", "tiny", "--seq-len", "16", "--pool", "8", "--batch-size", "4", "--repeats", "1",
                 "--layer-savings", "0.5", "--schedulers", "device", "--bucket-sizes", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "random tiny" and result["data"].startswith("random tokens")
    methods = {r["method"] for r in result["rows"]}
    assert {"plain loop, batch 4", "exit_aware (device, 4)"} <= methods
    assert all(r["same_exits_as_plain"] for r in result["rows"] if r["method"].startswith("exit_aware"))
    assert main(["--random-model", "tiny", "--checkpoint", "x", "--out", str(tmp_path / "b.json")]) == 1
