"""The guarantee checked on live traffic: shadow rows' disagreements fed to an anytime-valid bound
(`evaluation.monitoring`), and what the server does when the bound shows the budget broken.

The engine reports each shadow row as (answered label, full-depth label, exit layer)
(`engine.Engine(on_shadow=...)`); `DriftCheck.record` updates the bound. The alarm is its lower
bound above the budget. Then, by `on_drift`:

- `warn`: one line in the log, and the alarm in `/metrics` and `/health`; answers unchanged;
- `full-depth`: the same line, then every later row runs to the last layer;
- `safer`: the same line, then the next safer threshold of the policy's tested grid (entropy: the
  next lower; max_prob and patience: the next higher), and the check starts again for it (the rows
  seen so far were answered at the old threshold); past the grid's safest, full depth.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

from deebert_jax.core.errors import InputError
from deebert_jax.evaluation.monitoring import MonitorState, observe
from deebert_jax.inference.early_exit import full_depth_threshold

ON_DRIFT = ("warn", "full-depth", "safer")
# 2% of rows: at a 1-point budget and twice that rate the alarm comes after about 1,100 shadow rows
# (docs/calibration.md), i.e. within about 55,000 requests, while the lane costs at most 2% more
# layer steps (a shadow row redoes its first layers: under 2% x L layers per answered row).
DEFAULT_SHADOW_SHARE = 0.02
DEFAULT_BUDGET, DEFAULT_CONFIDENCE = 0.01, 0.95   # without an exit policy: one point, 95%


def drift_settings(policy: dict | None, rule: str, threshold: float) -> tuple[float, float, tuple[float, ...], str]:
    """-> (budget as a rate, confidence, the policy's tested thresholds, a note): the policy's when
    the served threshold is the policy's, else one point at 95% and no grid."""
    if policy is not None and policy.get("rule") == rule and float(policy.get("threshold", -1)) == threshold:
        grid = tuple(float(t["threshold"]) for t in policy.get("tested", []) if isinstance(t, dict) and "threshold" in t)
        confidence = policy.get("confidence") or DEFAULT_CONFIDENCE
        budget = float(policy["max_drop"]) / 100.0 if policy.get("max_drop") else DEFAULT_BUDGET
        return budget, confidence, grid, f"the exit policy's budget {budget:g} at confidence {confidence:g}"
    return DEFAULT_BUDGET, DEFAULT_CONFIDENCE, (), (f"budget {DEFAULT_BUDGET:g} at confidence {DEFAULT_CONFIDENCE:g} "
                                                    "(the threshold is not an exit policy's)")


def safer_threshold(rule: str, threshold: float, grid: Sequence[float], num_layers: int) -> float:
    """The next threshold of `grid` that exits later than `threshold` (the full depth past the last)."""
    full = full_depth_threshold(rule, num_layers)
    if rule == "entropy":
        lower = [t for t in grid if full <= t < threshold]
        return max(lower) if lower else full
    higher = [t for t in grid if threshold < t <= full]
    return min(higher) if higher else full


class DriftCheck:
    """Thread-safe: `record` runs on the engine's thread, `snapshot` on the server's."""

    def __init__(self, *, rule: str, threshold: float, num_layers: int, budget: float = DEFAULT_BUDGET,
                 confidence: float = DEFAULT_CONFIDENCE, grid: Sequence[float] = (), on_drift: str = "warn",
                 set_threshold: Callable[[float], None] | None = None, say: Callable[[str], None] = print):
        if on_drift not in ON_DRIFT:
            raise InputError(f"--on-drift {on_drift!r}; expected one of {', '.join(ON_DRIFT)}")
        if on_drift != "warn" and set_threshold is None:
            raise InputError(f"--on-drift {on_drift} needs an engine whose threshold can change")
        self.rule, self.num_layers, self.grid, self.on_drift = rule, num_layers, tuple(grid), on_drift
        self.threshold, self._set_threshold, self._say = float(threshold), set_threshold, say
        self.state = MonitorState(budget, confidence)
        self.alarms: list[dict] = []   # every alarm: the threshold it broke, rows seen, the action
        self.shadow_rows = 0            # over the server's life (the state restarts after `safer`)
        self._lock = threading.Lock()

    def record(self, answered: int, full: int, exit_layer: int) -> None:
        with self._lock:
            self.shadow_rows += 1
            was_quiet = not self.state.alarm
            self.state = observe(self.state, 1, int(answered != full))
            if not (was_quiet and self.state.alarm):
                return
            broken, seen = self.threshold, self.state
            action = self._act()
        self._say(f"drift: the disagreement's lower bound {seen.lower:.4f} rose above the budget "
                  f"{seen.budget:g} at threshold {broken:g} after {seen.rows} shadow rows ({seen.disagreements} "
                  f"disagreeing, shadow row {self.shadow_rows} of the server's); {action}")

    def _act(self) -> str:
        """The `on_drift` action (under the lock) -> what was done, for the log line."""
        broken = self.threshold
        self.alarms.append({"threshold": broken, "rows": self.state.rows, "disagreements": self.state.disagreements,
                            "lower": self.state.lower, "action": self.on_drift, "shadow_row": self.shadow_rows})
        if self.on_drift == "warn":
            action = "answers unchanged (--on-drift warn)"
        else:
            target = (full_depth_threshold(self.rule, self.num_layers) if self.on_drift == "full-depth"
                      else safer_threshold(self.rule, broken, self.grid, self.num_layers))
            self._set_threshold(target)
            self.threshold = target
            action = f"now answering at threshold {target:g} (--on-drift {self.on_drift})"
            if self.on_drift == "safer" and target != full_depth_threshold(self.rule, self.num_layers):
                self.state = MonitorState(self.state.budget, self.state.confidence)   # a new threshold: check anew
                action += "; the check starts again"
        return action

    def snapshot(self) -> dict:
        """What `/health` and `/metrics` show."""
        with self._lock:
            s = self.state
            return {"shadow_rows": self.shadow_rows, "rows": s.rows, "disagreements": s.disagreements,
                    "observed": s.observed, "lower": s.lower, "upper": s.upper, "budget": s.budget,
                    "confidence": s.confidence, "alarm": bool(self.alarms), "threshold": self.threshold,
                    "on_drift": self.on_drift, "alarms": list(self.alarms)}
