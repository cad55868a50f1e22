"""The baselines a user would otherwise deploy, at full depth with plain dynamic batching, behind
the same interface as `engine.Engine`: eager PyTorch (`torch_reference.TorchDeeBert`), and the
same twin exported to ONNX Runtime (`onnx_engine.build_engine`).

The worker takes every waiting row (up to `max_batch`, oldest first), pads them to the longest
one's padded length and runs the full forward; every row answers at layer L.
"""

from __future__ import annotations

import collections
import itertools
import tempfile
import time
from typing import Callable, Sequence

import numpy as np

from deebert_jax.serving.requests import Row
from deebert_jax.serving.worker import Worker

DEFAULT_MAX_BATCH = 32


INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class DynamicBatchingEngine(Worker):
    """`submit(rows, callbacks)`; callbacks get (logits [K], L), or (None, 0) if the engine failed.
    `forward(arrays)`: int64 [B, S] input_ids, attention_mask, token_type_ids -> [B, K] logits."""

    thread_name = "batching-engine"

    def __init__(self, forward: Callable[[dict], np.ndarray], num_layers: int, lengths: Sequence[int], *,
                 max_batch: int = DEFAULT_MAX_BATCH, on_step: Callable[[int, float], None] | None = None):
        self.forward, self.lengths, self.max_batch = forward, tuple(sorted(lengths)), int(max_batch)
        self.num_layers = num_layers
        self.on_step = on_step
        self._waiting: collections.OrderedDict[int, tuple[Row, Callable]] = collections.OrderedDict()
        self._keys = itertools.count()
        super().__init__()
        self._running = 0

    def _forward(self, rows: Sequence[Row]) -> np.ndarray:
        width = max(r.length for r in rows)
        arrays = {k: np.zeros((len(rows), width), np.int64) for k in INPUTS}
        for i, r in enumerate(rows):
            for k in arrays:
                arrays[k][i, :r.length] = getattr(r, k)
        return self.forward(arrays)

    def warm_up(self) -> float:
        """One forward per length at batch 1 and `max_batch` (allocator and kernels) -> seconds."""
        start = time.perf_counter()
        for n in self.lengths:
            row = Row(np.ones(n, np.int32), np.ones(n, np.int32), np.zeros(n, np.int32), False)
            for b in (1, self.max_batch):
                self._forward([row] * b)
        return time.perf_counter() - start

    def submit(self, rows: Sequence[Row], callbacks: Sequence[Callable]) -> list[int]:
        keys = []
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is stopping")
            for row, callback in zip(rows, callbacks, strict=True):
                key = next(self._keys)
                self._waiting[key] = (row, callback)
                keys.append(key)
            self._cond.notify()
        return keys

    def cancel(self, keys: Sequence[int]) -> int:
        with self._cond:
            return sum(self._waiting.pop(k, None) is not None for k in keys)

    def pending(self) -> int:
        return len(self._waiting) + self._running

    def step(self) -> bool:
        with self._cond:
            if not self._waiting:
                return False
            batch = [self._waiting.popitem(last=False)[1] for _ in range(min(self.max_batch, len(self._waiting)))]
            self._running = len(batch)
        start = time.perf_counter()
        try:
            logits = self._forward([row for row, _ in batch])
        except BaseException:
            for _, callback in batch:  # taken off the queue: answered here, as failures
                callback(None, 0)
            raise
        finally:
            self._running = 0
        if self.on_step is not None:
            self.on_step(len(batch), time.perf_counter() - start)
        for (_, callback), row_logits in zip(batch, logits):
            callback(row_logits, self.num_layers)
        return True

    def _has_work(self) -> bool:
        return bool(self._waiting)

    def _take_all(self) -> list[Callable]:
        failed, self._waiting = [callback for _, callback in self._waiting.values()], collections.OrderedDict()
        return failed


class TorchEngine(DynamicBatchingEngine):
    """Eager PyTorch: `model` a `TorchDeeBert`."""

    thread_name = "torch-engine"

    def __init__(self, model, lengths: Sequence[int], **kwargs):
        self.model = model
        super().__init__(self._torch_forward, model.num_layers, lengths, **kwargs)

    def _torch_forward(self, arrays: dict) -> np.ndarray:
        import torch
        with torch.inference_mode():
            logits = self.model.full_forward(*(torch.from_numpy(arrays[k]) for k in INPUTS))
        return logits.float().numpy()


def build_engine(config, params, lengths: Sequence[int]) -> tuple[TorchEngine, str]:
    """`serving.server.EngineFactory` for `--backend torch`: the same weights as an eager PyTorch
    DeeBERT (exported and strictly loaded) -> (engine, what it runs)."""
    from benchmarks.benchmarking import torch_twin   # JAX and torch load only when this backend is asked for
    with tempfile.TemporaryDirectory() as tmp:
        engine = TorchEngine(torch_twin(config, params, tmp), lengths)
    return engine, "eager PyTorch, full depth, dynamic batching (no early exit)"
