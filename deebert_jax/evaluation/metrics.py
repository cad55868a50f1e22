"""GLUE metrics over numpy arrays of labels and predictions."""

from __future__ import annotations

import numpy as np

# Task -> the metric we report first (the paper's: F1 for MRPC and QQP, MCC for CoLA).
TASK_METRIC = {"sst2": "accuracy", "mrpc": "f1", "rte": "accuracy", "qnli": "accuracy",
               "qqp": "f1", "mnli": "accuracy", "cola": "matthews_corr"}


def accuracy(labels, preds) -> float:
    labels, preds = np.asarray(labels), np.asarray(preds)
    return float((labels == preds).mean()) if labels.size else float("nan")


def f1(labels, preds) -> float:
    """Binary F1 of the positive class (label 1)."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    tp = float(((preds == 1) & (labels == 1)).sum())
    fp = float(((preds == 1) & (labels != 1)).sum())
    fn = float(((preds != 1) & (labels == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews_corr(labels, preds) -> float:
    labels, preds = np.asarray(labels), np.asarray(preds)
    tp = float(((preds == 1) & (labels == 1)).sum())
    tn = float(((preds == 0) & (labels == 0)).sum())
    fp = float(((preds == 1) & (labels == 0)).sum())
    fn = float(((preds == 0) & (labels == 1)).sum())
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denom) if denom else 0.0


METRICS = {"accuracy": accuracy, "f1": f1, "matthews_corr": matthews_corr}


def metric_name(task: str) -> str:
    return TASK_METRIC.get(task.lower().replace("-", ""), "accuracy")


def compute_metrics(task: str, labels, preds) -> dict[str, float]:
    """All metrics that apply to `task`; the task's main one under its name."""
    out = {"accuracy": accuracy(labels, preds)}
    name = metric_name(task)
    if name != "accuracy":
        out[name] = METRICS[name](labels, preds)
    return out
