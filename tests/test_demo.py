"""The demo's whole pipeline (convert -> train -> evaluate -> benchmark -> summary) on configs/tiny.py."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_demo_pipeline_on_tiny_config(tmp_path, monkeypatch):
    # One CPU device, as a user runs it. 8 steps a stage: nothing here depends on what is learnt
    # (that the tiny task is learnt through the CLI is checked in test_train_cli.py).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "train.demo", "--config", "configs/tiny.py", f"--config.workdir={tmp_path}",
         "--config.steps_per_stage=8", "--config.bench_runs=3", "--config.bench_thresholds=0,0.7",
         "--config.eval_mode=exit_aware", "--config.calibration_holdout=64", "--config.calibration_confidence=0",
         "--config.calibration_max_drop=100"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for step in ("train: stage 1", "evaluate: every ramp", "benchmark: the same weights"):
        assert step in out
    summary = out[out.index("deebert-jax demo:"):]
    assert "synthetic dev, 100 examples, 2 layers" in summary
    assert "off-ramps read the first token" in summary
    # The headline is the threshold chosen on the held-out rows, measured on dev; the same-set
    # sweep's best point is labelled as such.
    assert "Held-out choice: entropy threshold" in summary and "chosen on 64 training rows no stage saw" in summary
    assert "Target (>= 40% saved, <= 1.0 point lost, judged on this held-out choice)" in summary
    assert "Same-set sweep (threshold chosen on the dev set it is measured on, so optimistic)" in summary
    lines = [l.split() for l in summary.splitlines() if l.strip() and l.split()[0] in ("0", "0.7")]
    assert len(lines) == 2 and all(l[5] != "-" and l[6] != "-" for l in lines), summary  # JAX and torch latency
    results = json.load(open(tmp_path / "results.json"))
    assert results["mode"] == "exit_aware" and results["num_examples"] == 100
    assert results["sweep"][-1]["mean_exit_layer"] == 1.0  # 0.7 > ln 2: everything leaves at layer 1
    bench = json.load(open(tmp_path / "bench.json"))
    assert {(r["backend"], r["mode"]) for r in bench["rows"]} == {
        ("jax", "full"), ("jax", "early_exit"), ("torch", "full"), ("torch", "early_exit"), ("onnxruntime", "full")}
    assert "onnxruntime" in summary.split("full-depth forward:")[1].splitlines()[0]
    # The threshold training chose is timed beside the configured ones.
    run = json.load(open(tmp_path / "run.json"))
    chosen = run["policy"]["threshold"]
    from train.demo import source_commit
    assert run["commit"] == source_commit()   # None outside a git checkout
    timed = {r["threshold"] for r in bench["rows"] if r["mode"] == "early_exit"}
    assert timed == {0.0, 0.7, chosen}
    for name in ("results.png", "bench.png", "train/model/deebert_config.json"):
        assert (tmp_path / name).exists(), name

    # RESULTS.md from that run: every number read from its JSON files, plots copied beside it
    # (the command's main in this process: no second start-up of Python and JAX).
    from train.report import main as report
    out_md = tmp_path / "RESULTS.md"
    monkeypatch.chdir(REPO)
    assert report([str(tmp_path), "--out", str(out_md)]) == 0
    text = out_md.read_text()
    final = results["per_ramp"][-1]["metric"]
    assert "## synthetic: first 512 training examples, first-token off-ramps" in text
    assert "Held-out choice: entropy threshold" in text and "Same-set sweep" in text
    name = os.path.basename(str(tmp_path))
    kept = json.loads((tmp_path / "research" / "results" / name / "run.json").read_text())
    assert kept["policy"]["calibration_split"] == "train-holdout"
    assert f"Final ramp (layer 2) dev accuracy: **{100 * final:.2f}**" in text
    assert text.count("| jax | early_exit |") == len(timed)  # thresholds 0, 0.7 and the chosen one
    name = os.path.basename(str(tmp_path))
    for kind in ("tradeoff", "latency"):
        assert (tmp_path / "research" / "results" / f"{name}_{kind}.png").exists()
