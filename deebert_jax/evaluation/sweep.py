"""Evaluating a DeeBERT model on a dev set: every ramp alone, and early exit over a threshold sweep.

`evaluate(...)` returns the `results.json` dict:
`{"task", "num_examples", "num_layers", "metric_name", "per_ramp": [{"layer", "metric"}],
  "sweep": [{"threshold", "metric", "mean_exit_layer", "layer_saving", "mean_layers_run",
             "exit_counts", "wall_seconds"}], ...}`
where `exit_counts[l - 1]` is the number of examples that exit at layer l, `layer_saving` is
`1 - mean(exit_layer) / L` and `mean_layers_run` is the mean over compiled loops (one per batch,
or one per device shard of a batch under pmap) of the layers that loop ran, over loops that
held at least one real example.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from deebert_jax.data.validation import check_model_inputs
from deebert_jax.core.errors import InputError
from deebert_jax.core.optional import require
from deebert_jax.data import batching
from deebert_jax.data import glue as data
from deebert_jax.inference import early_exit
from deebert_jax.evaluation import metrics
from deebert_jax.model import layouts
from deebert_jax.model import inference_step
from deebert_jax.core import runtime
from deebert_jax.core.config import DeeBertConfig
from deebert_jax.core.fileutil import atomic_write_text
from deebert_jax.inference.early_exit import ExitResult
from deebert_jax.inference.exit_aware import exit_aware_predict

# The original DeeBERT scripts' entropy sweep.
ENTROPY_THRESHOLDS = (0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
MAX_PROB_THRESHOLDS = (1.0, 0.999, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)
MODES = ("batch", "exit_aware")

Predictor = Callable[[Mapping[str, np.ndarray], float], ExitResult]

def default_thresholds(rule: str, num_layers: int) -> list[float]:
    """From 'never exit early' to 'exit as early as possible' for each rule."""
    if rule == "entropy":
        return list(ENTROPY_THRESHOLDS)
    if rule == "max_prob":
        return list(MAX_PROB_THRESHOLDS)
    if rule == "patience":
        return [float(p) for p in range(num_layers - 1, -1, -1)]
    raise InputError(f"unknown exit rule {rule!r}; expected one of {sorted(early_exit.EXIT_RULES)}")


def make_predictor(config: DeeBertConfig, params, rule: str = "entropy", mode: str = "batch",
                   dtype=jnp.float32, devices: Sequence[jax.Device] | None = None,
                   validate_inputs: bool = True) -> Predictor:
    """A function `(batch dict [B, S] arrays, threshold) -> ExitResult` with params placed once.

    mode "batch": one loop per batch; with several local devices the pmap form, whose loops end
    per device. mode "exit_aware": `exit_aware.exit_aware_predict` (rows compacted as they exit).
    `validate_inputs=False` when the caller checked the whole data set once (as `evaluate` does).
    """
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; expected one of {MODES}")
    if rule not in early_exit.EXIT_RULES:
        raise InputError(f"unknown exit rule {rule!r}; expected one of {sorted(early_exit.EXIT_RULES)}")
    devices, dtype = early_exit.local_devices(devices), jnp.dtype(dtype)
    params = layouts.unstack_params(params)   # once: the loop then reads each layer's weights in place

    def inputs(batch):
        return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]

    if mode == "exit_aware":
        device_params = jax.device_put(params, devices[0])
        return lambda batch, t: exit_aware_predict(config, device_params, *inputs(batch), t, rule, dtype=dtype,
                                                   validate_inputs=validate_inputs)
    if len(devices) > 1:
        replicated = early_exit.replicate_params(params, devices)
        return lambda batch, t: early_exit.early_exit_predict_pmap(config, replicated, *inputs(batch), t, rule,
                                                                   validate_inputs=validate_inputs,
                                                                   dtype=dtype, devices=devices)
    device_params = jax.device_put(params, devices[0])
    return lambda batch, t: early_exit.early_exit_predict(config, device_params, *inputs(batch), t, rule, dtype=dtype,
                                                          validate_inputs=validate_inputs)


# ----------------------------------------------------------------------------------------------
# Every ramp on every example (no exiting): the training loop's dev eval and `evaluate`'s per-ramp table

def make_logits_step(config: DeeBertConfig, dtype=jnp.float32) -> Callable:
    """-> `logits(params, batch) -> [L, b, K]` (every ramp; full depth, eval mode)."""
    def logits(params, batch):
        return inference_step.forward(config, params, batch["input_ids"], batch["attention_mask"],
                                batch["token_type_ids"], dtype)
    return logits


@functools.lru_cache(maxsize=8)
def pmapped_logits_step(config: DeeBertConfig, dtype=jnp.float32, devices: tuple | None = None):
    return jax.pmap(make_logits_step(config, dtype), axis_name=runtime.AXIS, devices=devices)


def _split_devices(devices: tuple, batch_size: int) -> tuple:
    """The most of `devices` a batch of `batch_size` rows splits over evenly (all of them on a
    multi-host slice, where the pmap spans every host's devices)."""
    if jax.process_count() > 1:
        return devices
    return devices[:max(d for d in range(1, len(devices) + 1) if batch_size % d == 0)]


def ramp_logits_and_labels(config: DeeBertConfig, params, arrays: Mapping[str, np.ndarray], batch_size: int,
                           dtype=jnp.float32, progress: bool = False,
                           devices: Sequence[jax.Device] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every ramp on every example of `arrays` (this host's rows; gathered over hosts), batches of
    `batch_size` split over the local `devices` by `pmap` -> (logits [L, N, K] float, labels [N])."""
    devices = _split_devices(early_exit.local_devices(devices), batch_size)
    step = pmapped_logits_step(config, jnp.dtype(dtype), runtime.pmap_devices(devices))
    replicated = runtime.replicate(layouts.unstack_params(params), devices)
    outputs = []
    for batch in tqdm(batching.eval_batches(arrays, batch_size), desc="per-ramp", disable=not progress, leave=False,
                      total=-(-data.num_examples(arrays) // batch_size)):
        valid = batch.pop("valid")
        outputs.append((step(replicated, batching.shard(batch, len(devices))), batch["labels"], valid))
    if not outputs:
        return np.zeros((config.num_hidden_layers, 0, config.num_labels), np.float32), np.zeros((0,), np.int32)
    # [D, L, b, K] per batch -> [rows, L, K], rows in batch order (device d holds rows d*b..d*b+b-1)
    logits = np.concatenate([np.asarray(z).transpose(0, 2, 1, 3).reshape(len(y), config.num_hidden_layers, -1)
                             for z, y, _ in outputs])
    rows = {"logits": logits, "labels": np.concatenate([y for _, y, _ in outputs])}
    rows = runtime.gather_over_hosts(rows, np.concatenate([v for _, _, v in outputs]))
    return rows["logits"].transpose(1, 0, 2), rows["labels"]


def all_ramp_logits(config: DeeBertConfig, params, arrays: Mapping[str, np.ndarray], batch_size: int,
                    dtype=jnp.float32, progress: bool = False,
                    devices: Sequence[jax.Device] | None = None) -> np.ndarray:
    """Every ramp on every example (no exiting): [L, N, K] float32."""
    return ramp_logits_and_labels(config, params, arrays, batch_size, dtype, progress, devices)[0]


def ramp_metrics(task: str, ramp_logits: np.ndarray, labels: np.ndarray) -> list[dict]:
    """[L, N, K] logits -> every metric of each ramp alone (`metrics.compute_metrics`), ramp 1 first."""
    return [metrics.compute_metrics(task, labels, np.argmax(z, -1)) for z in ramp_logits]


def per_ramp_metrics(task: str, ramp_logits: np.ndarray, labels: np.ndarray) -> list[dict]:
    """[L, N, K] logits -> [{"layer": l (1-based), "metric": task metric of ramp l alone}]."""
    name = metrics.metric_name(task)
    return [{"layer": layer + 1, "metric": m[name]} for layer, m in enumerate(ramp_metrics(task, ramp_logits, labels))]


def evaluate_ramps(config: DeeBertConfig, params, arrays: Mapping[str, np.ndarray], task: str,
                   batch_size_per_device: int, *, devices: Sequence[jax.Device] | None = None,
                   progress: bool = False) -> dict:
    """Every ramp's metrics on `arrays` (this host's rows; gathered over hosts), the training loop's
    dev eval -> {"num_examples": N, "ramps": [metrics of ramp 1, ..., ramp L]}. Each example counts once."""
    devices = early_exit.local_devices(devices)
    logits, labels = ramp_logits_and_labels(config, params, arrays, batch_size_per_device * len(devices),
                                            progress=progress, devices=devices)
    return {"num_examples": int(labels.shape[0]), "ramps": ramp_metrics(task, logits, labels)}


def exit_predictions(predict: Predictor, arrays: Mapping[str, np.ndarray], threshold: float, batch_size: int,
                     progress_bar=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Early exit over the whole set -> (logits [N, K], exit_layer [N], layers_run per loop)."""
    results = []
    for batch in batching.eval_batches(arrays, batch_size):
        results.append((predict(batch, threshold), batch["valid"]))   # dispatch all before reading any
        if progress_bar is not None:
            progress_bar.update(1)
    results = jax.device_get(results)
    logits = np.concatenate([r.logits[valid] for r, valid in results])
    exit_layer = np.concatenate([r.exit_layer[valid] for r, valid in results])
    layers_run = np.concatenate([np.atleast_1d(r.layers_run) for r, _ in results])
    return logits, exit_layer, layers_run


def sweep_point(task: str, num_layers: int, threshold: float, labels: np.ndarray, logits: np.ndarray,
                exit_layer: np.ndarray, layers_run: np.ndarray, wall_seconds: float) -> dict:
    scores = metrics.compute_metrics(task, labels, np.argmax(logits, -1))
    mean_exit = float(np.mean(exit_layer))
    point = {
        "threshold": float(threshold),
        "metric": scores[metrics.metric_name(task)],
        "mean_exit_layer": mean_exit,
        "layer_saving": 1.0 - mean_exit / num_layers,
        # Loops over padding only (the tail of the last batch) run 0 layers: not counted.
        "mean_layers_run": float(np.mean(layers_run[layers_run > 0])),
        "exit_counts": np.bincount(exit_layer, minlength=num_layers + 1)[1:num_layers + 1].tolist(),
        "wall_seconds": float(wall_seconds),
    }
    point.update({k: v for k, v in scores.items() if k != metrics.metric_name(task)})
    return point


def sweep_thresholds(predict: Predictor, task: str, num_layers: int, arrays: Mapping[str, np.ndarray],
                     thresholds: Sequence[float], batch_size: int, progress: bool = True) -> list[dict]:
    """One sweep point per threshold (see the module docstring); compiles before the clock starts."""
    batches = -(-data.num_examples(arrays) // batch_size)
    first = next(batching.eval_batches(arrays, batch_size))
    jax.block_until_ready(predict(first, thresholds[0]))   # compile outside the timed region
    points = []
    with tqdm(total=batches * len(thresholds), desc="threshold sweep", disable=not progress) as bar:
        for threshold in thresholds:
            bar.set_postfix(threshold=threshold)
            start = time.perf_counter()
            logits, exit_layer, layers_run = exit_predictions(predict, arrays, threshold, batch_size, bar)
            wall = time.perf_counter() - start
            points.append(sweep_point(task, num_layers, threshold, arrays["labels"], logits, exit_layer,
                                      layers_run, wall))
    return points


def evaluate(config: DeeBertConfig, params, arrays: Mapping[str, np.ndarray], task: str,
             thresholds: Sequence[float] | None = None, rule: str = "entropy", batch_size: int = 32,
             mode: str = "batch", dtype=jnp.float32, devices: Sequence[jax.Device] | None = None,
             progress: bool = True) -> dict:
    """Per-ramp metrics and the early-exit sweep on `arrays` (data.load_split output) -> results dict."""
    n = data.num_examples(arrays)
    if n == 0:
        raise InputError(f"task {task}: no examples to evaluate")
    if batch_size <= 0:
        raise InputError(f"batch_size={batch_size} must be positive")
    L = config.num_hidden_layers
    thresholds = default_thresholds(rule, L) if thresholds is None else [float(t) for t in thresholds]
    if not thresholds:
        raise InputError("no thresholds to sweep")
    for t in thresholds:
        early_exit.check_threshold(t, rule)
        if not math.isfinite(t):
            raise InputError(f"threshold {t}: a sweep's thresholds must be finite (results.json is strict JSON); "
                             "for entropy any value above ln(num_labels) already exits every row at ramp 1")
    # Once for the whole set, before anything compiles (the per-batch loops then skip nothing).
    check_model_inputs(config, arrays["input_ids"], arrays["attention_mask"], arrays["token_type_ids"])
    labels = arrays["labels"]
    if labels.max(initial=0) >= config.num_labels:
        raise InputError(f"task {task}: label {int(labels.max())} does not fit a model with "
                         f"num_labels={config.num_labels}")
    # No more devices than rows per batch: batch size 1 (the paper's setting) is a plain jit loop.
    devices = early_exit.local_devices(devices)[:batch_size]
    ramp_logits, ramp_labels = ramp_logits_and_labels(config, params, arrays, batch_size, dtype, progress, devices)
    per_ramp = per_ramp_metrics(task, ramp_logits, ramp_labels)
    predict = make_predictor(config, params, rule, mode, dtype, devices, validate_inputs=False)
    sweep = sweep_thresholds(predict, task, L, arrays, thresholds, batch_size, progress)
    return {
        "task": data.canonical_task(task),
        "num_examples": n,
        "num_layers": L,
        "metric_name": metrics.metric_name(task),
        "per_ramp": per_ramp,
        "sweep": sweep,
        "rule": rule,
        "mode": mode,
        "batch_size": batch_size,
        "num_devices": len(devices) if mode == "batch" else 1,
        "dtype": jnp.dtype(dtype).name,
        "backend": jax.default_backend(),
    }


def format_table(results: Mapping) -> str:
    """The per-ramp metrics and the sweep as plain-text tables."""
    name, L = results["metric_name"], results["num_layers"]
    lines = [f"{results['task']}: {results['num_examples']} examples, {L} layers, rule {results.get('rule', 'entropy')}",
             "", f"{'layer':>5}  {name:>12}"]
    lines += [f"{r['layer']:>5}  {r['metric']:>12.4f}" for r in results["per_ramp"]]
    lines += ["", f"{'threshold':>9}  {name:>12}  {'exit layer':>10}  {'saving':>7}  {'layers run':>10}  "
                  f"{'seconds':>8}  exit counts (layer 1..{L})"]
    for p in results["sweep"]:
        lines.append(f"{p['threshold']:>9.4g}  {p['metric']:>12.4f}  {p['mean_exit_layer']:>10.3f}  "
                     f"{p['layer_saving']:>7.1%}  {p['mean_layers_run']:>10.3f}  {p['wall_seconds']:>8.3f}  "
                     f"{' '.join(str(c) for c in p['exit_counts'])}")
    return "\n".join(lines)


def plot_results(results: Mapping, path: str | os.PathLike) -> str:
    """PNG: metric against layer saving over the sweep; each ramp's metric against its layer."""
    # Plotting is the only use of matplotlib (the `plot` extra), so it loads here.
    matplotlib = require("matplotlib", "plot", "the evaluation's plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = results["metric_name"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    sweep = results["sweep"]
    saving = [100 * p["layer_saving"] for p in sweep]
    left.plot(saving, [p["metric"] for p in sweep], "o-")
    for p, x in zip(sweep, saving):
        left.annotate(f"{p['threshold']:g}", (x, p["metric"]), textcoords="offset points", xytext=(3, 4), fontsize=7)
    left.axhline(results["per_ramp"][-1]["metric"], color="gray", ls="--", lw=1, label="full model (ramp L)")
    left.set(xlabel="layer saving (%)", ylabel=name,
             title=f"{results['task']}: early exit ({results.get('rule', 'entropy')} threshold labelled)")
    left.legend(loc="best", fontsize=8)
    layers = [r["layer"] for r in results["per_ramp"]]
    right.plot(layers, [r["metric"] for r in results["per_ramp"]], "s-")
    right.set(xlabel="layer", ylabel=name, title="each ramp alone", xticks=layers)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(results: Mapping, out: str | os.PathLike) -> tuple[str, str]:
    """Writes `out` (JSON) and the plot beside it (`out` with .png) -> (json path, png path)."""
    out = os.fspath(out)
    atomic_write_text(out, json.dumps(results, indent=2, allow_nan=False))   # strict JSON: no NaN or Infinity
    return out, plot_results(results, os.path.splitext(out)[0] + ".png")
