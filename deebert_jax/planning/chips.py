"""Cloud TPU chips and slices as the TPU compiler sees them, on a machine without a TPU.

`libtpu` (the `tpu` extra) describes a whole slice's devices from its topology name
(`jax.experimental.topologies`); programs compiled for them run the real TPU compiler. The chip
figures are Google's public ones (Cloud TPU system architecture pages): bf16 peak of the matrix
units, HBM bandwidth and HBM per chip. They only ever feed estimates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re

from deebert_jax.core.errors import InputError
from deebert_jax.cpu.process import libtpu_installed, tpu_chips_attached

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """One TPU generation's public figures, per chip."""

    generation: str          # as a topology name starts: v4, v5e, v5p, v6e
    device_kind: str         # what libtpu calls the chip (`Device.device_kind`)
    hbm_bytes: int
    peak_bf16_flops: float   # matrix units, dense bf16
    hbm_bytes_per_s: float
    megacore: bool           # two TensorCores driven as one device (JAX's default on v4 and v5p)


CHIPS = {c.generation: c for c in (
    ChipSpec("v4", "TPU v4", 32 * GiB, 275e12, 1200e9, True),
    ChipSpec("v5e", "TPU v5 lite", 16 * GiB, 197e12, 819e9, False),
    ChipSpec("v5p", "TPU v5", 95 * GiB, 459e12, 2765e9, True),
    ChipSpec("v6e", "TPU v6 lite", 32 * GiB, 918e12, 1640e9, False),
)}
# libtpu's own spelling of a generation in a topology name, where it differs from Cloud TPU's.
_LIBTPU_NAME = {"v5p": "v5"}
# Cloud TPU's accelerator names for some slices (v4 and v5p count TensorCores, two per chip).
ACCELERATOR_NAMES = {"v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4", "v4-64": "v4:2x4x4",
                     "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4",
                     "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v5e-32": "v5e:4x8",
                     "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4", "v6e-32": "v6e:4x8"}
_TOPOLOGY = re.compile(r"(v\d+[a-z]*):(\d+(?:x\d+){1,2})")


@dataclasses.dataclass(frozen=True)
class Slice:
    """A slice's devices (compile-only) and what they are."""

    topology: str            # as asked, e.g. "v5e:2x4"
    chip: ChipSpec
    devices: tuple           # every chip of the slice, in libtpu's order
    hosts: int

    @property
    def chips(self) -> int:
        return len(self.devices)

    @property
    def chips_per_host(self) -> int:
        return self.chips // self.hosts


def parse_topology(topology: str) -> tuple[ChipSpec, str]:
    """'v5e:2x4' (or Cloud TPU's 'v5e-8') -> (its chip, libtpu's topology name); a name we
    cannot read -> InputError."""
    topology = ACCELERATOR_NAMES.get(topology.strip().lower(), topology)
    match = _TOPOLOGY.fullmatch(topology.strip().lower())
    known = ", ".join(f"{g}:..." for g in CHIPS)
    if not match:
        raise InputError(f"--topology={topology!r}: expected GENERATION:AxB or GENERATION:AxBxC, e.g. v5e:2x4, "
                         f"v4:2x2x4 ({known}), or a Cloud TPU name: {', '.join(ACCELERATOR_NAMES)}")
    generation, shape = match.groups()
    if generation not in CHIPS:
        raise InputError(f"--topology={topology!r}: no figures for TPU {generation} (known: {', '.join(CHIPS)})")
    return CHIPS[generation], f"{_LIBTPU_NAME.get(generation, generation)}:{shape}"


@contextlib.contextmanager
def _quiet_libtpu(chip: ChipSpec):
    """libtpu, loaded on a machine that is not a TPU VM, asks its metadata for the worker hosts
    and accelerator type and prints what it could not find on stderr; naming them while it loads
    (only where the environment does not) keeps a compile-only topology quiet. Without a TPU
    there is no chip for processes to share, so several plans (or test workers) may load libtpu
    at once, which its lock file would otherwise refuse. The process's environment is put back
    afterwards: nothing else reads them."""
    names = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
             "TPU_ACCELERATOR_TYPE": f"{_LIBTPU_NAME.get(chip.generation, chip.generation)}-8"}
    added = [k for k in names if k not in os.environ] if not tpu_chips_attached() else []
    os.environ.update({k: names[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def slice_devices(topology: str) -> Slice:
    """The compile-only devices of a whole slice, laid out as a run on it gets them (one device
    per chip: megacore where JAX uses it)."""
    chip, name = parse_topology(topology)
    topology = ACCELERATOR_NAMES.get(topology.strip().lower(), topology)
    if not libtpu_installed():
        raise InputError(f"--topology={topology}: compiling for a TPU needs libtpu: pip install 'deebert-jax[tpu]' "
                         "(or the libtpu line of requirements.txt)")
    from jax.experimental import topologies

    options = {"chip_config_name": "megacore"} if chip.megacore else {}
    try:
        with _quiet_libtpu(chip):
            devices = topologies.get_topology_desc(topology_name=name, platform="tpu", **options).devices
    except Exception as e:   # noqa: BLE001 - libtpu's errors are untyped runtime errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"--topology={topology}: the installed libtpu does not know this slice ({first})") from None
    hosts = len({d.process_index for d in devices})
    return Slice(topology, chip, tuple(devices), hosts)
