"""`train.evaluate` and `deebert_jax.evaluation.sweep` on a tiny random checkpoint and the synthetic task."""

import json
import math

import jax
import numpy as np
import pytest
from conftest import random_checkpoint

from deebert_jax.data import glue as data
from deebert_jax.evaluation import sweep as evaluation
from deebert_jax.weights.checkpoint import save_checkpoint
from deebert_jax.core.config import tiny_config
from train import evaluate as evaluate_cli

L = 3
# Wide initialisation: random ramps with spread-out confidence, so exits land on every layer.
CONFIG = tiny_config(num_hidden_layers=L, num_labels=2, initializer_range=0.5)
SEQ, LIMIT, BATCH = 16, 40, 16   # 40 examples in batches of 16: the last batch has padding rows


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(tmp_path_factory, CONFIG)


@pytest.fixture(scope="module")
def arrays():
    return data.load_split("synthetic", "dev", max_seq_length=SEQ, limit=LIMIT, vocab_size=CONFIG.vocab_size)


def np_entropy(z):
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(-1)


def test_cli_writes_valid_results_json_and_png(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval" / "results.json"
    rc = evaluate_cli.main(["--checkpoint", str(checkpoint[0]), "--task", "synthetic", "--max-seq-length", str(SEQ),
                            "--limit", str(LIMIT), "--batch-size", str(BATCH), "--out", str(out), "--no-progress"])
    assert rc == 0
    results = json.loads(out.read_text())
    assert {"task", "num_examples", "num_layers", "metric_name", "per_ramp", "sweep"} <= set(results)
    assert (results["task"], results["num_examples"], results["num_layers"]) == ("synthetic", LIMIT, L)
    assert results["metric_name"] == "accuracy"
    assert [r["layer"] for r in results["per_ramp"]] == list(range(1, L + 1))
    assert [p["threshold"] for p in results["sweep"]] == pytest.approx(list(evaluation.ENTROPY_THRESHOLDS))
    for p in results["sweep"]:
        assert set(p) >= {"threshold", "metric", "mean_exit_layer", "layer_saving", "mean_layers_run",
                          "exit_counts", "wall_seconds"}
        assert len(p["exit_counts"]) == L and sum(p["exit_counts"]) == LIMIT
        mean_exit = sum((i + 1) * c for i, c in enumerate(p["exit_counts"])) / LIMIT
        assert p["mean_exit_layer"] == pytest.approx(mean_exit)
        assert p["layer_saving"] == pytest.approx(1 - mean_exit / L)
        assert 0 <= p["metric"] <= 1 and p["wall_seconds"] > 0
        # A loop runs as deep as its deepest row, never deeper than L.
        assert 0 < p["mean_layers_run"] <= L
    never, always = results["sweep"][0], results["sweep"][-1]   # thresholds 0 and 0.7 > ln 2
    assert never["exit_counts"][-1] == LIMIT and never["metric"] == pytest.approx(results["per_ramp"][-1]["metric"])
    assert always["exit_counts"][0] == LIMIT and always["metric"] == pytest.approx(results["per_ramp"][0]["metric"])
    assert always["mean_layers_run"] == 1

    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0

    table = capsys.readouterr().out
    assert "threshold" in table and "0.005" in table and str(out) in table


def test_sweep_matches_exits_computed_from_all_ramp_logits(checkpoint, arrays):
    _, params = checkpoint
    ramp_logits = evaluation.all_ramp_logits(CONFIG, params, arrays, BATCH)
    assert ramp_logits.shape == (L, LIMIT, 2)
    entropies = np_entropy(ramp_logits)
    thresholds = [t for t in np.linspace(0.05, math.log(2), 25) if np.abs(entropies - t).min() > 1e-4][:6]
    results = evaluation.evaluate(CONFIG, params, arrays, "synthetic", thresholds=thresholds, batch_size=BATCH,
                                  devices=jax.local_devices()[:1], progress=False)
    labels = arrays["labels"]
    for layer, r in enumerate(results["per_ramp"]):
        assert r["metric"] == pytest.approx(np.mean(ramp_logits[layer].argmax(-1) == labels))
    spread = set()
    for t, p in zip(thresholds, results["sweep"]):
        below = entropies < t
        below[-1] = True
        exit_layer = below.argmax(0) + 1
        preds = ramp_logits[exit_layer - 1, np.arange(LIMIT)].argmax(-1)
        assert p["exit_counts"] == np.bincount(exit_layer, minlength=L + 1)[1:].tolist()
        assert p["metric"] == pytest.approx(np.mean(preds == labels))
        # Each batch's loop runs to its deepest row.
        deepest = [exit_layer[s:s + BATCH].max() for s in range(0, LIMIT, BATCH)]
        assert p["mean_layers_run"] == pytest.approx(np.mean(deepest))
        spread.add(tuple(p["exit_counts"]))
    assert len(spread) >= 3, "thresholds should give different exit patterns"


def test_pmap_and_exit_aware_modes_agree_with_single_device(checkpoint, arrays):
    _, params = checkpoint
    kwargs = dict(thresholds=[0.0, 0.3, 0.5], batch_size=BATCH, progress=False)
    one = evaluation.evaluate(CONFIG, params, arrays, "synthetic", devices=jax.local_devices()[:1], **kwargs)
    many = evaluation.evaluate(CONFIG, params, arrays, "synthetic", **kwargs)
    assert many["num_devices"] == len(jax.local_devices()) > 1
    keys = ("metric", "exit_counts", "mean_exit_layer")
    strip = lambda r: [{k: p[k] for k in keys} for p in r["sweep"]]
    assert strip(many) == strip(one)
    assert evaluation.evaluate(CONFIG, params, {k: v[:3] for k, v in arrays.items()}, "synthetic",
                               thresholds=[0.3], batch_size=1, progress=False)["num_devices"] == 1
    # Per-device loops: the mean over device shards is at most the whole-batch loop's depth.
    for a, b in zip(one["sweep"], many["sweep"]):
        assert b["mean_layers_run"] <= a["mean_layers_run"]

    # Same shapes, 13 new thresholds: the whole evaluation (forward, pmapped loop) compiles nothing.
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if event.endswith("backend_compile_duration") else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        again = evaluation.evaluate(CONFIG, params, arrays, "synthetic", batch_size=BATCH, progress=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(again["sweep"]) == 13 and compiles == []
    pytest.importorskip("deebert_jax.inference.exit_aware")
    aware = evaluation.evaluate(CONFIG, params, arrays, "synthetic", mode="exit_aware", **kwargs)
    assert strip(aware) == strip(one)


@pytest.mark.parametrize("argv, message", [
    (["--thresholds", "0,-1"], "must be a number >= 0"),
    (["--thresholds", "0,abc"], "'abc' is not a number"),
    (["--batch-size", "0"], "must be positive"),
    (["--rule", "nope"], "invalid choice"),
])
def test_cli_rejects_bad_flags(checkpoint, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_cli.main(["--checkpoint", str(checkpoint[0]), "--task", "synthetic", "--out",
                           str(tmp_path / "r.json"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_errors_name_the_fault(checkpoint, tmp_path, capsys):
    missing = tmp_path / "no_such_checkpoint"
    assert evaluate_cli.main(["--checkpoint", str(missing), "--task", "synthetic", "--out", str(tmp_path / "r.json")]) == 1
    assert str(missing) in capsys.readouterr().err
    # The labels check comes before any array is used, so the 2-label arrays can stand in.
    path = save_checkpoint(tmp_path / "three", CONFIG.replace(num_labels=3), checkpoint[1])
    assert evaluate_cli.main(["--checkpoint", str(path), "--task", "synthetic", "--out", str(tmp_path / "r.json")]) == 1
    assert "num_labels=3" in capsys.readouterr().err
    assert evaluate_cli.main(["--checkpoint", str(checkpoint[0]), "--task", "sst9", "--out", str(tmp_path / "r.json")]) == 1
    assert "sst9" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown exit rule"):
        evaluation.default_thresholds("nope", L)


def test_cli_debug_raises_instead(tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(FileNotFoundError, match="not a deebert-jax checkpoint"):
        evaluate_cli.main(["--checkpoint", str(missing), "--task", "synthetic", "--out", str(tmp_path / "r.json"),
                           "--debug"])
