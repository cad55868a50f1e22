"""The one backend seam: which kernels the training graph is built from.

"reference": the graph as JAX and Flax build it (autodiff throughout, a rolled `nn.scan` over the
  layers, `nn.Dropout` as it is). Right on every backend.
"cpu_tuned": the pieces in `deebert_jax.cpu`, chosen by CPU profiles (`python -m train.profile_step`;
  the figures: `git log -p -- docs/performance-history.md`): dense kernel gradients and attention's
  backward as plain matmuls, dropout masks and the activation's derivative computed once, layers
  unrolled in training. Same values and dropout bits; gradients
  agree to float rounding (tests/test_fusion.py, tests/test_training.py).

Only gradients and the training graph differ: an eval-mode forward is the same program under
both. The choice is a hashable model field, threaded like `dtype`, and made once by the entry
point from where the arrays live (`for_devices`); `--jax-defaults` passes "reference".
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax

from deebert_jax.core.config import KERNELS, check_kernels  # noqa: F401 (the seam's names, defined below the model)
from deebert_jax.cpu.matmul import dense_dot_general as cpu_dot_general
from deebert_jax.cpu.attention import attention
from deebert_jax.model.attention import attention_autodiff


def for_devices(devices: Sequence[jax.Device] | None = None) -> str:
    """"cpu_tuned" when every device the arrays live on is a CPU, else "reference"."""
    devices = jax.local_devices() if devices is None else devices
    return "cpu_tuned" if devices and all(d.platform == "cpu" for d in devices) else "reference"


def dense_dot_general(kernels: str) -> Callable | None:
    """`nn.Dense(dot_general=...)` for the encoder's dense layers (None: Flax's own)."""
    if check_kernels(kernels) == "cpu_tuned":
        return cpu_dot_general
    return None


def attention_core(kernels: str) -> Callable:
    """Self-attention's core `(q, k, v, mask_bias, keep, rate) -> context` (same forward either way)."""
    if check_kernels(kernels) == "cpu_tuned":
        return attention
    return attention_autodiff


def tuned_training_layout(kernels: str) -> bool:
    """Layers unrolled in training; dropout masks and the activation's derivative computed once."""
    return check_kernels(kernels) == "cpu_tuned"
