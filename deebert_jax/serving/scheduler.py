"""Which rows run next: the host-side bookkeeping of continuous exit-aware batching (no JAX).

Rows live in fixed pools, one per padded length, `pool_size` slots each. A row waits (tokenised,
not yet embedded) until its pool has a free slot; it is admitted (embedded into a slot) by the
step that runs its layer 1, moves up one layer per step it is in, and leaves its slot the
moment it exits. A *group* is every row of one pool at one layer: one step runs one whole group
through one layer (the engine cuts it into fixed-size buckets), so every step reads one layer's
weights once and never copies them per row.

Schedules (`SCHEDULES`; which group runs next, ties: the group holding the oldest row):

- **arrivals** (the default): rows waiting for a slot are admitted by the next step (their
  layer 1), then the deepest group. A new request does not wait for the rows in flight, and
  groups still form: the admitted rows land beside the rows already waiting at layer 2 and
  move on together. Nobody starves: admissions wait while the oldest row in flight is older
  than `admit_budget_s` (the rows in flight then go first, deepest first), and a full pool
  admits nobody; so near capacity the order turns back into deepest first. Without the budget
  (math.inf) the deep rows starve as load grows.
- **deepest**: the deepest group first. Shortest-remaining-work first (with no exits, the
  order that minimises the mean time in the system), and new arrivals gather at layer 0 and
  start together as one big group; the price is that a new request waits until the rows in
  flight have exited or finished (up to L - 1 steps per pool).
- **shallowest**: the shallowest group first (least attained service): arrivals start at once
  and the shallow groups catch up with the deeper ones and merge; the deep rows wait meanwhile
  (they run when no shallower group is left), so its tail breaks down under load.

`docs/serving.md` has the measured comparison. Row-by-row exits do not depend on the schedule
(each row sees the same layers and exit rule whatever the order); the tests drive random
arrival orders through every schedule.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import time
from typing import Callable, Hashable, Sequence

from deebert_jax.core.errors import InputError


@dataclasses.dataclass(frozen=True)
class Step:
    """One layer over one group: pool `length`, layer (0-based), the slots to run (arrival order)
    and, for a layer-0 step, `admit`: (key, slot) of the waiting rows it embeds first."""
    length: int
    layer: int
    slots: tuple[int, ...]
    admit: tuple[tuple[Hashable, int], ...] = ()


SCHEDULES = ("arrivals", "deepest", "shallowest")
DEFAULT_SCHEDULE = "arrivals"
DEFAULT_ADMIT_BUDGET_S = 0.05   # arrivals: admissions wait while the oldest row in flight is older


def check_schedule(schedule: str) -> str:
    if schedule not in SCHEDULES:
        raise InputError(f"schedule {schedule!r}; expected one of {SCHEDULES}")
    return schedule


class Scheduler:
    """Pools of `pool_size` slots, one per padded length in `lengths`, for a model of `num_layers`,
    run in the order `schedule` (one of `SCHEDULES`)."""

    def __init__(self, num_layers: int, lengths: Sequence[int], pool_size: int, schedule: str = DEFAULT_SCHEDULE,
                 admit_budget_s: float = DEFAULT_ADMIT_BUDGET_S, clock: Callable[[], float] = time.monotonic):
        if num_layers < 1 or pool_size < 1 or not lengths:
            raise InputError(f"num_layers={num_layers}, pool_size={pool_size}, lengths={lengths!r}: "
                             "need at least one layer, one slot and one length")
        check_schedule(schedule)
        self.num_layers, self.lengths, self.pool_size = num_layers, tuple(lengths), pool_size
        if not admit_budget_s >= 0:
            raise InputError(f"admit_budget_s={admit_budget_s}: must be >= 0 (math.inf: never wait)")
        self.schedule, self.admit_budget_s, self._clock = schedule, float(admit_budget_s), clock
        self._since: dict[int, float] = {}   # arrival -> when it was submitted
        self._order = itertools.count()   # arrival order, for ties and FIFO admission
        self._waiting = {n: collections.OrderedDict() for n in self.lengths}   # key -> arrival
        self._free = {n: list(range(pool_size - 1, -1, -1)) for n in self.lengths}  # pop() -> lowest
        self._slots: dict[tuple[int, int], tuple[Hashable, int, int]] = {}   # (length, slot) -> key, layer, arrival

    # -- rows in and out ---------------------------------------------------------------------
    def submit(self, key: Hashable, length: int) -> None:
        """Queues a row (not yet embedded) for the pool of padded length `length`."""
        if length not in self._waiting:
            raise InputError(f"length {length} is not one of the pools' lengths {self.lengths}")
        arrival = next(self._order)
        self._waiting[length][key] = arrival
        self._since[arrival] = self._clock()

    def cancel(self, key: Hashable) -> bool:
        """Drops a row that is still waiting (its client went away); False once it is admitted."""
        for waiting in self._waiting.values():
            arrival = waiting.pop(key, None)
            if arrival is not None:
                del self._since[arrival]
                return True
        return False

    def waiting(self) -> int:
        return sum(len(w) for w in self._waiting.values())

    def running(self) -> int:
        return len(self._slots)

    def layer_of(self, key: Hashable) -> int | None:
        """The layer (0-based) a running row runs next; None if it is waiting or gone."""
        return next((layer for k, layer, _ in self._slots.values() if k == key), None)

    def has_work(self) -> bool:
        return bool(self._slots) or any(self._admissible(n) for n in self.lengths)

    def _admissible(self, length: int) -> int:
        return min(len(self._waiting[length]), len(self._free[length]))

    # -- the schedule ------------------------------------------------------------------------
    def _groups(self) -> dict[tuple[int, int], list[tuple[int, int]]]:
        """(length, layer) -> [(arrival, slot)] of the rows in slots."""
        groups = collections.defaultdict(list)
        for (length, slot), (_, layer, arrival) in self._slots.items():
            groups[(length, layer)].append((arrival, slot))
        return groups

    def next_step(self) -> Step | None:
        """The next group by the schedule; None when there is no work."""
        groups = self._groups()
        # (layer, oldest arrival, length) of every group that could run, admissions at layer 0
        candidates = [(layer, min(rows)[0], length) for (length, layer), rows in groups.items()]
        for length in self.lengths:
            if self._admissible(length) and (length, 0) not in groups:
                candidates.append((0, next(iter(self._waiting[length].values())), length))
        if not candidates:
            return None
        admissions = [c for c in candidates if c[0] == 0]
        if self.schedule == "arrivals" and admissions and self.admit_budget_s < math.inf:
            oldest = min((c[1] for c in candidates if c[0] > 0), default=None)
            if oldest is not None and self._clock() - self._since[oldest] > self.admit_budget_s:
                admissions = []   # the rows in flight are late: they go first (deepest first)
        if self.schedule == "shallowest" or (self.schedule == "arrivals" and admissions):
            layer, _, length = min(candidates)   # the shallowest, so admissions first
        else:
            layer, _, length = min(candidates, key=lambda c: (-c[0], c[1]))
        rows = sorted(groups.get((length, layer), []))
        admit = []
        if layer == 0:
            for _ in range(self._admissible(length)):
                key, arrival = self._waiting[length].popitem(last=False)
                slot = self._free[length].pop()
                self._slots[(length, slot)] = (key, 0, arrival)
                admit.append((key, slot))
                rows.append((arrival, slot))
        return Step(length, layer, tuple(slot for _, slot in rows), tuple(admit))

    def complete(self, step: Step, exited: Sequence[bool]) -> list[tuple[int, Hashable]]:
        """After `step` ran: `exited[i]` for `step.slots[i]`. Exited rows free their slots, the
        others move to the next layer. -> (i, key) of the rows that exited."""
        if len(exited) != len(step.slots):
            raise ValueError(f"{len(exited)} exit flags for a step of {len(step.slots)} rows")
        out = []
        for i, (slot, gone) in enumerate(zip(step.slots, exited)):
            key, layer, arrival = self._slots[(step.length, slot)]
            if layer != step.layer:
                raise ValueError(f"slot {slot} of pool {step.length} is at layer {layer}, the step ran {step.layer}")
            if gone or layer + 1 >= self.num_layers:  # the last layer always exits
                del self._slots[(step.length, slot)]
                del self._since[arrival]
                self._free[step.length].append(slot)
                out.append((i, key))
            else:
                self._slots[(step.length, slot)] = (key, layer + 1, arrival)
        return out
