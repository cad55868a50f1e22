"""Orbax checkpoints: a model (arrays via orbax, the config as JSON beside them), and training states."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from deebert_jax.config import DeeBertConfig
from deebert_jax.fileutil import atomic_directory

CONFIG_FILE = "deebert_config.json"
PARAMS_DIR = "params"


def save_checkpoint(directory: str | os.PathLike, config: DeeBertConfig, params: Any,
                    *, write_extra: Callable[[str], None] | None = None) -> str:
    """Writes `directory/{params/, deebert_config.json}`; replaces an old one only once complete.

    `write_extra(tmp_dir)` may add files (a tokenizer) that then appear in the same rename.
    """
    directory = os.path.abspath(os.fspath(directory))
    params = jax.tree_util.tree_map(np.asarray, jax.device_get(params))
    with atomic_directory(directory) as tmp:
        # Only the calling host writes (multi-host training calls this from process 0 alone).
        with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
            ckptr.wait_until_finished()
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config.to_dict(), f, indent=2, sort_keys=True)
        if write_extra is not None:
            write_extra(tmp)
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


def _this_process_only() -> ocp.options.MultiprocessingOptions:
    """Orbax options for a write that only the calling host makes (no cross-host barriers)."""
    index = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=index, active_processes={index})


class TrainCheckpointManager:
    """Keep-last-k checkpoints of a training state under `directory/<step>/`.

    Orbax writes each step into a temporary directory and renames it when complete, so a run
    killed mid-save leaves the previous steps readable and `latest_step` never names a partial
    one. Every host calls `save`/`restore` (orbax writes once, from the primary host).
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=max(1, int(max_to_keep)), create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Writes `state` (a pytree; device arrays are fetched to host) as `step`, then prunes old steps."""
        state = jax.tree_util.tree_map(np.asarray, jax.device_get(state))
        self._manager.save(int(step), args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, like: Any) -> Any:
        """The state saved at `step`, with the tree structure, shapes and dtypes of `like`."""
        target = jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), jax.device_get(like))
        try:
            restored = self._manager.restore(int(step), args=ocp.args.StandardRestore(target))
        except (ValueError, KeyError) as e:
            raise ValueError(f"{self.directory}/{step}: checkpoint does not match this run's state ({e})") from e
        return jax.tree_util.tree_map(np.asarray, restored)

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
