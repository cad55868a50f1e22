"""One temperature per off-ramp, fitted so that its softmax is the probability of agreeing with
ramp L, folded into the off-ramp's classifier.

The exit guarantee bounds disagreement with ramp L, and an exit rule reads an off-ramp's
confidence; the off-ramps' confidences are on different scales (deeper ones agree with ramp L far
more often than their softmax says). Dividing off-ramp l's logits by T_l, the temperature that
minimises the cross-entropy of ramp L's predicted class under softmax(logits_l / T_l) on held-out
rows, puts them on one scale, so one threshold exits each ramp at a comparable risk. Predictions do
not change (argmax is scale-free); only when an example exits does.

Dividing the classifier's kernel and bias by T_l gives the same logits, so a fitted model is an
ordinary checkpoint: inference, serving and PyTorch export need nothing new. The rows that fit the
temperatures must not also calibrate the threshold, or the threshold family would depend on the
calibration draw and the fixed-sequence guarantee would not hold.
"""

from __future__ import annotations

import numpy as np

CHOICES = ("none", "agreement")

_GRID = np.exp(np.linspace(np.log(0.01), np.log(100.0), 801))   # steps of 1.2%


def _nll(logits: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    z = z - z.max(-1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-log_probs[np.arange(len(targets)), targets].mean())


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """[N, K] logits, [N] int targets -> the T in [0.01, 100] minimising the mean cross-entropy
    of the targets under softmax(logits / T): a log-spaced grid, then golden-section search
    between the best point's neighbours (the loss is unimodal in log T)."""
    logits = np.asarray(logits, np.float64)
    targets = np.asarray(targets)
    if logits.ndim != 2 or len(targets) != len(logits) or len(targets) == 0:
        raise ValueError(f"expected [N, K] logits and [N] targets with N > 0, got {logits.shape} and {targets.shape}")
    losses = [_nll(logits, targets, t) for t in _GRID]
    best = int(np.argmin(losses))
    lo, hi = np.log(_GRID[max(best - 1, 0)]), np.log(_GRID[min(best + 1, len(_GRID) - 1)])
    f = lambda log_t: _nll(logits, targets, float(np.exp(log_t)))
    ratio = (np.sqrt(5.0) - 1) / 2
    for _ in range(40):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        lo, hi = (lo, b) if f(a) <= f(b) else (a, hi)
    return float(np.exp((lo + hi) / 2))


def fit_ramp_temperatures(ramp_logits: np.ndarray) -> np.ndarray:
    """[L, N, K] all-ramp logits of held-out rows -> [L] float32 temperatures: off-ramp l's fits
    ramp L's predicted class; ramp L's own is 1 (every example still in the loop exits there)."""
    ramp_logits = np.asarray(ramp_logits)
    agree_with = ramp_logits[-1].argmax(-1)
    temps = [fit_temperature(ramp_logits[l], agree_with) for l in range(ramp_logits.shape[0] - 1)]
    return np.asarray(temps + [1.0], np.float32)


def scale_ramp_logits(ramp_logits: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """[L, N, K] logits / [L] temperatures (what a model with `apply_ramp_temperatures` computes)."""
    return np.asarray(ramp_logits) / np.asarray(temperatures, np.float32)[:, None, None]


def apply_ramp_temperatures(params: dict, temperatures: np.ndarray) -> dict:
    """Params pytree -> a copy whose ramp l classifier (`ramps/classifier/{kernel [L, H, K],
    bias [L, K]}`) is divided by temperatures[l]; every other leaf is shared, not copied."""
    temps = np.asarray(temperatures, np.float32)
    classifier = params["ramps"]["classifier"]
    num_ramps = classifier["kernel"].shape[0]
    if temps.shape != (num_ramps,) or not np.all(np.isfinite(temps)) or np.any(temps <= 0):
        raise ValueError(f"expected {num_ramps} positive finite temperatures, got {temps.tolist()}")
    scaled = {"kernel": classifier["kernel"] / temps[:, None, None].astype(classifier["kernel"].dtype),
              "bias": classifier["bias"] / temps[:, None].astype(classifier["bias"].dtype)}
    return {**params, "ramps": {**params["ramps"], "classifier": {**classifier, **scaled}}}
