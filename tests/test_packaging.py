"""What installs: the wheel holds the library alone (no `train`, `configs`, `benchmarks`,
`research` or `tests` at its top level), its console scripts, and the extras; the import
contracts in pyproject.toml (import-linter) hold."""

import os
import pathlib
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMANDS = ("convert", "train", "evaluate", "calibrate", "predict", "serve", "plan")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the checkout without what a build leaves behind (setuptools builds in the source
    # tree, and a stale build/ could hand old files to the wheel).
    source = out / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "workdirs",
                                                                "__pycache__", ".pytest_cache"))
    # Offline and from the venv's setuptools: no build isolation, no dependencies fetched.
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(out), str(source)], capture_output=True, text=True,
                          timeout=300, cwd=out, env=dict(os.environ, PIP_NO_INPUT="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("deebert_jax-*.whl")
    return path


def test_the_wheel_installs_the_library_alone(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith((".dist-info", ".data"))}
    assert top == {"deebert_jax"}, top
    # Measured results stay in the checkout (benchmarks/results/, research/results/, docs/tpu/).
    data = [n for n in names if n.startswith("deebert_jax/") and n.endswith((".json", ".png", ".md"))]
    assert data == [], data
    for command in COMMANDS:
        assert f"deebert_jax/commands/{command}.py" in names
    # The training configs travel with it, so `deebert-train --config` has files to name.
    assert "deebert_jax/configs/tiny.py" in names and "deebert_jax/configs/glue.py" in names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for command in COMMANDS:
        assert f"deebert-{command} = deebert_jax.commands.{command}:entry" in text


def test_pyproject_lists_the_installed_codes_imports():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert {"serve", "torch", "bench", "hub", "minilm", "test", "tpu", "plot"} <= set(extras)
    assert extras["tpu"] == ["libtpu==0.0.42.1"]   # jax 0.10.2's own tpu extra pins libtpu==0.0.42.*
    hard = " ".join(project["dependencies"])
    assert "matplotlib" not in hard and "torch" not in hard and "uvicorn" not in hard
    for name in ("starlette", "uvicorn", "prometheus_client"):
        assert any(req.startswith(name) for req in extras["serve"])
    assert "import-linter==2.16" in extras["test"]


def test_imports_only_go_down():
    """The layers and the product-apart contracts in pyproject.toml ([tool.importlinter])."""
    lint = pathlib.Path(sys.executable).with_name("lint-imports")   # requirements.txt and the test extra pin it
    assert lint.exists(), "import-linter is missing: pip install import-linter==2.16"
    proc = subprocess.run([str(lint), "--no-cache", "--no-logo"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
