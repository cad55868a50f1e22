"""One numeric precision, applied to JAX and PyTorch alike, so a benchmark compares like with like.

    fp32  float32 everywhere, IEEE float32 matmuls (JAX precision "highest"; torch TF32 off)
    tf32  float32 storage, TF32 matmuls on both sides (JAX "tensorfloat32"; torch TF32 on)
    bf16  bfloat16 compute on both sides, float32 parameters: JAX runs the model with
          dtype=bfloat16; torch casts the inference model to bfloat16 and trains under
          `torch.autocast(dtype=torch.bfloat16)`; float32 matmuls left over may use TF32 on both

Left alone, the two frameworks disagree on a GPU: JAX's default float32 matmul there is TF32,
torch's is IEEE, so a "float32" comparison pits different arithmetic against each other. On a CPU
fp32 and tf32 are the same arithmetic (no TF32 units), and are recorded as asked.
"""

from __future__ import annotations

import contextlib
import dataclasses

from deebert_jax.core.errors import DeeBertError

PRECISIONS = ("fp32", "tf32", "bf16")
_DTYPE_OF = {"fp32": "float32", "tf32": "float32", "bf16": "bfloat16"}
_JAX_MATMUL = {"fp32": "highest", "tf32": "tensorfloat32", "bf16": "default"}
# bf16: whatever float32 matmuls are left (the matmul-rate probe) may use TF32 on both sides, as
# JAX's default does on a GPU.
_TORCH_MATMUL = {"fp32": "highest", "tf32": "high", "bf16": "high"}


class PrecisionError(DeeBertError, ValueError):
    """A precision name or a --precision / --dtype pair that cannot be honoured."""


@dataclasses.dataclass(frozen=True)
class Precision:
    name: str = "fp32"

    def __post_init__(self):
        if self.name not in PRECISIONS:
            raise PrecisionError(f"precision {self.name!r}: expected one of {', '.join(PRECISIONS)}")

    @property
    def dtype(self) -> str:
        """The compute dtype's name, as `--dtype` and `bench.json`'s "dtype" spell it."""
        return _DTYPE_OF[self.name]

    @property
    def jax_matmul_precision(self) -> str:
        return _JAX_MATMUL[self.name]

    @property
    def torch_matmul_precision(self) -> str:
        """`torch.set_float32_matmul_precision`'s value: "high" allows TF32."""
        return _TORCH_MATMUL[self.name]

    def record(self) -> dict:
        """What each framework was told, for a results file."""
        return {"name": self.name, "jax_dtype": self.dtype, "jax_default_matmul_precision": self.jax_matmul_precision,
                "torch_dtype": self.dtype, "torch_float32_matmul_precision": self.torch_matmul_precision,
                "torch_bf16": "model cast for inference, autocast for training" if self.name == "bf16" else None}


def resolve(precision: str | None, dtype: str | None = None) -> Precision:
    """`--precision` and the older `--dtype` flag -> one Precision (float32 -> fp32, bfloat16 -> bf16).

    Neither given: fp32. Both given and disagreeing: an error naming both.
    """
    from_dtype = {"float32": "fp32", "bfloat16": "bf16", None: None}
    if dtype not in from_dtype:
        raise PrecisionError(f"dtype {dtype!r}: expected float32 or bfloat16")
    if precision is None:
        return Precision(from_dtype[dtype] or "fp32")
    chosen = Precision(precision)
    if dtype is not None and chosen.dtype != dtype:
        raise PrecisionError(f"--precision {precision} computes in {chosen.dtype}, but --dtype {dtype} was also given; "
                             "pass one of them")
    return chosen


def apply_jax(precision: Precision) -> None:
    """Sets JAX's default matmul precision for the rest of the process (before anything is traced)."""
    import jax
    jax.config.update("jax_default_matmul_precision", precision.jax_matmul_precision)


def apply_torch(precision: Precision) -> None:
    """Sets torch's float32 matmul precision (TF32 on or off, CPU and CUDA) for the rest of the process."""
    import torch
    torch.set_float32_matmul_precision(precision.torch_matmul_precision)
    if hasattr(torch.backends, "cudnn"):
        torch.backends.cudnn.allow_tf32 = precision.name == "tf32"


def apply(precision: Precision) -> dict:
    """Both frameworks at once -> `precision.record()`."""
    apply_jax(precision)
    apply_torch(precision)
    return precision.record()


def torch_autocast(precision: Precision, device: str):
    """The context a torch training step runs under: bf16 autocast for "bf16", else nothing."""
    if precision.name != "bf16":
        return contextlib.nullcontext()
    import torch
    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
