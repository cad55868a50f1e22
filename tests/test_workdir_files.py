"""Files written in place in a workdir (the run lock, the metrics log) are never written through a
link the user placed there: a symlink or a hard link is refused in one line, its target unchanged."""

import os
import subprocess
import sys

import pytest

from deebert_jax.core import runtime
from deebert_jax.core.fileutil import OutputPathError
from tests.conftest import REPO


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_the_lock_is_never_written_through_a_link(tmp_path, link):
    mine = tmp_path / "mine.txt"
    mine.write_text("my thesis\n")
    work = tmp_path / "W"
    work.mkdir()
    (os.symlink if link == "symlink" else os.link)(mine, work / ".lock")
    with pytest.raises(OutputPathError, match=r"\.lock: is a (symbolic link|hard link)"):
        with runtime.workdir_lock(str(work)):
            pass
    assert mine.read_text() == "my thesis\n"


def test_a_lock_in_a_new_workdir_still_works_and_leaves_nothing(tmp_path):
    with runtime.workdir_lock(str(tmp_path / "new")):
        assert (tmp_path / "new" / ".lock").read_text().strip() == str(os.getpid())
    assert not (tmp_path / "new").exists()


def test_the_metrics_log_is_never_appended_through_a_symlink(tmp_path, monkeypatch):
    mine = tmp_path / "mine.jsonl"
    mine.write_text("{}\n")
    (tmp_path / "W").mkdir()
    os.symlink(mine, tmp_path / "W" / "metrics.jsonl")
    log = runtime.MetricsLog.__new__(runtime.MetricsLog)   # without TensorBoard: only the JSONL part
    log.active, log.path, log._tb = True, str(tmp_path / "W" / "metrics.jsonl"), None
    with pytest.raises(OutputPathError, match="metrics.jsonl: is a symbolic link"):
        log.write({"step": 1})
    assert mine.read_text() == "{}\n"


def test_train_refuses_a_symlinked_lock_in_one_line(tmp_path):
    mine = tmp_path / "mine.txt"
    mine.write_text("my thesis\n")
    (tmp_path / "W").mkdir()
    os.symlink(mine, tmp_path / "W" / ".lock")
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    env.pop("DEEBERT_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "train.train", "--config", str(REPO / "configs" / "tiny.py"),
                           "--config.workdir=W"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and lines[-1].startswith("error: ") and "W/.lock: is a symbolic link" in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and mine.read_text() == "my thesis\n"
