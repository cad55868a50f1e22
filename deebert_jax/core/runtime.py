"""Where a run happens: hosts (`jax.distributed`), devices (the `pmap` layout), its workdir
(one writer at a time) and its metrics log."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
from typing import Any, Iterator, Mapping

import jax

from deebert_jax.core.errors import InputError
from deebert_jax.core.fileutil import atomic_write_text, open_own_file, storage_errors
import numpy as np

AXIS = "batch"   # the pmap axis name of the training and evaluation steps
LOCK_FILE = ".lock"


# ----------------------------------------------------------------------------------------------
# Hosts and devices

def maybe_initialize_distributed(mode) -> None:
    """Multi-host slices: `jax.distributed.initialize()` (auto-detected on Cloud TPU VMs).

    mode "auto" initialises when the environment names several TPU workers or a coordinator.
    """
    if isinstance(mode, str):
        mode = mode.lower()
        if mode == "auto":
            hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
            mode = len(hosts) > 1 or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
        else:
            mode = mode in ("1", "true", "yes")
    if mode and not _distributed_initialized():
        jax.distributed.initialize()


def _distributed_initialized() -> bool:
    return jax.distributed.is_initialized()


def pmap_devices(devices) -> tuple | None:
    """The `devices=` argument of `jax.pmap` for these local devices."""
    # pmap spans every host's devices on a multi-host slice; naming devices is single-host only.
    return tuple(devices) if jax.process_count() == 1 else None


@functools.lru_cache(maxsize=8)
def _pmapped_identity(devices: tuple | None):
    return jax.pmap(lambda x: x, axis_name=AXIS, devices=devices)


def replicate(tree, devices):
    """One copy of every leaf per device, stacked on a leading axis, the layout `pmap` takes.

    Placed by a pmapped identity, so the arrays carry exactly the sharding a pmapped step returns:
    a step fed its own output then reuses its compilation instead of compiling a second time.
    """
    stack = lambda x: np.broadcast_to(np.asarray(x)[None], (len(devices), *np.shape(x)))
    return _pmapped_identity(pmap_devices(devices))(jax.tree_util.tree_map(stack, jax.device_get(tree)))


def unreplicate(tree):
    """Device 0's copy of every leaf of a `replicate`d tree, as numpy."""
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x[0])), tree)


def gather_over_hosts(tree, valid: np.ndarray):
    """Every host's rows of `tree` (leaves [n, ...], n may differ per host), concatenated in host
    order; `valid` [n] bool marks the rows to keep. Single host: the valid rows."""
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(lambda x: np.asarray(x)[valid], tree)
    from jax.experimental import multihost_utils

    n = valid.shape[0]
    most = int(np.max(multihost_utils.process_allgather(np.asarray([n]))))
    pad = lambda x: np.pad(np.asarray(x), [(0, most - n)] + [(0, 0)] * (np.ndim(x) - 1))
    keep = np.asarray(multihost_utils.process_allgather(pad(valid))).reshape(-1)
    gathered = lambda x: np.asarray(multihost_utils.process_allgather(pad(x))).reshape(-1, *np.shape(x)[1:])
    return jax.tree_util.tree_map(lambda x: gathered(x)[keep], tree)


# ----------------------------------------------------------------------------------------------
# The workdir

@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """Holds an exclusive `flock` on `workdir/.lock` (which names the holder's pid) while inside.

    A second run on the same workdir fails at once with a ValueError. The kernel drops the lock
    when its process dies, so a lock file left by a killed run does not block. Host 0 only: on a
    multi-host slice every host of one run shares the workdir.
    """
    if jax.process_index() != 0:
        yield
        return
    created = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    try:
        fd = open_own_file(path, os.O_RDWR | os.O_CREAT, 0o644)   # never through a link the user placed
    except BaseException:
        if created and not os.listdir(workdir):
            os.rmdir(workdir)
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise InputError(f"{workdir}: another run (pid {holder}) is using this workdir; wait for it to "
                             f"finish or choose another --config.workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)   # closing the descriptor releases the lock
        if created and os.listdir(workdir) == [LOCK_FILE]:
            # A run that failed before writing anything leaves no trace: the directory is ours and empty.
            os.remove(path)
            os.rmdir(workdir)


class MetricsLog:
    """metrics.jsonl (one JSON object a line) and TensorBoard events in the workdir; host 0 only."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.active:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, record: Mapping[str, Any], scalars: Mapping[str, float] | None = None, step: int = 0) -> None:
        if not self.active:
            return
        fd = open_own_file(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)   # not through a link
        with storage_errors(self.path), os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        for name, value in (scalars or {}).items():
            self._tb.add_scalar(name, float(value), step)

    def drop_after(self, stage: int, step: int) -> None:
        """Removes `stage`'s train records past `step` and its eval record: a run resumed from
        `step` writes them again, so after any number of resumes each step is logged once."""
        if not self.active or not os.path.isfile(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            lines = f.readlines()
        keep = [line for line in lines if not _stale(line, stage, step)]
        if len(keep) == len(lines):
            return
        atomic_write_text(self.path, "".join(keep))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _stale(line: str, stage: int, step: int) -> bool:
    try:
        record = json.loads(line)
    except ValueError:   # a line cut short when a run was killed mid-write
        return True
    return record.get("stage") == stage and (record.get("event") == "eval" or record.get("step", 0) > step)
