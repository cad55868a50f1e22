"""deebert-jax: DeeBERT (dynamic early exiting for BERT) in JAX/Flax.

The library by layer (docs/architecture.md): `core`, `cpu`, `data`, `model`, `weights`,
`inference`, `training`, `evaluation`, `serving`, `commands`. The names below are its public API, importable
from here; each is loaded on first use, so `import deebert_jax` defines names and changes nothing
else (not even JAX's import runs). `setup_process` is the explicit opt-in to the process-wide
settings the command-line entry points use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Public name -> the module that defines it.
_PUBLIC = {
    "deebert_jax.core.config": ("ConfigError", "DeeBertConfig"),
    "deebert_jax.core.errors": ("DeeBertError", "NonFiniteLossError"),
    "deebert_jax.core.fileutil": ("OutputPathError",),
    "deebert_jax.cpu.process": ("setup_process",),
    "deebert_jax.data.glue": ("DataError", "load_split", "load_tokenizer", "num_labels"),
    "deebert_jax.data.batching": ("eval_batches",),
    "deebert_jax.data.validation": ("check_model_inputs",),
    "deebert_jax.model.modeling": ("DeeBert", "init_params"),
    "deebert_jax.model.layouts": ("stack_params", "unstack_params"),
    "deebert_jax.model.inference_step": ("layer_step",),
    "deebert_jax.weights.convert": ("convert_pytorch_checkpoint", "export_pytorch_checkpoint",
                                    "load_pytorch_checkpoint"),
    "deebert_jax.weights.torch_files": ("CheckpointError",),
    "deebert_jax.weights.checkpoint": ("load_checkpoint", "save_checkpoint"),
    "deebert_jax.inference.early_exit": ("ExitResult", "ExitState", "early_exit_predict", "early_exit_predict_pmap",
                                         "record_exits", "replicate_params"),
    "deebert_jax.inference.exit_aware": ("exit_aware_predict",),
    "deebert_jax.training.loop": ("train",),
    "deebert_jax.training.steps": ("TrainState",),
    "deebert_jax.inference.exit_policy": ("load_exit_policy",),
}
_WHERE = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'deebert_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value   # once: later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:   # for type checkers and IDEs: the same names, imported eagerly
    from deebert_jax.core.config import ConfigError, DeeBertConfig  # noqa: F401
    from deebert_jax.core.errors import DeeBertError, NonFiniteLossError  # noqa: F401
    from deebert_jax.core.fileutil import OutputPathError  # noqa: F401
    from deebert_jax.cpu.process import setup_process  # noqa: F401
    from deebert_jax.data.batching import eval_batches  # noqa: F401
    from deebert_jax.data.glue import DataError, load_split, load_tokenizer, num_labels  # noqa: F401
    from deebert_jax.data.validation import check_model_inputs  # noqa: F401
    from deebert_jax.inference.exit_policy import load_exit_policy  # noqa: F401
    from deebert_jax.inference.early_exit import (ExitResult, ExitState, early_exit_predict,  # noqa: F401
                                                  early_exit_predict_pmap, record_exits, replicate_params)
    from deebert_jax.inference.exit_aware import exit_aware_predict  # noqa: F401
    from deebert_jax.model.inference_step import layer_step  # noqa: F401
    from deebert_jax.model.layouts import stack_params, unstack_params  # noqa: F401
    from deebert_jax.model.modeling import DeeBert, init_params  # noqa: F401
    from deebert_jax.training.loop import train  # noqa: F401
    from deebert_jax.training.steps import TrainState  # noqa: F401
    from deebert_jax.weights.checkpoint import load_checkpoint, save_checkpoint  # noqa: F401
    from deebert_jax.weights.convert import (convert_pytorch_checkpoint, export_pytorch_checkpoint,  # noqa: F401
                                             load_pytorch_checkpoint)
    from deebert_jax.weights.torch_files import CheckpointError  # noqa: F401
