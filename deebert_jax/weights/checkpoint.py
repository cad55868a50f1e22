"""Orbax checkpoints: a model (arrays via orbax, the config as JSON beside them), and training states."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp

from deebert_jax.core.errors import InputError
from deebert_jax.core.config import ConfigError, DeeBertConfig, read_json_object
from deebert_jax.data.glue import TOKENIZER_READ_FILES
from deebert_jax.weights.torch_files import WEIGHT_FILES, CheckpointError
from deebert_jax.core.fileutil import atomic_directory, storage_errors
from deebert_jax.model.modeling import init_params

CONFIG_FILE = "deebert_config.json"
PARAMS_DIR = "params"
LABELS_FILE = "labels.json"   # {"id2label": {"0": name, ...}}: optional, older directories lack it
# {"max_seq_length": S}: the length the model was trained at (`write_training_info`); optional.
TRAINING_FILE = "training.json"
# What commands read from a model directory, ours or a PyTorch one (the tokenizer's files may sit
# at the top): no output of a command that reads the directory may be written there
# (`fileutil.check_outputs_apart`). "exit_policy.json" is `calibration.POLICY_FILE`.
MODEL_DIR_FILES = (CONFIG_FILE, PARAMS_DIR, LABELS_FILE, TRAINING_FILE, "exit_policy.json", "tokenizer",
                   "config.json", *WEIGHT_FILES, *TOKENIZER_READ_FILES)

log = logging.getLogger(__name__)


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files are truncated or missing; the message names its directory."""


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """Whether `path` holds a model directory written by `save_checkpoint` (it may be replaced)."""
    return os.path.isfile(os.path.join(os.fspath(path), CONFIG_FILE))


def save_checkpoint(directory: str | os.PathLike, config: DeeBertConfig, params: Any,
                    *, write_extra: Callable[[str], None] | None = None, overwrite: bool = False,
                    sources: Iterable[str | os.PathLike] = ()) -> str:
    """Writes `directory/{params/, deebert_config.json}`; replaces an old one only once complete.

    `write_extra(tmp_dir)` may add files (a tokenizer) that then appear in the same rename. An
    existing `directory` is replaced only if it is empty or a previous `save_checkpoint` output,
    or with `overwrite=True`; one equal to, inside or containing a `sources` path never is
    (`fileutil.check_output_path`).
    """
    directory = os.path.abspath(os.fspath(directory))
    params = jax.tree_util.tree_map(np.asarray, jax.device_get(params))
    made = []
    try:
        with storage_errors(directory, "writing the model; nothing was replaced"), \
                atomic_directory(directory, is_ours=is_checkpoint_dir, overwrite=overwrite, sources=sources) as tmp:
            made.append(tmp)
            # Only the calling host writes (multi-host training calls this from process 0 alone).
            with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as ckptr:
                ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
                ckptr.wait_until_finished()
            with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
                json.dump(config.to_dict(), f, indent=2, sort_keys=True)
            if write_extra is not None:
                write_extra(tmp)
    except BaseException:
        _remove_late_directories(made)
        raise
    return directory


def _remove_late_directories(paths, seconds: float = 1.0) -> None:
    """After a failed save: orbax's background threads may still make folders in the temporary
    directory `atomic_directory` has just removed; they are removed too, so nothing is left."""
    import shutil
    import time
    deadline = time.monotonic() + seconds
    while True:
        for path in paths:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
        if time.monotonic() > deadline:
            return
        time.sleep(0.1)


def model_fingerprint(config: DeeBertConfig, params: Any) -> str:
    """A short hash of the config and every parameter's path, dtype, shape and bytes: what an
    `exit_policy.json` records so that it is never used with other weights (16 hex digits)."""
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(jax.device_get(params)),
                             key=lambda item: jax.tree_util.keystr(item[0])):
        leaf = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype.str}:{leaf.shape}".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()[:16]


def write_label_names(directory: str | os.PathLike, names) -> str:
    """Writes `directory/labels.json` ({"id2label": {"0": names[0], ...}}) -> its path."""
    path = os.path.join(os.fspath(directory), LABELS_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"id2label": {str(i): str(n) for i, n in enumerate(names)}}, f, indent=2)
    return path


def write_training_info(directory: str | os.PathLike, max_seq_length: int,
                        ramp_temperatures: dict | None = None, train_rows: int | None = None) -> str:
    """Writes `directory/training.json` ({"max_seq_length": S}, the length the model was trained
    at, and `ramp_temperatures` when the off-ramp classifiers were divided by fitted temperatures:
    {"temperatures": [L], "rows": first N held-out rows that fitted them, "holdout": of how many},
    and `train_rows`: training used the first N rows of the task's train split) -> its path. Called from a `save_checkpoint` `write_extra`, it lands in the same rename;
    `predict` and `serve` then default `--max-seq-length` to S."""
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, (int, np.integer)) or max_seq_length < 1:
        raise InputError(f"max_seq_length={max_seq_length!r} must be a positive integer")
    path = os.path.join(os.fspath(directory), TRAINING_FILE)
    info = {"max_seq_length": int(max_seq_length)}
    if ramp_temperatures is not None:
        info["ramp_temperatures"] = ramp_temperatures
    if train_rows is not None:
        info["train_rows"] = int(train_rows)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    return path


def _training_info(directory: str | os.PathLike, field: str):
    """-> (training.json's path, its `field` or None); (None, None) when there is no such file."""
    path = os.path.join(os.fspath(directory), TRAINING_FILE)
    if not os.path.isfile(path):
        return None, None
    try:
        return path, read_json_object(path).get(field)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def training_length(directory: str | os.PathLike) -> int | None:
    """The length `directory`'s model was trained at (`training.json`), or None when not recorded;
    a file that is not `{"max_seq_length": positive int}` is a `CheckpointError` naming it."""
    path, value = _training_info(directory, "max_seq_length")
    if path is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{path}: max_seq_length={value!r} must be a positive integer")
    return value


def training_rows(directory: str | os.PathLike) -> int | None:
    """How many rows, from the start of the train split, `directory`'s model was trained on
    (`training.json`'s `train_rows`), or None when not recorded (a model trained before it was)."""
    path, value = _training_info(directory, "train_rows")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"{path}: train_rows={value!r} must be a non-negative integer")
    return value


def ramp_temperature_record(directory: str | os.PathLike) -> dict | None:
    """`training.json`'s `ramp_temperatures` (see `write_training_info`), or None when the
    off-ramps of `directory`'s model were not rescaled."""
    path, record = _training_info(directory, "ramp_temperatures")
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1
    if record is not None and not (isinstance(record, dict) and ok(record.get("rows")) and ok(record.get("holdout"))):
        raise CheckpointError(f"{path}: ramp_temperatures={json.dumps(record)} must be an object with integer "
                              "'rows' and 'holdout'")
    return record


# What a leaf's shape says about a config field, checked first so the message names the field:
# (leaf path, axis, field, what the axis counts).
_SHAPE_FIELDS = (
    ("layers/query/kernel", 0, "num_hidden_layers", "layers"),
    ("embeddings/word_embeddings/embedding", 0, "vocab_size", "token embeddings"),
    ("embeddings/word_embeddings/embedding", 1, "hidden_size", "columns per embedding"),
    ("ramps/classifier/kernel", -1, "num_labels", "labels"),
    ("embeddings/position_embeddings/embedding", 0, "max_position_embeddings", "positions"),
    ("embeddings/token_type_embeddings/embedding", 0, "type_vocab_size", "token types"),
    ("layers/intermediate/kernel", -1, "intermediate_size", "intermediate units"),
)


def check_params_match(config: DeeBertConfig, params: Any, source: str) -> None:
    """A `CheckpointError` naming `source` and the config field when `params` do not have the
    shapes `config` implies (more layers, another vocabulary, width or label count...)."""
    saved = _leaf_shapes(params)
    for leaf, axis, field, what in _SHAPE_FIELDS:
        shape = saved.get(leaf)
        if shape is not None and len(shape) > abs(axis) - (axis < 0) and shape[axis] != getattr(config, field):
            raise CheckpointError(f"{source}: {field}={getattr(config, field)}, but {PARAMS_DIR}/ holds "
                                  f"{shape[axis]} {what} ({leaf} has shape {shape}); the config and the "
                                  "weights are not of one model")
    wanted = _leaf_shapes(jax.eval_shape(functools.partial(init_params, config), jax.random.PRNGKey(0)))
    difference = _first_difference({k: v for k, v in saved.items()}, wanted)
    if difference:
        difference = difference.replace("in the checkpoint", f"in {PARAMS_DIR}/").replace(
            "in this run's state", "in what the config implies").replace("in this run", "for the config")
        raise CheckpointError(f"{source}: the config and the weights are not of one model ({difference})")


def read_model_config(directory: str | os.PathLike) -> DeeBertConfig:
    """The config of a model directory, without its weights (errors as `load_checkpoint`'s)."""
    directory = os.path.abspath(os.fspath(directory))
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory}: not a deebert-jax checkpoint (no {CONFIG_FILE})")
    try:
        raw = read_json_object(config_path)
    except ConfigError as e:
        raise DamagedCheckpointError(f"{e} (damaged checkpoint)") from e
    return DeeBertConfig.from_dict(raw, source=config_path)


def load_checkpoint(directory: str | os.PathLike) -> tuple[DeeBertConfig, Any]:
    """-> (config, params as numpy arrays); a damaged directory is one `CheckpointError` naming it."""
    directory = os.path.abspath(os.fspath(directory))
    config_path = os.path.join(directory, CONFIG_FILE)
    config = read_model_config(directory)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(os.path.join(directory, PARAMS_DIR))
    except Exception as e:  # orbax/tensorstore raise many types for missing or truncated files
        raise DamagedCheckpointError(f"{directory}: damaged checkpoint, cannot read {PARAMS_DIR}/ "
                                     f"({_first_line(e)})") from e
    check_params_match(config, params, config_path)
    return config, jax.tree_util.tree_map(np.asarray, params)


def _this_process_only() -> ocp.options.MultiprocessingOptions:
    """Orbax options for a write that only the calling host makes (no cross-host barriers)."""
    index = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=index, active_processes={index})


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"{type(e).__name__}: {text[:limit]}"


def _key_name(key) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaf_shapes(tree: Any) -> dict[str, tuple]:
    """{'params/layers/query/kernel': shape} for every leaf (arrays, scalars or orbax metadata)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {"/".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", np.shape(leaf)))
            for path, leaf in leaves}


def _first_difference(saved: dict[str, tuple], wanted: dict[str, tuple]) -> str | None:
    for name in sorted(set(saved) | set(wanted)):
        if name not in saved:
            return f"{name} is not in the checkpoint"
        if name not in wanted:
            return f"{name} is in the checkpoint but not in this run's state"
        if saved[name] != wanted[name]:
            return f"{name} has shape {saved[name]} in the checkpoint, {wanted[name]} in this run"
    return None


class TrainCheckpointManager:
    """Keep-last-k checkpoints of a training state under `directory/<step>/`.

    Orbax writes each step into a temporary directory and renames it when complete, so a run
    killed mid-save leaves the previous steps readable and `latest_step` never names a partial
    one. A step damaged later (a file truncated or deleted) is found by `restore_latest`, which
    moves it aside and falls back to the newest intact step. Every host calls
    `save`/`restore`/`restore_latest` (orbax writes once, from the primary host).
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=max(1, int(max_to_keep)), create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=ocp.StandardCheckpointHandler())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Writes `state` (a pytree; device arrays are fetched to host) as `step`, then prunes old steps."""
        state = jax.tree_util.tree_map(np.asarray, jax.device_get(state))
        with storage_errors(self.directory, f"saving step {int(step)}"):
            self._manager.save(int(step), args=ocp.args.StandardSave(state), force=True)
            self._manager.wait_until_finished()

    def restore(self, step: int, like: Any) -> Any:
        """The state saved at `step`, with the tree structure, shapes and dtypes of `like`.

        A checkpoint of a different state (other leaves or shapes) is a ValueError saying it
        "does not match this run's state"; unreadable files are a `DamagedCheckpointError`.
        """
        where = os.path.join(self.directory, str(step))
        like = jax.device_get(like)
        wanted = _leaf_shapes(like)
        target = jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), like)
        try:
            restored = self._manager.restore(int(step), args=ocp.args.StandardRestore(target))
        except Exception as e:  # a mismatch and a damaged file both surface as assorted errors
            difference = self._difference(step, wanted)
            if difference:
                raise InputError(f"{where}: checkpoint does not match this run's state ({difference})") from e
            raise DamagedCheckpointError(f"{where}: damaged checkpoint ({_first_line(e)})") from e
        restored = jax.tree_util.tree_map(np.asarray, restored)
        # Orbax restores the saved shapes even where `like` has others: that is a mismatch too.
        difference = _first_difference(_leaf_shapes(restored), wanted)
        if difference:
            raise InputError(f"{where}: checkpoint does not match this run's state ({difference})")
        return restored

    def _difference(self, step: int, wanted: dict[str, tuple]) -> str | None:
        """How the saved tree differs from `wanted`; None if it matches or its metadata is unreadable."""
        try:
            metadata = self._manager.item_metadata(int(step))
        except Exception:  # unreadable metadata: the step is damaged, not a different run's
            return None
        tree = getattr(metadata, "tree", metadata)
        if tree is None:
            return None
        return _first_difference(_leaf_shapes(tree), wanted)

    def restore_latest(self, like: Any) -> tuple[int | None, Any]:
        """-> (step, state) of the newest intact step, or (None, None) when there is none saved.

        Damaged steps (files truncated or missing) are logged as warnings, moved aside to
        `<step>.damaged` (so the run can save that step again) and skipped; a checkpoint that does
        not match `like` is the same ValueError as `restore`; all steps damaged is a
        `DamagedCheckpointError`.
        """
        damaged = []
        for step in reversed(self.all_steps()):
            try:
                state = self.restore(step, like)
            except DamagedCheckpointError as e:
                log.warning("%s; falling back to the previous checkpoint", e)
                damaged.append(step)
                continue
            self._set_aside(damaged)
            return step, state
        if damaged:
            raise DamagedCheckpointError(f"{self.directory}: every checkpoint is damaged (steps "
                                         f"{', '.join(map(str, damaged))}); move the directory away to start over")
        return None, None

    def _set_aside(self, steps: list[int]) -> None:
        """Renames damaged step directories to `<step>.damaged[.n]`, which orbax ignores (host 0 only)."""
        if steps and jax.process_index() == 0:
            for step in steps:
                src = os.path.join(self.directory, str(step))
                dst, n = f"{src}.damaged", 1
                while os.path.lexists(dst):
                    dst, n = f"{src}.damaged.{n}", n + 1
                os.replace(src, dst)
                log.warning("moved the damaged checkpoint %s to %s", src, dst)
        self._manager.reload()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
