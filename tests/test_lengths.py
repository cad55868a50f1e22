"""Padded lengths: the classes rows are padded to, the server's and the benchmark's alike."""

import numpy as np
import pytest

from deebert_jax.core.errors import InputError
from deebert_jax.data.lengths import length_classes, padded_length
from deebert_jax.serving import requests


def test_classes_in_either_spacing_end_at_the_maximum():
    assert length_classes(128) == (16, 32, 64, 128)
    assert length_classes(100) == (16, 32, 64, 100)
    assert length_classes(64, "multiple-of-8") == (16, 24, 32, 40, 48, 56, 64)
    assert length_classes(60, "multiple-of-8") == (16, 24, 32, 40, 48, 56, 60)
    assert requests.length_classes(128) == (16, 32, 64, 128)   # the server's old signature
    assert requests.length_classes(64, "multiple-of-8")[:3] == (16, 24, 32)
    with pytest.raises(InputError, match="length spacing 'thirds'"):
        length_classes(64, "thirds")


def test_a_row_takes_the_shortest_class_that_holds_it():
    classes = length_classes(64, "multiple-of-8")
    assert [padded_length(n, classes) for n in (1, 16, 17, 25, 64)] == [16, 16, 24, 32, 64]
    with pytest.raises(InputError, match="65 tokens"):
        padded_length(65, classes)


def test_the_benchmark_cuts_each_batch_to_its_class_and_warms_every_shape():
    from benchmarks import benchmarking as bm
    from deebert_jax.core.config import tiny_config
    from deebert_jax.model import modeling
    import jax
    config = tiny_config()
    params = modeling.init_params(config, jax.random.PRNGKey(0))
    real = [3, 20, 30, 9, 40, 17]
    mask = (np.arange(64)[None, :] < np.array(real)[:, None]).astype(np.int32)
    arrays = {"input_ids": np.where(mask, 5, 0).astype(np.int32), "attention_mask": mask,
              "token_type_ids": np.zeros_like(mask)}
    index = [np.array([r]) for r in range(6)]
    assert bm._run_lengths(mask, index, "multiple-of-8") == [16, 24, 32, 16, 40, 24]
    assert bm._run_lengths(mask, index, "power-of-two") == [16, 32, 32, 16, 64, 32]
    assert bm._run_lengths(mask, index, "own") == real
    assert bm._run_lengths(mask, index, "pool") == [64] * 6
    spec = bm.BenchmarkSpec(batch_sizes=(1,), thresholds=(0.0,), runs=6, warmup=1, backends=("jax",),
                            padding="multiple-of-8")
    rows = bm.run_benchmark(config, params, arrays, spec, show_progress=False)
    assert {r["run_at"] for r in rows} == {"each batch padded to a multiple of 8 length (mean 25.3 of 64 tokens)"}
    with pytest.raises(bm.BenchmarkError, match="padding='tight'"):
        bm.BenchmarkSpec(padding="tight").check()
