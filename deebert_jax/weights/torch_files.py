"""Reading a PyTorch model directory's files: its weights (safetensors, or a `.bin` loaded with
`weights_only`, so nothing in it runs), found locally or fetched from the hub."""

from __future__ import annotations

import os
import pickle
import re
import warnings
from typing import Mapping

import numpy as np

from deebert_jax.core.errors import DeeBertError
from deebert_jax.core.optional import MissingDependencyError, require

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(DeeBertError, ValueError):
    """A checkpoint we cannot load faithfully; the message names the file or key at fault."""


def find_weights_file(directory: str) -> str:
    for name in WEIGHT_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise CheckpointError(f"{directory}: no {' or '.join(WEIGHT_FILES)} in this directory")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a safetensors or `.bin` file into numpy arrays without executing code from it."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file
            return dict(load_file(path))
        torch = require("torch", "torch", f"reading {path} (a PyTorch .bin; safetensors needs no torch)")
        with warnings.catch_warnings():   # torch's note on an unusual pickle protocol: the error below says it
            warnings.simplefilter("ignore", UserWarning)
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except (CheckpointError, MissingDependencyError):
        raise
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():   # a damaged file, not a refused one
            raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {_first_line(e)})") from e
        # Objects other than tensors: never loaded, they could run code.
        raise CheckpointError(f"{path}: refused: the file holds objects other than tensors, which could run code "
                              f"when loaded ({_first_line(e)}); save the weights as model.safetensors") from e
    except Exception as e:  # the libraries raise many types for a damaged file
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        if not hasattr(v, "detach"):
            raise CheckpointError(f"{path}: key {k!r} is not a tensor ({type(v).__name__})")
        out[k] = v.detach().float().numpy() if v.is_floating_point() else v.detach().numpy()
    return out


def _first_line(e: BaseException) -> str:
    """The last line of torch's message that names the object it refused (its first is advice)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    named = [line for line in lines if "Unsupported" in line or "global" in line.lower()]
    return (named or lines or [type(e).__name__])[0][:200]


def resolve_model_dir(path: str | os.PathLike) -> str:
    """A local model directory, or a Hugging Face hub id fetched into the local cache."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path}: expected a model directory (with config.json and weights), found a file")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        try:
            from huggingface_hub import snapshot_download
            return snapshot_download(path, allow_patterns=["config.json", *WEIGHT_FILES])
        except Exception as e:
            raise CheckpointError(
                f"{path}: not a local directory, and the hub could not provide it ({type(e).__name__}); "
                "download the model elsewhere and pass its directory") from e
    raise CheckpointError(f"{path}: no such directory")
