"""Orbax checkpoints of a model: arrays via orbax, the config as JSON beside them."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from deebert_jax.config import DeeBertConfig
from deebert_jax.fileutil import atomic_directory

CONFIG_FILE = "deebert_config.json"
PARAMS_DIR = "params"


def save_checkpoint(directory: str | os.PathLike, config: DeeBertConfig, params: Any) -> str:
    """Writes `directory/{params/, deebert_config.json}`; replaces an old one only once complete."""
    directory = os.path.abspath(os.fspath(directory))
    params = jax.tree_util.tree_map(np.asarray, jax.device_get(params))
    with atomic_directory(directory) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
            ckptr.wait_until_finished()
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config.to_dict(), f, indent=2, sort_keys=True)
    return directory


def load_checkpoint(directory: str | os.PathLike) -> tuple[DeeBertConfig, Any]:
    """-> (config, params as numpy arrays)."""
    directory = os.path.abspath(os.fspath(directory))
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory}: not a deebert-jax checkpoint (no {CONFIG_FILE})")
    with open(config_path, encoding="utf-8") as f:
        config = DeeBertConfig.from_dict(json.load(f))
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(directory, PARAMS_DIR))
    return config, jax.tree_util.tree_map(np.asarray, params)
