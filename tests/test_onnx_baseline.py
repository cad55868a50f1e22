"""ONNX Runtime as the benchmarks' baseline: the eager twin exported to ONNX, the same logits,
each batch at its own length, full depth, and the targets against it."""

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from benchmarks import benchmarking as bm   # noqa: E402
from benchmarks import onnx_engine   # noqa: E402
from benchmarks import report as bench_report   # noqa: E402
from benchmarks.harness import BenchmarkError   # noqa: E402


def test_the_benchmark_times_onnxruntime_beside_jax_and_torch(tmp_path):
    from train.benchmark import main
    out = tmp_path / "bench.json"
    assert main(["--random-model", "tiny", "--task", "synthetic", "--probe-size", "128", "--batch-sizes", "1,2",
                 "--thresholds", "0", "--runs", "3", "--warmup", "1", "--seq-len", "16", "--threads", "1",
                 "--backends", "jax,torch,onnxruntime", "--no-progress", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    bench_report.validate(result)
    ort = [r for r in result["rows"] if r["backend"] == "onnxruntime"]
    assert [(r["mode"], r["batch_size"]) for r in ort] == [("full", 1), ("full", 2)]
    assert all(r["median_ms"] > 0 and "own length" in r["run_at"] for r in ort)
    assert "onnxruntime" in result["versions"]
    assert "full vs onnxruntime" in {t["target"] for t in result["targets"]}
    assert "| onnxruntime | full | 1 |" in out.with_suffix(".md").read_text()


def test_the_export_answers_as_the_twin_and_a_different_model_is_refused(tmp_path):
    import jax
    from deebert_jax.model import modeling
    from deebert_jax.core.config import tiny_config
    config = tiny_config(num_hidden_layers=2)
    twin = bm.torch_twin(config, modeling.init_params(config, jax.random.PRNGKey(0)), str(tmp_path / "a"))
    rng = np.random.default_rng(0)
    mask = (np.arange(12)[None, :] < rng.integers(3, 12, size=(4, 1))).astype(np.int32)
    example = {"input_ids": rng.integers(5, config.vocab_size, size=(4, 12)).astype(np.int32) * mask,
               "attention_mask": mask, "token_type_ids": np.zeros((4, 12), np.int32)}
    session = onnx_engine.onnx_twin(twin, str(tmp_path / "onnx"), 12, 1, example)
    assert onnx_engine.own_length(example)["input_ids"].shape == (4, int(mask.sum(-1).max()))
    other = bm.torch_twin(config, modeling.init_params(config, jax.random.PRNGKey(1)), str(tmp_path / "b"))
    with pytest.raises(BenchmarkError, match="differ from the PyTorch twin"):
        onnx_engine.check_agreement(other, session, example)


def test_targets_against_onnxruntime():
    row = lambda **kw: {"backend": "jax", "mode": "full", "batch_size": 1, "seq_len": 16, "threshold": None,
                        "median_ms": 4.0, "compile_s": None, "layer_saving": 0.0, "wall_saving": 0.0, **kw}
    rows = [row(), row(backend="onnxruntime", median_ms=5.0), row(mode="early_exit", threshold=0.15, median_ms=2.5)]
    targets = {t["target"]: t for t in bench_report.check_targets({"rows": rows, "policy_threshold": 0.15})}
    assert targets["full vs onnxruntime"]["value"] == 0.8 and targets["full vs onnxruntime"]["met"]
    assert targets["early exit vs onnxruntime"]["value"] == 0.5 and targets["early exit vs onnxruntime"]["met"]
    assert "early exit vs onnxruntime" not in {t["target"] for t in bench_report.check_targets({"rows": rows})}


def test_onnxruntime_runs_float32_only():
    with pytest.raises(BenchmarkError, match="float32 only"):
        bm.BenchmarkSpec(backends=("jax", "onnxruntime"), dtype="bfloat16").check()


def test_the_serving_baselines_answer_as_the_twin():
    """`train.serve --backend onnxruntime` and `--backend torch`: the same logits, every row at
    layer L, rows of different lengths batched together."""
    import jax
    import torch
    from benchmarks import torch_engine
    from deebert_jax.core.config import tiny_config
    from deebert_jax.model import modeling
    from deebert_jax.serving.requests import Row
    config = tiny_config(num_hidden_layers=2)
    params = modeling.init_params(config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    rows = [Row(rng.integers(5, config.vocab_size, size=n).astype(np.int32), np.ones(n, np.int32),
                np.zeros(n, np.int32), False) for n in (3, 9, 16)]
    answers = {}
    for name, build in [("onnxruntime", onnx_engine.build_engine), ("torch", torch_engine.build_engine)]:
        engine, note = build(config, params, (8, 16))
        got = []
        engine.submit(rows, [lambda logits, layer: got.append((logits, layer))] * len(rows))
        while engine.step():
            pass
        assert len(got) == 3 and all(layer == 2 for _, layer in got), note
        answers[name] = np.stack([logits for logits, _ in got])
    assert "ONNX Runtime" in onnx_engine.build_engine(config, params, (8,))[1]
    np.testing.assert_allclose(answers["onnxruntime"], answers["torch"], atol=onnx_engine.AGREEMENT_ATOL)
