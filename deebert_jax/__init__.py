"""deebert-jax: DeeBERT (dynamic early exiting for BERT) in JAX/Flax."""

from deebert_jax.config import ConfigError, DeeBertConfig
from deebert_jax.modeling import DeeBert, init_params, stack_params, unstack_params
from deebert_jax.convert import (CheckpointError, convert_pytorch_checkpoint, export_pytorch_checkpoint,
                                 load_pytorch_checkpoint)
from deebert_jax.checkpoint import load_checkpoint, save_checkpoint
from deebert_jax.early_exit import ExitResult, early_exit_predict, early_exit_predict_pmap, replicate_params
from deebert_jax.exit_aware import exit_aware_predict
from deebert_jax.data import DataError, eval_batches, load_split, load_tokenizer, num_labels
from deebert_jax.training import NonFiniteLossError, TrainState, train

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "DeeBert", "DeeBertConfig", "ExitResult", "NonFiniteLossError",
    "TrainState", "convert_pytorch_checkpoint", "early_exit_predict", "early_exit_predict_pmap", "eval_batches",
    "exit_aware_predict", "export_pytorch_checkpoint", "init_params", "load_checkpoint", "load_pytorch_checkpoint",
    "load_split", "load_tokenizer", "num_labels", "replicate_params", "save_checkpoint", "stack_params", "train",
    "unstack_params",
]
