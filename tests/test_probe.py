"""train.probe_ramps: one row per layer, accuracies that are real fractions of the dev set."""

import jax

from deebert_jax.model import modeling
from deebert_jax.weights.checkpoint import save_checkpoint
from deebert_jax.core.config import tiny_config
from train import probe_ramps


def test_probe_writes_one_row_per_layer(tmp_path, capsys):
    config = tiny_config(num_hidden_layers=3)
    save_checkpoint(tmp_path / "model", config, modeling.init_params(config, jax.random.PRNGKey(0)))
    out = tmp_path / "probe.md"
    assert probe_ramps.main(["--checkpoint", str(tmp_path / "model"), "--task", "synthetic", "--limit", "96",
                             "--max-seq-length", "16", "--epochs", "1", "--out", str(out)]) == 0
    rows = [l.split("|")[1:-1] for l in out.read_text().splitlines() if l.startswith("| ") and "layer" not in l]
    assert [r[0].strip() for r in rows] == ["1", "2", "3"]
    for r in rows:
        for cell in (r[2], r[4]):
            assert 0.0 <= float(cell) <= 100.0
        assert float(r[1]) > 0 and float(r[3]) > 0


def test_probe_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    assert probe_ramps.main(["--checkpoint", str(missing), "--task", "synthetic"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(missing) in err[0]
