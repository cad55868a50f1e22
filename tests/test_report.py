"""RESULTS.md sections and recorded commands name paths relative to the checkout, not the machine."""

import json
import os

import pytest

from benchmarks.results import format_markdown_section, portable_paths, relative_paths


@pytest.mark.parametrize("text, expected", [
    ("python -m x --out /ckpt/main/workdirs/a --glue-dir /data/glue", "python -m x --out workdirs/a --glue-dir /data/glue"),
    ("--config.workdir=/ckpt/main/workdirs/t", "--config.workdir=workdirs/t"),
    ("'/ckpt/main/with space/x'", "'with space/x'"),
    ("/ckpt/main", "."),
    ("/ckpt/main/", "."),
    ("/ckpt/main2/x /other/ckpt/main/x", "/ckpt/main2/x /other/ckpt/main/x"),   # not under the root
    ("random tiny (2 layers)", "random tiny (2 layers)"),
])
def test_relative_paths_rewrites_only_paths_under_the_root(text, expected):
    assert relative_paths(text, "/ckpt/main") == expected


def test_portable_paths_makes_the_checkout_and_its_neighbours_relative():
    kept = portable_paths({"data": "GLUE TSVs from /ckpt/shared/data/glue", "n": 3,
                           "steps": ["python -m x --out /ckpt/main/workdirs/a", "/ckpt/mainly/x"]}, "/ckpt/main")
    assert kept == {"data": "GLUE TSVs from ../shared/data/glue", "n": 3,
                    "steps": ["python -m x --out workdirs/a", "../mainly/x"]}


def test_relative_paths_defaults_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert relative_paths(f"--out {tmp_path}/workdirs/demo/bench.json") == "--out workdirs/demo/bench.json"


def _run_files(root):
    """A finished demo run under `root`/workdirs/demo whose JSON records absolute paths, as train.demo writes."""
    run = root / "workdirs" / "demo"
    run.mkdir(parents=True)
    results = {"task": "synthetic", "metric_name": "accuracy", "num_layers": 2, "num_examples": 4,
               "rule": "entropy", "mode": "exit_aware",
               "per_ramp": [{"layer": 1, "metric": 0.5}, {"layer": 2, "metric": 0.75}],
               "sweep": [{"threshold": 0.0, "metric": 0.75, "layer_saving": 0.0, "mean_exit_layer": 2.0,
                          "exit_counts": [0, 4]}]}
    bench = {"device": "cpu", "threads": {"requested": 1}, "rows": [
                 {"backend": "jax", "mode": "full", "batch_size": 1, "threshold": None, "median_ms": 1.0,
                  "p90_ms": 1.5, "mean_exit_layer": 2.0, "wall_saving": 0.0}],
             "command": f"python -m train.benchmark --checkpoint {run}/train/model --out {run}/bench.json"}
    meta = {"command": f"python -m train.demo --config configs/tiny.py --config.workdir={run}",
            "steps": [f"python -m train.train --config=configs/tiny.py --config.workdir={run}/train",
                      f"python -m train.evaluate --checkpoint {run}/train/model --out {run}/results.json"],
            "config": {"train_limit": 4, "max_seq_length": 16}, "data": "synthetic data",
            "results": str(run / "results.json"), "bench": str(run / "bench.json")}
    for name, obj in (("run.json", meta), ("results.json", results), ("bench.json", bench)):
        (run / name).write_text(json.dumps(obj))
    for png in ("results.png", "bench.png"):
        (run / png).write_bytes(b"\x89PNG\r\n\x1a\n")
    return run, meta, results, bench


def test_section_names_paths_relative_to_the_checkout(tmp_path, monkeypatch):
    run, meta, results, bench = _run_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    text = format_markdown_section(meta, results, bench, {"tradeoff": "t.png", "latency": "l.png"}, label=str(run))
    assert str(tmp_path) not in text
    assert "(workdirs/demo)" in text
    assert "`python -m train.demo --config configs/tiny.py --config.workdir=workdirs/demo`" in text
    assert "`python -m train.evaluate --checkpoint workdirs/demo/train/model --out workdirs/demo/results.json`" in text
    assert "--out workdirs/demo/bench.json`" in text


def test_section_names_the_fitted_off_ramp_temperatures(tmp_path, monkeypatch):
    run, meta, results, bench = _run_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    plain = format_markdown_section(meta, results, bench, {"tradeoff": "t.png", "latency": "l.png"}, label="demo")
    assert "temperatures" not in plain and "at commit" not in plain
    meta["commit"] = "abc1234"
    assert "--config.workdir=workdirs/demo` at commit `abc1234`" in format_markdown_section(
        meta, results, bench, {"tradeoff": "t.png", "latency": "l.png"}, label="demo")
    meta["policy"] = {"rule": "entropy", "threshold": 0.1, "max_drop": 1.0, "confidence": 0.95,
                      "calibration_split": "train-holdout", "calibration_size": 30,
                      "reported": {"n": 4, "saving": 0.5, "metric": 0.75, "full_metric": 0.75, "drop": 0.0,
                                   "disagreement": 0.0},
                      "ramp_temperatures": {"fit": "agreement", "temperatures": [0.4471, 1.0], "rows": 10,
                                            "holdout": 40}}
    text = format_markdown_section(meta, results, bench, {"tradeoff": "t.png", "latency": "l.png"}, label="demo")
    assert "off-ramps with fitted temperatures (demo)" in text
    assert ("off-ramp temperatures fitted to agree with ramp L on the first 10 held-out rows (the threshold "
            "chosen on the other 30): 0.447, 1.") in text


def test_report_cli_writes_relative_commands(tmp_path, monkeypatch):
    from train.report import main
    run, *_ = _run_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main([str(run), "--out", str(tmp_path / "RESULTS.md")]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert str(tmp_path) not in text
    assert "Generated by `python -m train.report workdirs/demo --out RESULTS.md`" in text
    assert "--config.workdir=workdirs/demo/train" in text
    assert os.path.exists(tmp_path / "research" / "results" / "demo_latency.png")


def _comparison_file(root):
    """A `train.compare_rules` JSON under `root`/workdirs/rules, computed from random logits, whose
    command records absolute paths."""
    import numpy as np

    from research import rule_comparison

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (3, 60, 2)).astype(np.float32)
    labels = rng.integers(0, 2, 60)
    result = rule_comparison.compare_rules("rte", (logits[:, :30], labels[:30]), (logits[:, 30:], labels[30:]),
                                           budgets=[0.0, 50.0])
    out = root / "workdirs" / "rules" / "rte.json"
    result["command"] = f"python -m train.compare_rules --checkpoint {root}/workdirs/rte/model --task rte --out {out}"
    result["checkpoint"] = f"{root}/workdirs/rte/model"
    rule_comparison.write_outputs(result, out)
    return out, result


def test_report_appends_the_exit_rules_section(tmp_path, monkeypatch):
    from train.report import main
    run, *_ = _run_files(tmp_path)
    rules, result = _comparison_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main([str(run), "--out", "RESULTS.md", "--rules", str(rules)]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert str(tmp_path) not in text
    assert "Generated by `python -m train.report workdirs/demo --out RESULTS.md --rules workdirs/rules/rte.json`" in text
    assert text.index("## synthetic: first 4 training examples") < text.index("## Exit rules side by side")
    section = text[text.index("## Exit rules side by side"):]
    assert "### rte: exit rules side by side" in section
    assert "`python -m train.compare_rules --checkpoint workdirs/rte/model --task rte --out workdirs/rules/rte.json`" \
        in section
    rows = [line for line in section.splitlines() if line.startswith(("| entropy ", "| max_prob ", "| patience "))]
    assert len(rows) == len(result["entries"]) == 6
    assert sum("| refused |" in r for r in rows) == sum(e["refused"] for e in result["entries"]) > 0
    assert "![rte: exit rules side by side](research/results/rte_rules.png)" in section
    assert (tmp_path / "research" / "results" / "rte_rules.png").read_bytes()[:4] == b"\x89PNG"
    # --rules alone: just the section.
    assert main(["--rules", str(rules), "--out", "R2.md"]) == 0
    assert "## Exit rules side by side" in (tmp_path / "R2.md").read_text()
