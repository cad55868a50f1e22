"""The batches that feed `pmap`: training's global batches (a pure function of seed and step, so a
resumed run sees the same ones; each host keeps its slice), eval batches padded to a static shape,
and the split of rows over hosts and devices."""

from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np

from deebert_jax.data.glue import ARRAY_KEYS, DataError, num_examples


def process_slice(n: int, process_index: int, process_count: int) -> slice:
    """The contiguous share of `n` rows that host `process_index` of `process_count` reads."""
    per = -(-n // process_count)
    return slice(min(n, process_index * per), min(n, (process_index + 1) * per))


def steps_per_epoch(n_examples: int, global_batch_size: int) -> int:
    steps = n_examples // global_batch_size
    if steps == 0:
        raise DataError(f"{n_examples} training examples are fewer than one global batch of {global_batch_size}")
    return steps


def epoch_permutation(n_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of one epoch: a pure function of (seed, epoch), so a resumed run sees the same batches."""
    return np.random.default_rng([seed, epoch]).permutation(n_examples)


def train_batch(arrays: Mapping[str, np.ndarray], global_batch_size: int, seed: int, step: int,
                process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
    """This host's rows of global batch number `step` (0-based, counted across epochs).

    Every host computes the same global order and keeps its slice of each global batch, so the
    global batch does not depend on the number of hosts. The last partial batch of an epoch is dropped.
    """
    n = num_examples(arrays)
    per_epoch = steps_per_epoch(n, global_batch_size)
    epoch, index = divmod(step, per_epoch)
    order = epoch_permutation(n, seed, epoch)[index * global_batch_size:(index + 1) * global_batch_size]
    order = order[process_slice(global_batch_size, process_index, process_count)]
    return {k: arrays[k][order] for k in ARRAY_KEYS}


def shard(batch: Mapping[str, np.ndarray], num_devices: int) -> dict[str, np.ndarray]:
    """[B, ...] -> [num_devices, B / num_devices, ...] for `pmap`."""
    out = {}
    for k, v in batch.items():
        if v.shape[0] % num_devices:
            raise DataError(f"batch of {v.shape[0]} rows ({k}) does not split over {num_devices} devices")
        out[k] = v.reshape(num_devices, v.shape[0] // num_devices, *v.shape[1:])
    return out


def eval_batches(arrays: Mapping[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches of exactly `batch_size` rows, plus `valid` [b] bool.

    The last partial batch is filled with all-padding rows (attention_mask all 0, label 0, valid
    False), so shapes stay static and every example is counted exactly once.
    """
    if batch_size <= 0:
        raise DataError(f"eval batch_size={batch_size} must be positive")
    n = num_examples(arrays)
    for start in range(0, n, batch_size):
        rows = min(batch_size, n - start)
        batch = {}
        for k in ARRAY_KEYS:
            v = arrays[k][start:start + rows]
            if rows < batch_size:
                v = np.concatenate([v, np.zeros((batch_size - rows, *v.shape[1:]), v.dtype)])
            batch[k] = v
        batch["valid"] = np.arange(batch_size) < rows
        if "valid" in arrays:  # rows that are already padding (see `host_eval_rows`)
            batch["valid"][:rows] &= np.asarray(arrays["valid"][start:start + rows], bool)
        yield batch


def host_eval_rows(arrays: Mapping[str, np.ndarray], process_index: int, process_count: int) -> dict[str, np.ndarray]:
    """This host's contiguous share of an eval split, padded so that every host has the same
    number of rows (`valid` [n] bool marks the real ones): on a multi-host slice every host must
    run the same number of pmapped batches."""
    n = num_examples(arrays)
    rows = process_slice(n, process_index, process_count)
    per = -(-n // process_count)
    out = {}
    for k in ARRAY_KEYS:
        v = arrays[k][rows]
        out[k] = np.concatenate([v, np.zeros((per - len(v), *v.shape[1:]), v.dtype)])
    out["valid"] = np.arange(per) < (rows.stop - rows.start)
    return out
