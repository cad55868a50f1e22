"""deebert-jax: DeeBERT (dynamic early exiting for BERT) in JAX/Flax."""

# Before anything below imports JAX (whose import starts a thread): glibc's malloc settings hold
# only for threads that have not allocated yet. Opt-in (DEEBERT_KEEP_FREED_MEMORY=1, which the
# command-line entry points set): it changes the whole process's malloc.
from deebert_jax.cpu import memory as _cpu_memory

if _cpu_memory.requested_at_import():
    _cpu_memory.keep_freed_memory()

from deebert_jax.core.config import ConfigError, DeeBertConfig
from deebert_jax.model.modeling import DeeBert, init_params, layer_step, stack_params, unstack_params
from deebert_jax.weights.convert import (CheckpointError, convert_pytorch_checkpoint, export_pytorch_checkpoint,
                                 load_pytorch_checkpoint)
from deebert_jax.weights.checkpoint import load_checkpoint, save_checkpoint
from deebert_jax.inference.early_exit import (ExitResult, ExitState, early_exit_predict, early_exit_predict_pmap,
                                    record_exits, replicate_params)
from deebert_jax.inference.exit_aware import exit_aware_predict
from deebert_jax.data.glue import DataError, eval_batches, load_split, load_tokenizer, num_labels
from deebert_jax.core.fileutil import OutputPathError
from deebert_jax.training.loop import NonFiniteLossError, TrainState, train
from deebert_jax.data.validation import check_model_inputs
from deebert_jax.evaluation.calibration import load_exit_policy

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "DeeBert", "DeeBertConfig", "ExitResult", "ExitState",
    "NonFiniteLossError", "OutputPathError", "TrainState", "check_model_inputs", "convert_pytorch_checkpoint",
    "early_exit_predict", "early_exit_predict_pmap", "eval_batches", "exit_aware_predict", "export_pytorch_checkpoint",
    "init_params", "layer_step", "load_checkpoint", "load_exit_policy", "load_pytorch_checkpoint", "load_split",
    "load_tokenizer", "num_labels", "record_exits", "replicate_params", "save_checkpoint", "stack_params", "train",
    "unstack_params",
]
