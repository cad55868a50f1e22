"""What a calibration delivers across many calibration draws: the threshold it picks, the layer
saving and the drop that threshold gives on examples it never saw.

A single `train.calibrate` run is one draw of the calibration examples; its guarantee is a
statement over draws. Here the draw is repeated (numpy over all-ramp logits computed once):
- "train-holdout": each draw is `draw_size` rows sampled without replacement from a pool of
  held-out training rows, and the threshold is reported on the whole dev set;
- "dev-half": each draw is a random halving of dev, calibrated on one half, reported on the other.
A draw whose calibration is refused (nothing certified within the budget) runs at full depth:
saving 0, drop 0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from deebert_jax.evaluation import calibration

SPLITS = ("train-holdout", "dev-half")


def run_draws(task: str, split: str, calibration_pool: tuple[np.ndarray, np.ndarray],
              reported: tuple[np.ndarray, np.ndarray] | None, *, draws: int, draw_size: int | None,
              max_drop: float, confidence: float | None, rule: str = "entropy",
              thresholds: Sequence[float] | None = None, seed: int = 0) -> list[dict]:
    """-> one record per draw: {draw, threshold (None: refused), calibration_saving, saving, drop,
    disagreement, refused}.

    train-holdout: `calibration_pool` = ([L, P, K] logits, [P] labels) of the held-out rows,
    `reported` = dev's. dev-half: `calibration_pool` = dev's, `reported` = None.
    """
    logits, labels = calibration_pool
    n = logits.shape[1]
    rng = np.random.default_rng(seed)
    out = []
    for d in range(draws):
        if split == "dev-half":
            cal_rows, rep_rows = calibration.split_indices(n, int(rng.integers(2 ** 31)))
            rep_logits, rep_labels = logits[:, rep_rows], labels[rep_rows]
        else:
            cal_rows = np.sort(rng.choice(n, size=min(draw_size or n, n), replace=False))
            rep_logits, rep_labels = reported
        record = {"draw": d}
        try:
            chosen, _ = calibration.choose_threshold(task, logits[:, cal_rows], labels[cal_rows], max_drop, rule,
                                                     confidence, thresholds)
        except calibration.CalibrationError:
            out.append({**record, "threshold": None, "calibration_saving": 0.0, "saving": 0.0, "drop": 0.0,
                        "disagreement": 0.0, "refused": True})
            continue
        stats = calibration.threshold_stats(task, rep_logits, rep_labels, chosen["threshold"], rule)
        out.append({**record, "threshold": chosen["threshold"], "calibration_saving": chosen["saving"],
                    "saving": stats["saving"], "drop": stats["drop"], "disagreement": stats["disagreement"],
                    "refused": False})
    return out


def fit_temperatures_on_pool(pool: tuple[np.ndarray, np.ndarray], reported: tuple[np.ndarray, np.ndarray],
                             rows: int) -> tuple[tuple, tuple, np.ndarray]:
    """`config.ramp_temperature="agreement"` replayed on logits: off-ramp temperatures fitted on the
    first `rows` of the pool ([L, P, K], [P]) -> (the other pool rows, `reported`, both scaled,
    and the [L] temperatures). Draws then come from rows the fit never saw."""
    from deebert_jax.evaluation import ramp_temperature

    logits, labels = pool
    if not 0 < rows < logits.shape[1]:
        raise ValueError(f"temperature rows {rows}: expected 1 to {logits.shape[1] - 1} of the {logits.shape[1]}-row pool")
    temps = ramp_temperature.fit_ramp_temperatures(logits[:, :rows])
    scale = lambda x: ramp_temperature.scale_ramp_logits(x, temps)
    return (scale(logits[:, rows:]), labels[rows:]), (scale(reported[0]), reported[1]), temps


def summarize(records: Sequence[dict], max_drop: float) -> dict:
    """Mean, spread and tails of the reported saving and drop over the draws, the refusal rate,
    and how often the reported drop / disagreement broke the budget."""
    saving = np.array([r["saving"] for r in records])
    drop = np.array([r["drop"] for r in records])
    disagreement = np.array([r["disagreement"] for r in records])
    thresholds = [r["threshold"] for r in records if r["threshold"] is not None]
    q = lambda x, p: float(np.percentile(x, p))
    return {
        "draws": len(records),
        "saving": {"mean": float(saving.mean()), "std": float(saving.std()), "min": float(saving.min()),
                   "p5": q(saving, 5), "median": q(saving, 50), "p95": q(saving, 95), "max": float(saving.max())},
        "drop": {"mean": float(drop.mean()), "p95": q(drop, 95), "max": float(drop.max())},
        "disagreement": {"mean": float(disagreement.mean()), "p95": q(disagreement, 95),
                         "max": float(disagreement.max())},
        "refused": float(np.mean([r["refused"] for r in records])),
        "drop_over_budget": float(np.mean(drop > max_drop + 1e-9)),
        "disagreement_over_budget": float(np.mean(disagreement > max_drop / 100 + 1e-12)),
        "thresholds": {str(t): thresholds.count(t) for t in sorted(set(thresholds))},
    }


def format_summary(summary: dict, label: str) -> str:
    s, d = summary["saving"], summary["drop"]
    return (f"{label}: {summary['draws']} draws; layer saving on the reported rows mean {s['mean']:.1%} "
            f"(std {s['std']:.1%}, 5th-95th percentile {s['p5']:.1%}-{s['p95']:.1%}, min {s['min']:.1%}); "
            f"drop mean {d['mean']:.2f} points (95th percentile {d['p95']:.2f}, max {d['max']:.2f}); "
            f"refused {summary['refused']:.1%}; drop over budget in {summary['drop_over_budget']:.1%}, "
            f"disagreement over budget in {summary['disagreement_over_budget']:.1%}")
