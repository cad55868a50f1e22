"""The host side of continuous exit-aware batching: pools of rows on the device, the jitted programs
of `step_programs` per padded length, driven by `scheduler.Scheduler`.

Per padded length S the device holds one pool (`step_programs`), its programs compiled before the
first request (`warm_up`). `Engine.step()` runs one scheduler step and calls each exited row's
callback at once; `Engine.start()` runs steps on a worker thread until `stop()` (which first
answers every row). What a row computes is what `exit_aware_predict` computes for it.

Shadow rows (`shadow_share`): that share of rows, drawn at random with a seed, is answered the
moment it exits, as every row is; then a copy runs again to the last layer in a shadow lane (its
own pools of the same shapes, so the same compiled programs, made on a length's first shadow row,
at the rule's full-depth threshold),
and `on_shadow(answered label, full-depth label, exit layer)` compares the two. The lane runs only
when no answer is waiting for a step, and is dropped on `stop()`: shadow work delays an answer by
at most the one step in progress, and never changes one.
"""

from __future__ import annotations

import itertools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deebert_jax.core.config import DeeBertConfig
from deebert_jax.core.errors import InputError
from deebert_jax.inference.early_exit import ExitState, check_threshold, full_depth_threshold
from deebert_jax.model import layouts
from deebert_jax.serving import step_programs
# Their old home, and the engine's host side reads them from here (tests patch STEP_ADMIT_ROWS).
from deebert_jax.serving.step_programs import (ADMIT_ROWS, CPU_BUCKET_SIZES, STEP_ADMIT_ROWS,  # noqa: F401
                                               default_bucket_sizes, program_params, step_kind)
from deebert_jax.serving.requests import Row
from deebert_jax.serving.scheduler import DEFAULT_ADMIT_BUDGET_S, DEFAULT_SCHEDULE, Scheduler, Step
from deebert_jax.serving.worker import Worker

DEFAULT_POOL_SIZE = 256  # slots per padded length: rows in flight (activations: P x S x H floats)
# Shadow copies waiting for the lane at most; past it a drawn row is not shadowed (counted in
# `shadow_skipped`): under sustained load the lane, which runs only when the server is idle, would
# otherwise grow without bound.
SHADOW_BACKLOG = 1024

# (logits [K] float32, exit_layer 1-based) -> None, called on the engine's thread; (None, 0) if
# the engine failed and the row will never be answered.
Callback = Callable[[np.ndarray | None, int], None]


class Engine(Worker):
    """Continuous exit-aware batching for one model on one device.

    `submit(rows, callbacks)` queues rows (`requests.Row`, padded to one of `lengths`); each
    callback gets (logits [K], exit_layer) the moment its row exits. `step()` runs on one thread
    at a time (`start()`: a worker thread); `submit`, `cancel`, `pending` and `stop` may be
    called from any thread. `on_step(rows, seconds)` is called after each step (metrics),
    `on_admit(keys)` when rows enter their pool (the end of their queue time).
    `schedule`, `admit_budget_s`: which group runs next (`scheduler.Scheduler`).
    """

    thread_name = "deebert-engine"

    def __init__(self, config: DeeBertConfig, params, lengths: Sequence[int], threshold: float,
                 rule: str = "entropy", *, pool_size: int = DEFAULT_POOL_SIZE,
                 bucket_sizes: Sequence[int] | None = None, dtype=jnp.float32,
                 on_step: Callable[[int, float], None] | None = None, schedule: str = DEFAULT_SCHEDULE,
                 admit_budget_s: float = DEFAULT_ADMIT_BUDGET_S, shadow_share: float = 0.0, shadow_seed: int = 0,
                 on_shadow: Callable[[int, int, int], None] | None = None):
        check_threshold(threshold, rule)
        if not 0.0 <= shadow_share <= 1.0:
            raise InputError(f"shadow_share={shadow_share!r}: expected a share in [0, 1]")
        self.config, self.rule, self.lengths = config, rule, tuple(sorted(set(int(n) for n in lengths)))
        if max(self.lengths) > config.max_sequence_length:
            raise InputError(f"length {max(self.lengths)} is longer than the model's {config.sequence_limit}")
        self.pool_size = int(pool_size)
        self.bucket_sizes = tuple(sorted({int(b) for b in (bucket_sizes or default_bucket_sizes())}, reverse=True))
        self.threshold = np.float32(threshold)
        self.dtype = jnp.dtype(dtype)
        self.on_step = on_step
        self.on_admit: Callable[[list[int]], None] | None = None
        self.scheduler = Scheduler(config.num_hidden_layers, self.lengths, self.pool_size, schedule, admit_budget_s)
        self.params = jax.device_put(layouts.unstack_params(params))
        admit_params, step_params = program_params(self.params, config.num_hidden_layers)
        self._admit_leaves, self._admit_treedef = jax.tree_util.tree_flatten(admit_params)
        flat = [jax.tree_util.tree_flatten(p) for p in step_params]
        self._step_leaves, self._step_treedefs = [leaves for leaves, _ in flat], tuple(treedef for _, treedef in flat)
        self._rows: dict[int, tuple[Row, Callback]] = {}
        self._keys = itertools.count()
        super().__init__()
        self._pools = {n: self._empty_pool(n) for n in self.lengths}
        # The step's scalars already on the device, one transfer fewer each per call: counts and
        # layers by value, thresholds as they are first used.
        self._ints = [jax.device_put(np.int32(i))
                      for i in range(max(self.pool_size, config.num_hidden_layers, STEP_ADMIT_ROWS) + 1)]
        # A step that admits nothing, per length: slots writing nowhere, inputs never read, count 0.
        no_slots = jax.device_put(np.full(STEP_ADMIT_ROWS, self.pool_size, np.int32))
        self._no_admission = {n: (no_slots, jax.device_put(np.zeros((3, STEP_ADMIT_ROWS, n), np.int32)), self._ints[0])
                              for n in self.lengths}
        self._thresholds: dict[float, jax.Array] = {}
        self._programs: dict[int, tuple] = {}
        # The shadow lane: same pool shapes (the same compiled programs), full depth, deepest first.
        self.shadow_share, self.on_shadow = float(shadow_share), on_shadow
        self._shadow_rng = np.random.default_rng(shadow_seed)
        self._full_depth = np.float32(full_depth_threshold(rule, config.num_hidden_layers))
        self._shadowed: set[int] = set()   # keys of rows drawn for shadowing, not yet answered
        self._shadow_rows: dict[int, tuple[Row, int, int]] = {}   # lane key -> row, answered label, exit layer
        self.shadow_skipped = 0
        if self.shadow_share > 0:
            self._shadow = Scheduler(config.num_hidden_layers, self.lengths, self.pool_size, "deepest")
            self._shadow_pools: dict[int, tuple] = {}   # made on a length's first shadow row (memory)

    # -- programs ----------------------------------------------------------------------------
    def _empty_pool(self, length: int):
        P, H, K = self.pool_size, self.config.hidden_size, self.config.num_labels
        hidden = jnp.zeros((P, length, H), self.dtype)
        state = ExitState.start(hidden, jnp.zeros((P, length), jnp.int32), K, self.rule)
        # Free slots are never read for an answer; a zero bias (all positions visible) keeps a
        # padding bucket slot that computes on one of them free of NaNs.
        return state, jnp.zeros((P, length), self.dtype)

    def warm_up(self) -> float:
        """Compiles every program for every length (a call on no rows) -> seconds taken."""
        start = time.perf_counter()
        admit, steps = self._compiled()
        for n in self.lengths:
            state, bias = self._pools[n]
            ids = np.zeros((ADMIT_ROWS, n), np.int32)
            state, bias = admit(self._admit_leaves, state, bias, np.full(ADMIT_ROWS, self.pool_size, np.int32),
                                ids, ids, ids)
            # Every layer and bucket size runs once (on free slots, which admitting resets): the
            # first run of each costs ~15 ms more on the CPU, which the first requests would pay.
            count = min(sum(self.bucket_sizes), self.pool_size)
            for layer in range(self.config.num_hidden_layers):
                # The arguments a step passes (`_run_plan`), so this compiles what the steps run.
                state, bias, out = steps[layer](*self._step_args(layer, state, bias, range(count), self.threshold,
                                                                 self._no_admission[n]))
            jax.block_until_ready(out)
            self._pools[n] = (state, bias)
        self._programs = {n: (admit, steps) for n in self.lengths}
        return time.perf_counter() - start

    def _compiled(self):
        """-> (admit, steps): this engine's jitted programs (`step_programs.programs`)."""
        return step_programs.programs(self.config, self.rule, self.dtype, self.bucket_sizes, self._admit_treedef,
                                      self._step_treedefs)

    def _step_args(self, layer: int, state, bias, slots: Sequence[int], threshold, new) -> tuple:
        """The arguments of layer `layer`'s step over `slots`; `new` (layer 0 only) its admission."""
        args = (self._step_leaves[layer], state, bias, self._rows_arg(slots), self._ints[len(slots)],
                self._device_threshold(threshold))
        if layer == 0:
            return args + tuple(new)
        return args if step_kind(layer, self.config.num_hidden_layers) is not None else args + (self._ints[layer],)

    def _rows_arg(self, slots: Sequence[int]) -> np.ndarray:
        rows = np.full(self.pool_size + max(self.bucket_sizes), self.pool_size, np.int32)
        rows[:len(slots)] = slots
        return rows

    # -- rows in -----------------------------------------------------------------------------
    def submit(self, rows: Sequence[Row], callbacks: Sequence[Callback]) -> list[int]:
        """Queues rows -> their keys (for `cancel`)."""
        keys = []
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is stopping")
            for row, callback in zip(rows, callbacks, strict=True):
                if row.length not in self._pools:
                    raise ValueError(f"row of length {row.length}; the pools hold {self.lengths}")
                key = next(self._keys)
                self._rows[key] = (row, callback)
                self.scheduler.submit(key, row.length)
                keys.append(key)
                if self.shadow_share > 0 and self._shadow_rng.random() < self.shadow_share:
                    self._shadowed.add(key)
            self._cond.notify()
        return keys

    def cancel(self, keys: Sequence[int]) -> int:
        """Drops rows that have not started (their client went away) -> how many were dropped."""
        dropped = 0
        with self._cond:
            for key in keys:
                if self.scheduler.cancel(key):
                    self._rows.pop(key, None)
                    self._shadowed.discard(key)
                    dropped += 1
        return dropped

    def pending(self) -> int:
        """Rows accepted and not yet answered (waiting or running)."""
        return len(self._rows)

    # -- running -----------------------------------------------------------------------------
    def step(self) -> bool:
        """Runs the next scheduled step (False when there is none); exited rows' callbacks run here.
        With no answer waiting for a step, a step of the shadow lane runs instead."""
        with self._cond:
            plan = self.scheduler.next_step()
            admitted = [(slot, self._rows[key][0]) for key, slot in plan.admit] if plan else []
        if plan is None:
            return self._shadow_step()
        if not self._programs:
            self.warm_up()
        start = time.perf_counter()
        done, exit_layer, logits = self._run_plan(plan, admitted, self._pools, self.threshold)
        with self._cond:
            answers = [(key, self._rows.pop(key), i) for i, key in self.scheduler.complete(plan, done.tolist())]
            shadowed = [(key, row, i) for key, (row, _), i in answers if key in self._shadowed]
        if self.on_step is not None:
            self.on_step(len(plan.slots), time.perf_counter() - start)
        for _, (_, callback), i in answers:
            callback(logits[i], int(exit_layer[i]))
        for key, row, i in shadowed:
            self._to_shadow_lane(key, row, int(np.argmax(logits[i])), int(exit_layer[i]))
        return True

    def _to_shadow_lane(self, key: int, row: Row, label: int, exit_layer: int) -> None:
        self._shadowed.discard(key)
        if exit_layer >= self.config.num_hidden_layers:   # answered at full depth: nothing to redo
            if self.on_shadow is not None:
                self.on_shadow(label, label, exit_layer)
            return
        with self._cond:
            if len(self._shadow_rows) >= SHADOW_BACKLOG:
                self.shadow_skipped += 1
                return
            lane_key = next(self._keys)
            self._shadow_rows[lane_key] = (row, label, exit_layer)
            self._shadow.submit(lane_key, row.length)

    def _shadow_step(self) -> bool:
        """One step of the shadow lane (False when it has none): rows that reach the last layer
        report their full-depth label beside the one they were answered with."""
        if self.shadow_share <= 0:
            return False
        with self._cond:
            plan = self._shadow.next_step() if not self._stopping else None
            admitted = [(slot, self._shadow_rows[key][0]) for key, slot in plan.admit] if plan else []
        if plan is None:
            return False
        if not self._programs:
            self.warm_up()
        if plan.length not in self._shadow_pools:
            self._shadow_pools[plan.length] = self._empty_pool(plan.length)
        done, _, logits = self._run_plan(plan, admitted, self._shadow_pools, self._full_depth)
        with self._cond:
            finished = [(self._shadow_rows.pop(key), i) for i, key in self._shadow.complete(plan, done.tolist())]
        for (_, label, exit_layer), i in finished:
            if self.on_shadow is not None:
                self.on_shadow(label, int(np.argmax(logits[i])), exit_layer)
        return True

    def _run_plan(self, plan: Step, admitted, pools, threshold):
        """Admits `admitted` [(slot, row)] into `pools[plan.length]`, runs the step at `threshold`
        -> (done, exit_layer, logits) of `plan.slots`, as numpy."""
        if plan.layer != 0 and admitted:
            raise RuntimeError(f"a step of layer {plan.layer + 1} admitting rows: only layer 1's steps embed")
        admit, steps = self._programs[plan.length]
        state, bias = pools[plan.length]
        if plan.admit and pools is self._pools and self.on_admit is not None:
            self.on_admit([key for key, _ in plan.admit])
        extra = len(admitted) - STEP_ADMIT_ROWS   # rows past what the step embeds: admit calls first
        for lo in range(0, max(extra, 0), ADMIT_ROWS):
            slots, inputs = self._admission(admitted[lo:min(lo + ADMIT_ROWS, extra)], ADMIT_ROWS, plan.length)
            state, bias = admit(self._admit_leaves, state, bias, slots, *inputs)
        if admitted[max(extra, 0):]:
            new = self._admission(admitted[max(extra, 0):], STEP_ADMIT_ROWS, plan.length)
            new = (*new, self._ints[len(admitted) - max(extra, 0)])
        else:
            new = self._no_admission[plan.length]
        n = len(plan.slots)
        state, bias, out = steps[plan.layer](*self._step_args(plan.layer, state, bias, plan.slots, threshold, new))
        pools[plan.length] = (state, bias)
        out = np.asarray(out)[:n]
        return out[:, 0] > 0, out[:, 1].astype(np.int32), out[:, 2:]

    def _device_threshold(self, threshold: np.float32) -> jax.Array:
        key = float(threshold)
        if key not in self._thresholds:
            self._thresholds[key] = jax.device_put(np.float32(threshold))
        return self._thresholds[key]

    def _admission(self, admitted, size: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """[(slot, row)] -> (slots [size], index P past the rows; inputs [3, size, length])."""
        slots = np.full(size, self.pool_size, np.int32)
        inputs = np.zeros((3, size, length), np.int32)
        for i, (slot, row) in enumerate(admitted):
            slots[i] = slot
            inputs[0, i], inputs[1, i], inputs[2, i] = row.input_ids, row.attention_mask, row.token_type_ids
        return slots, inputs

    def set_threshold(self, threshold: float) -> None:
        """The threshold of every later step (`drift.DriftCheck`'s full-depth and safer actions)."""
        check_threshold(threshold, self.rule)
        with self._cond:
            self.threshold = np.float32(threshold)

    def shadow_backlog(self) -> int:
        """Shadow copies waiting for or running in the lane."""
        return len(self._shadow_rows)

    def _has_work(self) -> bool:
        # The shadow lane keeps the worker busy only while it is not stopping: it is dropped then.
        return self.scheduler.has_work() or (self.shadow_share > 0 and not self._stopping and self._shadow.has_work())

    def _take_all(self) -> list[Callback]:
        failed, self._rows = [callback for _, callback in self._rows.values()], {}
        self._shadowed, self._shadow_rows = set(), {}
        return failed
