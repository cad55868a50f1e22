"""Every command checks every output path it writes (its derived .md / .png too) against every
input, through one shared check (`fileutil.check_outputs`), before any model is read.

The command list is not typed by hand alone: every module of deebert_jax/commands,
benchmarks/commands and research/commands with an output flag must have a case here, so a new
command (or a new output flag) without one fails `test_every_command_with_an_output_has_a_case`.
"""

import importlib
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, WORDS, snapshot

OUTPUT_FLAG = re.compile(r"""add_argument\(\s*["'](--out|--plot|--plots|--markdown)["']|DEFINE_string\(\s*"out"|"""
                         r"""config\.workdir|cfg\.workdir""")
COMMAND_DIRS = ("deebert_jax/commands", "benchmarks/commands", "research/commands")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """M: a tiny model directory (3 layers, a WordPiece tokenizer); G: a GLUE folder (SST-2 train
    and dev); src: a PyTorch-looking source; workdirs/demo: a finished demo run."""
    from transformers import BertTokenizerFast

    from deebert_jax.core.config import tiny_config
    from deebert_jax.weights.checkpoint import save_checkpoint
    from tests.conftest import initial_params
    root = tmp_path_factory.mktemp("outputs")
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)})
    config = tiny_config(vocab_size=len(WORDS), num_hidden_layers=3)
    save_checkpoint(root / "M", config, initial_params(config),
                    write_extra=lambda tmp: tok.save_pretrained(os.path.join(tmp, "tokenizer")))
    (root / "G" / "SST-2").mkdir(parents=True)
    for split in ("train", "dev"):
        (root / "G" / "SST-2" / f"{split}.tsv").write_text("sentence\tlabel\nthe movie was good\t1\na bad film\t0\n")
    (root / "src").mkdir()
    (root / "src" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (root / "busy.png").mkdir()   # a derived plot path that is a directory
    (root / "busy.md").mkdir()
    return root


M_CONFIG = "M/deebert_config.json"
M_WEIGHTS = "M/params/_METADATA"
DEV = "G/SST-2/dev.tsv"

# module -> [(argv, what the one line must say)]: onto the model, onto the data, a derived sibling.
CASES = {
    "train.calibrate": [
        (["--checkpoint", "M", "--task", "sst2", "--glue-dir", "G", "--max-drop", "1", "--out", M_CONFIG],
         "would overwrite deebert_config.json of --checkpoint M"),
        (["--checkpoint", "M", "--task", "sst2", "--glue-dir", "G", "--max-drop", "1", "--out", DEV],
         "names the same file as --glue-dir (dev)")],
    "train.convert": [(["--pytorch", "src", "--out", "src/converted", "--overwrite"], "inside the source")],
    "train.evaluate": [
        (["--checkpoint", "M", "--task", "sst2", "--glue-dir", "G", "--out", M_WEIGHTS], "would overwrite params"),
        (["--checkpoint", "M", "--task", "sst2", "--glue-dir", "G", "--out", DEV], "names the same file as --glue-dir"),
        (["--checkpoint", "M", "--task", "sst2", "--glue-dir", "G", "--out", "busy.json"], "busy.png: is a directory")],
    "train.predict": [(["--checkpoint", "M", "--text", "good", "--out", M_CONFIG], "would overwrite deebert_config")],
    "train.benchmark": [
        (["--checkpoint", "M", "--runs", "1", "--out", M_CONFIG], "would overwrite deebert_config"),
        (["--checkpoint", "M", "--runs", "1", "--task", "sst2", "--glue-dir", "G", "--out", DEV], "names the same file"),
        (["--checkpoint", "M", "--runs", "1", "--out", "busy.json"], "busy.md: is a directory")],
    "train.benchmark_exit_aware": [(["--checkpoint", "M", "--out", M_WEIGHTS], "would overwrite params")],
    "train.benchmark_serve": [
        (["--checkpoint", "M", "--glue-dir", "G", "--out", M_CONFIG], "would overwrite deebert_config.json"),
        (["--checkpoint", "M", "--glue-dir", "G", "--out", DEV], "names the same file as --glue-dir (dev)"),
        (["--checkpoint", "M", "--glue-dir", "G", "--out", "busy.json"], "busy.md: is a directory")],
    "train.benchmark_train": [(["--model", "M", "--out", M_CONFIG], "would overwrite deebert_config")],
    "train.profile_step": [(["--out", "busy.png"], "busy.png: is a directory")],
    "train.profile_predict": [(["--checkpoint", "M", "--out", M_CONFIG], "would overwrite deebert_config")],
    "train.benchmark_engine_step": [(["--steps", "1", "--out", "busy.png"], "busy.png: is a directory")],
    "train.calibration_draws": [
        (["--checkpoint", "M", "--task", "sst2", "--glue-dir", "G", "--max-drop", "1", "--out", M_CONFIG],
         "would overwrite deebert_config.json of --checkpoint M"),
        (["--checkpoint", "M", "--task", "sst2", "--glue-dir", "G", "--max-drop", "1", "--out", M_WEIGHTS],
         "would overwrite params"),
        (["--checkpoint", "M", "--task", "sst2", "--glue-dir", "G", "--max-drop", "1", "--out", DEV],
         "names the same file as --glue-dir (dev)")],
    "train.compare_rules": [
        (["--checkpoint", "M", "--task", "sst2", "--glue-dir", "G", "--out", "c.json", "--plot", M_CONFIG],
         "--plot would overwrite deebert_config"),
        (["--checkpoint", "M", "--task", "sst2", "--glue-dir", "G", "--out", "c.json", "--markdown", DEV],
         "--markdown names the same file")],
    "train.probe_ramps": [(["--checkpoint", "M", "--task", "sst2", "--glue-dir", "G", "--out", DEV],
                           "names the same file as --glue-dir")],
    "train.report": [(["workdirs/demo", "--out", "workdirs/demo/results.json"], "names the same file as run"),
                     (["workdirs/demo", "--out", "R.md", "--plots", DEV], "dev.tsv is a file, not a directory")],
    "train.benchmark_drift": [(["--checkpoint", "M", "--glue-dir", "G", "--out", M_CONFIG], "would overwrite deebert_config"),
                              (["--checkpoint", "M", "--glue-dir", "G", "--out", "busy.json"], "busy.md: is a directory")],
    "train.monitoring_coverage": [(["--streams", "2", "--rows", "10", "--out", "busy.png"], "busy.png: is a directory")],
    # Commands that set up the process (the TPU compiler, the demo's steps): run as a user runs them
    "train.plan": [(["--config", str(REPO / "configs" / "tiny.py"), "--config.init_checkpoint=M",
                     "--topology", "v5e:2x4", "--out", M_CONFIG], "would overwrite . of config.init_checkpoint")],
    "train.demo": [(["--config", str(REPO / "configs" / "demo.py"), "--config.glue_dir=G", "--config.init_checkpoint=M",
                     "--config.workdir=M"], "would overwrite . of --config.init_checkpoint M")],
}
SUBPROCESS = {"train.plan", "train.demo"}


def _module_of(command: str) -> str:
    """train.NAME -> the file it stands in for."""
    for d in COMMAND_DIRS:
        path = REPO / d / f"{command.split('.', 1)[1]}.py"
        if path.is_file():
            return str(path.relative_to(REPO))
    raise AssertionError(f"{command}: no module in {COMMAND_DIRS}")


def test_every_command_with_an_output_has_a_case():
    writers = set()
    for d in COMMAND_DIRS:
        for path in sorted((REPO / d).glob("*.py")):
            if OUTPUT_FLAG.search(path.read_text()):
                writers.add(str(path.relative_to(REPO)))
    # train.train writes its workdir (test_runtime's lock tests cover it); plan_flags defines the
    # --out of train.plan (and of train.train --dry-run, the same dry run).
    writers -= {"deebert_jax/commands/train.py"}
    if "deebert_jax/commands/plan_flags.py" in writers:
        writers = (writers - {"deebert_jax/commands/plan_flags.py"}) | {"deebert_jax/commands/plan.py"}
    assert writers == {_module_of(c) for c in CASES}, "a command writes an output this test does not check"


def _no_model_loading(monkeypatch):
    """The refusal comes before any model is read: reading one fails the test."""
    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the outputs were checked")
    import benchmarks.serving
    import deebert_jax.inference.model_dir as model_dir
    import deebert_jax.weights.checkpoint as checkpoint
    import deebert_jax.weights.model_loading as model_loading
    for module, name in ((checkpoint, "load_checkpoint"), (model_loading, "load_checkpoint"),
                         (model_loading, "load_model_for_task"), (model_dir, "open_model_dir"),
                         (benchmarks.serving, "run")):
        monkeypatch.setattr(module, name, loaded)


CASE_LIST = [(c, argv, msg) for c, cases in CASES.items() for argv, msg in cases]


@pytest.mark.parametrize("command, argv, message", CASE_LIST, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASE_LIST)])
def test_an_output_onto_an_input_is_refused_before_any_work(base, tmp_path, monkeypatch, capfd, command, argv, message):
    import shutil

    from tests.test_report import _run_files

    for name in os.listdir(base):
        if name != "workdirs":   # run.json names its files by absolute path: made here, not copied
            (shutil.copytree if (base / name).is_dir() else shutil.copy)(base / name, tmp_path / name)
    _run_files(tmp_path)
    before, entries = snapshot(tmp_path), sorted(os.listdir(tmp_path))
    monkeypatch.chdir(tmp_path)
    if command in SUBPROCESS:
        env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
        env.pop("DEEBERT_DEBUG", None)
        proc = subprocess.run([sys.executable, "-m", command, *argv], env=env, capture_output=True, text=True,
                              timeout=300)
        rc, err = proc.returncode, proc.stderr
    else:
        _no_model_loading(monkeypatch)
        monkeypatch.delenv("DEEBERT_DEBUG", raising=False)
        rc = importlib.import_module(command).entry(argv)
        err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("max sequence length")]
    assert rc == 1, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err[-2000:]
    assert snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == entries


def test_check_outputs_covers_siblings_duplicates_and_directories(tmp_path):
    from deebert_jax.core.fileutil import OutputPathError, check_outputs, with_siblings

    (tmp_path / "model" / "params").mkdir(parents=True)
    (tmp_path / "model" / "deebert_config.json").write_text("{}")
    assert with_siblings("--out", "a/b.json", plot=".png") == {"--out": "a/b.json", "--out's plot": "a/b.png"}
    with pytest.raises(OutputPathError, match="--out's plot would overwrite params"):
        check_outputs(with_siblings("--out", tmp_path / "model" / "params.json", plot="/x.png"),
                      {"--checkpoint": tmp_path / "model"}, reads={"--checkpoint": ["params"]})
    with pytest.raises(OutputPathError, match="--out and --plot name the same file"):
        check_outputs({"--out": tmp_path / "a.json", "--plot": tmp_path / "a.json"})
    with pytest.raises(OutputPathError, match="would replace --init .* which is inside it"):
        check_outputs({}, {"--init": tmp_path / "model"}, directories={"workdir": tmp_path})
    assert check_outputs({"--out": "r.json", "--plot": None}) == {"--out": os.path.abspath("r.json")}
    assert pathlib.Path(tmp_path / "model" / "deebert_config.json").read_text() == "{}"
