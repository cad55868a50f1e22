"""Logits -> the scored label lists the Hugging Face APIs answer with (no HTTP here).

Text Embeddings Inference (`core/src/infer.rs`, `router/src/http/server.rs`): softmax over the
labels (a sigmoid for a one-label model) unless `raw_scores`, every label, sorted by score from
the highest (its sort is ascending and then reversed, so tied labels come last id first), each
`{"score": f32, "label": name}`. The Inference API's text classification: the same list as
`{"label", "score"}`, cut to `top_k`. Scores are float32 written as their shortest float32
decimal, as serde writes TEI's f32 (0.9978709, not 0.9978709220886230).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def scores(logits: np.ndarray, function: str) -> np.ndarray:
    """[K] logits -> [K] float32 scores: "softmax", "sigmoid" or "none" (the logits)."""
    z = np.asarray(logits, np.float32)
    if function == "none":
        return z
    if function == "sigmoid":
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
    if function != "softmax":
        raise ValueError(f"function {function!r}")
    e = np.exp(z - z.max())
    return (e / e.sum()).astype(np.float32)


def f32(x) -> float:
    """A float32 as the shortest decimal that reads back as that float32."""
    return float(str(np.float32(x)))


def ranked(row_scores: np.ndarray, names: Sequence[str], top_k: int | None = None,
           score_first: bool = True) -> list[dict]:
    """[K] scores -> [{"score", "label"}] (or {"label", "score"}) from the highest score, at most
    `top_k`. A NaN score is a RuntimeError (TEI answers it as a backend failure)."""
    if np.isnan(row_scores).any():
        raise RuntimeError("score is NaN")
    order = list(reversed(sorted(range(len(names)), key=lambda i: row_scores[i])))
    if top_k is not None:
        order = order[:top_k]
    if score_first:
        return [{"score": f32(row_scores[i]), "label": names[i]} for i in order]
    return [{"label": names[i], "score": f32(row_scores[i])} for i in order]
