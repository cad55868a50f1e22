"""The drift benchmark (`train.benchmark_drift`): traffic like the calibration rows, then traffic
unlike them, replayed through the server's own live check (`serving.drift.DriftCheck`, the
shadow draw of `serving.engine.Engine`), once per `--on-drift` action.

Every ramp's logits are computed once per sentence (`sweep.all_ramp_logits`), so the label a row
is answered with at any threshold, and its full-depth label, are what the server's engine and its
shadow lane give that row (`tests/test_serve_engine.py` checks that the engine answers exactly as
`exit_aware_predict`, and the lane reports the final ramp's label). A replay is then a stream of
requests drawn with replacement from the sentences: a shared seeded draw picks the shadow rows,
and each action changes the threshold the later requests are answered at.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from deebert_jax.evaluation.calibration import exit_layers, exit_logits
from deebert_jax.serving.drift import ON_DRIFT, DriftCheck


class Answers:
    """One stream's sentences: [L, N, K] ramp logits -> labels and exit layers at any threshold (cached)."""

    def __init__(self, ramp_logits: np.ndarray, rule: str):
        self.logits, self.rule = np.asarray(ramp_logits, np.float32), rule
        self.full = self.logits[-1].argmax(-1)
        self._at: dict[float, tuple[np.ndarray, np.ndarray]] = {}

    def at(self, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """-> (labels [N], exit layers [N]) answered at `threshold`."""
        if threshold not in self._at:
            exits = exit_layers(self.logits, threshold, self.rule)
            self._at[threshold] = (exit_logits(self.logits, exits).argmax(-1), exits)
        return self._at[threshold]

    def disagreement(self, threshold: float) -> float:
        return float(np.mean(self.at(threshold)[0] != self.full))


def replay(streams: Sequence[tuple[Answers, int]], *, rule: str, threshold: float, num_layers: int, budget: float,
           confidence: float, grid: Sequence[float], on_drift: str, share: float, seed: int) -> dict:
    """`streams`: (sentences, requests) in order. -> the alarms (request index, threshold broken),
    and per stream part (before the first alarm / after it): requests, disagreement of the served
    answers with the full model, mean exit layer."""
    served = {"threshold": float(threshold)}
    check = DriftCheck(rule=rule, threshold=threshold, num_layers=num_layers, budget=budget, confidence=confidence,
                       grid=grid, on_drift=on_drift, set_threshold=lambda t: served.update(threshold=float(t)),
                       say=lambda line: None)
    rng = np.random.default_rng(seed)
    alarms, parts, index = [], [], 0
    for s, (answers, requests) in enumerate(streams):
        picks = rng.integers(0, len(answers.full), size=requests)
        shadowed = rng.random(requests) < share
        tallies = {"before_alarm": [0, 0, 0], "after_alarm": [0, 0, 0]}   # requests, disagreeing, layers
        for pick, shadow in zip(picks, shadowed):
            labels, exits = answers.at(served["threshold"])
            label, full = int(labels[pick]), int(answers.full[pick])
            tally = tallies["after_alarm" if alarms else "before_alarm"]
            tally[0] += 1
            tally[1] += label != full
            tally[2] += int(exits[pick])
            if shadow:
                before = len(check.alarms)
                check.record(label, full, int(exits[pick]))
                if len(check.alarms) > before:
                    alarms.append({"request": index, "stream": s, **check.alarms[-1]})
            index += 1
        for name, (n, bad, layers) in tallies.items():
            if n:
                parts.append({"stream": s, "part": name, "requests": n, "disagreement": bad / n,
                              "mean_exit_layer": layers / n})
    return {"on_drift": on_drift, "seed": seed, "alarms": alarms, "parts": parts,
            "final_threshold": served["threshold"], "shadow_rows": check.shadow_rows}


def run(streams: Sequence[tuple[str, Answers, int]], *, rule: str, threshold: float, num_layers: int, budget: float,
        confidence: float, grid: Sequence[float], share: float, replays: int, seed: int = 0,
        actions: Sequence[str] = ON_DRIFT, progress: Callable[[str], None] = lambda line: None) -> dict:
    """Every action over `replays` seeded replays (the same seeds for every action) -> the result
    dict: each stream's disagreement at the policy threshold, and per action the replays and their
    summary (false alarms before the shift, requests from the shift to the alarm)."""
    shift_at = streams[0][2]
    result = {"rule": rule, "threshold": threshold, "budget": budget, "confidence": confidence, "share": share,
              "replays": replays, "streams": [{"name": name, "requests": n, "sentences": len(a.full),
                                               "disagreement_at_policy": a.disagreement(threshold),
                                               "mean_exit_layer_at_policy": float(a.at(threshold)[1].mean())}
                                              for name, a, n in streams],
              "actions": {}}
    for action in actions:
        runs = []
        for r in range(replays):
            runs.append(replay([(a, n) for _, a, n in streams], rule=rule, threshold=threshold, num_layers=num_layers,
                               budget=budget, confidence=confidence, grid=grid, on_drift=action, share=share,
                               seed=seed + r))
            progress(f"{action}: replay {r + 1} of {replays}")
        first = [run_["alarms"][0]["request"] if run_["alarms"] else None for run_ in runs]
        false = sum(f is not None and f < shift_at for f in first)
        delays = [f - shift_at for f in first if f is not None and f >= shift_at]
        after = [p for run_ in runs for p in run_["parts"] if p["part"] == "after_alarm"]
        result["actions"][action] = {
            "runs": runs, "false_alarms": false, "detected": len(delays),
            "requests_to_alarm": ({"median": float(np.median(delays)), "min": int(min(delays)), "max": int(max(delays))}
                                  if delays else None),
            "after_alarm_disagreement": float(np.mean([p["disagreement"] for p in after])) if after else None,
            "after_alarm_mean_exit_layer": float(np.mean([p["mean_exit_layer"] for p in after])) if after else None,
            "final_thresholds": sorted({run_["final_threshold"] for run_ in runs})}
    return result


def markdown(result: dict, command: str, num_layers: int) -> str:
    lines = [f"```bash\n{command}\n```", ""]
    lines += ["| stream | requests | sentences | disagreement at the policy threshold | mean exit layer |",
              "|---|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['requests']} | {s['sentences']} | {s['disagreement_at_policy']:.2%} | "
              f"{s['mean_exit_layer_at_policy']:.2f} of {num_layers} |" for s in result["streams"]]
    lines += ["", f"Threshold {result['threshold']:g} ({result['rule']}), budget {result['budget']:g} at confidence "
              f"{result['confidence']:g}, {result['share']:.0%} of requests shadowed, {result['replays']} replays:", "",
              "| --on-drift | false alarms before the shift | alarms after it | requests from the shift to the alarm, "
              "median (min-max) | served after the alarm: disagreement | mean exit layer | threshold at the end |",
              "|---|---|---|---|---|---|---|"]
    for action, a in result["actions"].items():
        delay = a["requests_to_alarm"]
        fmt = lambda v, spec: "-" if v is None else format(v, spec)
        lines.append(f"| {action} | {a['false_alarms']} | {a['detected']} | "
                     + (f"{delay['median']:.0f} ({delay['min']}-{delay['max']})" if delay else "-")
                     + f" | {fmt(a['after_alarm_disagreement'], '.2%')} | {fmt(a['after_alarm_mean_exit_layer'], '.2f')} | "
                     f"{', '.join(f'{t:g}' for t in a['final_thresholds'])} |")
    return "\n".join(lines) + "\n"
