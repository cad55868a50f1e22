"""`train.compare_rules` and `research.rule_comparison`: numpy logits built to a purpose, and a
tiny random checkpoint on the synthetic task."""

import json
import math

import numpy as np
import pytest
from conftest import calibration_config

from deebert_jax.evaluation import calibration
from deebert_jax.data import glue as data
from deebert_jax.evaluation import sweep as evaluation
from research import rule_comparison
from train import compare_rules as compare_cli
from train.cli import run

CONFIG = calibration_config()   # wide initialisation: exits land on every layer
L, SEQ, N_DEV = CONFIG.num_hidden_layers, 16, 100
RULES = ["entropy", "max_prob", "patience"]


@pytest.fixture(scope="module")
def checkpoint(calibration_checkpoint):
    return calibration_checkpoint


@pytest.fixture(scope="module")
def dev_logits(checkpoint):
    dev = data.load_split("synthetic", "dev", max_seq_length=SEQ, vocab_size=CONFIG.vocab_size)
    return evaluation.all_ramp_logits(CONFIG, checkpoint[1], dev, 32), dev["labels"]


def confident_logits(final_pred, early_agree: bool):
    """[L, n, 2] logits, every ramp confident (gap 20): the last predicts `final_pred`, the earlier
    ones the same (`early_agree`) or the other label."""
    early = final_pred if early_agree else 1 - final_pred
    one_hot = lambda pred: np.eye(2, dtype=np.float32)[pred] * 20.0
    return np.stack([one_hot(early)] * (L - 1) + [one_hot(final_pred)])


def strict_json(text):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_held_out_statistics_come_from_the_held_out_examples():
    """Early ramps agree with the last on the calibration examples and contradict it on the held-out
    ones: the choice saves layers at no calibration cost, and the held-out drop shows the damage."""
    labels = np.random.default_rng(0).integers(0, 2, 40)
    cal = (confident_logits(labels[:20], True), labels[:20])
    held = (confident_logits(labels[20:], False), labels[20:])
    result = rule_comparison.compare_rules("sst2", cal, held, RULES, [1.0])
    assert [(e["rule"], e["budget"]) for e in result["entries"]] == [(r, 1.0) for r in RULES]
    for e in result["entries"]:
        assert not e["refused"] and e["calibration"]["drop"] == 0.0
        assert e["calibration"]["saving"] == pytest.approx(2 / 3)      # everything exits at ramp 1
        assert e["held_out"]["drop"] == pytest.approx(100.0) and e["held_out"]["metric"] == 0.0
        assert e["held_out"]["n"] == 20 and e["held_out"]["mean_exit_layer"] == 1.0
    assert (result["n_calibration"], result["n_held_out"]) == (20, 20)
    assert result["full_metric"] == {"calibration": 1.0, "held_out": 1.0}
    # The swapped halves: nothing saves layers within 0 points, and every rule says so.
    swapped = rule_comparison.compare_rules("sst2", held, cal, RULES, [0.0, 1.0])
    assert len(swapped["entries"]) == 6
    for e in swapped["entries"]:
        assert e["refused"] and e["threshold"] is None and e["held_out"] is None
        assert e["refusal"].startswith(f"no threshold saves layers within a drop of {e['budget']:g} points")
    # The curve is measured on the held-out half whatever the choice: on `cal` every early exit is free.
    for rule in RULES:
        curve = swapped["curves"][rule]
        assert [p["threshold"] for p in curve] == rule_comparison.curve_thresholds(rule, L, 2)
        assert (curve[0]["drop"], curve[0]["saving"]) == (0.0, 0.0)
        assert all(p["drop"] == 0.0 for p in curve) and curve[-1]["saving"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("rules, budgets, message", [
    (["entropy", "gpu"], [1.0], r"unknown exit rule\(s\) \['gpu'\]"),
    ([], [1.0], "no exit rule given"),
    (["entropy"], [0.5, -1.0], "budget -1 must be a number of points >= 0"),
    (["entropy"], [math.nan], "budget nan must be"),
    (["entropy"], [], "no budget given"),
])
def test_bad_rules_and_budgets_are_refused(rules, budgets, message):
    logits = confident_logits(np.array([0, 1]), True)
    with pytest.raises(ValueError, match=message):
        rule_comparison.compare_rules("sst2", (logits, np.array([0, 1])), (logits, np.array([0, 1])), rules, budgets)


def test_cli_compares_every_rule_and_budget_on_disjoint_halves(checkpoint, dev_logits, tmp_path, monkeypatch,
                                                               capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "rules" / "c.json"
    assert run(compare_cli.main, ["--checkpoint", str(checkpoint[0]), "--task", "synthetic", "--max-seq-length",
                                  str(SEQ), "--budgets", "0,20", "--out", str(out), "--plot", str(out.with_suffix(".png")),
                                  "--markdown", str(tmp_path / "c.md"), "--no-progress"]) == 0
    result = strict_json(out.read_text())
    assert [(e["rule"], e["budget"]) for e in result["entries"]] == [(r, b) for r in RULES for b in (0.0, 20.0)]
    assert result["command"].startswith("python -m train.compare_rules --checkpoint ")
    assert "--out rules/c.json --plot rules/c.png --markdown c.md" in result["command"]
    assert (result["task"], result["metric_name"], result["calibration_split"], result["seed"]) == \
        ("synthetic", "accuracy", "dev-half", 0)

    logits, labels = dev_logits
    cal_rows, held_rows = calibration.split_indices(N_DEV, 0)
    assert (result["n_calibration"], result["n_held_out"]) == (len(cal_rows), len(held_rows)) == (50, 50)
    assert not set(cal_rows) & set(held_rows)
    chosen = [e for e in result["entries"] if not e["refused"]]
    assert chosen and all(e["budget"] == 20.0 for e in chosen)
    for e in chosen:
        for part, rows in (("calibration", cal_rows), ("held_out", held_rows)):
            mine = calibration.threshold_stats("synthetic", logits[:, rows], labels[rows], e["threshold"], e["rule"])
            assert e[part] == pytest.approx({k: mine[k] for k in e[part]})
        assert e["calibration"]["drop"] <= 20 and e["calibration"]["saving"] > 0
    # The halves differ on this model: the held-out numbers are not the calibration ones again.
    assert any(e["held_out"]["drop"] != e["calibration"]["drop"] for e in chosen)
    # Budget 0: every early exit of this random model costs calibration accuracy.
    for e in result["entries"]:
        if e["budget"] == 0.0:
            assert e["refused"] and "no threshold saves layers within a drop of 0 points" in e["refusal"]

    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "c.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and line.split(" | ")[0][2:] in RULES]
    assert len(rows) == 6 and sum("| refused |" in r for r in rows) == 3
    assert "(rules/c.png)" in md and str(tmp_path) not in md
    assert capsys.readouterr().out.count("| refused |") == 3


def test_cli_checks_outputs_before_reading_the_model(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    args = ["--checkpoint", str(tmp_path / "nowhere"), "--task", "synthetic"]
    assert run(compare_cli.main, args + ["--out", str(tmp_path / "taken")]) == 1
    assert "is a directory" in capsys.readouterr().err
    assert run(compare_cli.main, args + ["--out", str(tmp_path / "a.json"), "--markdown", str(tmp_path / "a.json")]) == 1
    assert "--out and --markdown name the same file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
