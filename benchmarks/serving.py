"""The serving benchmark (`train.benchmark_serve`): one server process per mode on 127.0.0.1, an
open-loop Poisson sweep of offered rates against each, capacity under a p99 SLO, and the report
(JSON, a markdown table, a latency-against-load plot).

The report (markdown and plot) is `benchmarks.serving_report`.

Modes: `full_depth` (the same server at threshold 0: a standard dynamic-batching server),
`early_exit` (the model directory's exit policy), `torch` (eager PyTorch at full depth with
dynamic batching), `onnxruntime` (the same twin exported to ONNX Runtime, likewise). All servers
start first (each idle while another is measured); then each offered rate runs every mode in turn,
so that drifts in other load on a shared machine land on all modes alike. After the sweep, one
more point at 60% of the full-depth capacity is run for the full-depth and early-exit servers (the
median-latency target's load).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import resource
import subprocess
import time
from typing import Callable, Sequence

import numpy as np

from benchmarks import harness as bench_harness
from benchmarks import loadgen

MODES = ("full_depth", "early_exit", "torch", "onnxruntime", "early_exit_unshadowed")
MODE_NAMES = {"full_depth": "JAX, full depth (threshold 0)", "early_exit": "JAX, early exit (policy threshold)",
              "torch": "eager PyTorch, full depth", "onnxruntime": "ONNX Runtime, full depth",
              "early_exit_unshadowed": "JAX, early exit, no shadow rows (--shadow-share 0)"}
SHADOW_COST_TARGET = 0.05   # capacity shadowing may cost at the server's default share
BASELINES = ("torch", "onnxruntime")   # engines without early exit: `train.serve --backend NAME`
ORT_CAPACITY_TARGET = 1.5   # early exit's capacity against an ONNX Runtime server at full depth
READY_TIMEOUT_S = 600
HOST = "127.0.0.1"   # the benchmark never talks to anything else


def server_args(mode: str, model_dir: str, max_seq_length: int, schedule: str | None = None,
                length_spacing: str | None = None) -> list[str]:
    """`train.serve`'s arguments for `mode`; `schedule` (the JAX modes') None: the server's default;
    `length_spacing` (every mode's padded lengths) None: the server's default."""
    args = ["--checkpoint", model_dir, "--host", HOST, "--port", "0", "--max-seq-length", str(max_seq_length)]
    if length_spacing:
        args += ["--length-spacing", length_spacing]
    if mode == "full_depth":
        args += ["--threshold", "0", "--rule", "entropy"]
    elif mode in BASELINES:
        args += ["--backend", mode]
    elif mode == "early_exit_unshadowed":
        args += ["--shadow-share", "0"]
    if schedule and mode not in BASELINES:
        args += ["--schedule", schedule]
    return args


def start_server(command: Sequence[str], env: dict, say: Callable[[str], None]) -> tuple[subprocess.Popen, int, list[str]]:
    """Starts `command` (a `train.serve` process) -> (process, port, its lines up to `ready:`)."""
    proc = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.monotonic() + READY_TIMEOUT_S
    for line in proc.stdout:
        line = line.rstrip("\n")
        lines.append(line)
        say(f"  server: {line}")
        match = re.match(rf"ready: http://{re.escape(HOST)}:(\d+) ", line)
        if match:
            return proc, int(match.group(1)), lines
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"the server did not become ready: {' | '.join(lines[-3:])}")


def stop_server(proc: subprocess.Popen) -> int:
    """SIGTERM (the drain) -> its exit status."""
    proc.send_signal(signal.SIGTERM)
    try:
        status = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        status = proc.wait()
    proc.stdout.close()
    return status


def measure(port: int, texts: Sequence[str], labels, reference, rate: float, *, duration_s: float,
            max_requests: int, seed: int, first_index: int) -> dict:
    """One `loadgen.open_loop` run at `rate` -> its summary row (with the load average before it)."""
    load = bench_harness.load_average()
    cpu, wall = _cpu_seconds(), time.perf_counter()
    outcomes = asyncio.run(loadgen.open_loop(HOST, port, texts, rate, duration_s, max_requests=max_requests,
                                             seed=seed, first_index=first_index))
    cpu, wall = _cpu_seconds() - cpu, time.perf_counter() - wall
    row = loadgen.summarize(outcomes, rate, duration_s, labels, reference)
    row["load_average_before"] = load
    # The load generator shares the machine with the server: what it used of it, in cores.
    row["loadgen_cpu_s"], row["loadgen_cores"] = round(cpu, 3), round(cpu / wall, 3) if wall > 0 else None
    return row


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (the load generator) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def model_label(model_dir: str, root: str | None = None) -> str:
    """How the report names `model_dir`: its path relative to `root` (default: the current
    directory) when inside it, else a placeholder (the report names no path outside the checkout)."""
    root = os.path.abspath(root or os.getcwd())
    path = os.path.abspath(model_dir)
    if os.path.commonpath([root, path]) == root:
        return os.path.relpath(path, root)
    return "MODEL_DIR"


def name_model(text: str, model_dir: str, label: str) -> str:
    """`text` (a command, a server's line) with the model directory, as given or absolute, written `label`."""
    forms = {os.fspath(model_dir), os.path.normpath(model_dir), os.path.abspath(model_dir)}
    for form in sorted(forms, key=len, reverse=True):   # the longest first: one may contain another
        text = re.sub(r"(?<![\w./-])" + re.escape(form.rstrip("/")) + r"(?![\w.-])", lambda m: label, text)
    return text


def _far_past(row: dict, slo_ms: float) -> bool:
    return bool(row["errors"]) or row["p99_ms"] > 4 * slo_ms


def reference_answers(model_dir: str, texts: Sequence[str], threshold: float, rule: str,
                      max_seq_length: int) -> list[tuple[int, int]]:
    """(label_id, exit_layer) per text from `train.predict`'s own path at that threshold."""
    from deebert_jax.data import glue as data
    from deebert_jax.inference import predict
    from deebert_jax.weights.checkpoint import load_checkpoint
    config, params = load_checkpoint(model_dir)
    arrays, _ = predict.encode(data.load_tokenizer(model_dir), [(t, None) for t in texts], max_seq_length,
                               config.vocab_size)
    probs, exits, _ = predict.predict_arrays(config, params, arrays, threshold, rule)
    return [(int(np.argmax(p)), int(e)) for p, e in zip(probs, exits)]


def run(model_dir: str, texts: Sequence[str], labels, *, server_command: Sequence[str], env: dict,
        rates: Sequence[float], duration_s: float, max_requests: int, slo_ms: float, max_seq_length: int,
        modes: Sequence[str] = MODES, seed: int = 0, say: Callable[[str], None] = print,
        schedule: str | None = None, label: str | None = None, repeats: int = 1,
        length_spacing: str | None = None) -> dict:
    """The whole benchmark -> the result dict (`serving_report.write_outputs` writes it). `schedule`: the JAX
    servers' (None: their default); `label`: how the result names `model_dir` (`model_label`);
    `repeats`: each rate measured that many times (every mode in turn each time), so that each
    capacity comes with its spread; `length_spacing`: every server's padded lengths (None: their default)."""
    from deebert_jax.inference.model_dir import resolve_threshold
    from deebert_jax.weights.checkpoint import load_checkpoint
    config, _ = load_checkpoint(model_dir)
    L = config.num_hidden_layers
    threshold, rule, note = resolve_threshold(model_dir, None, None, L)
    label = label or model_label(model_dir)
    note = name_model(note, model_dir, label)
    say(f"early exit: {note}")
    references = {"early_exit": reference_answers(model_dir, texts, threshold, rule, max_seq_length),
                  "full_depth": reference_answers(model_dir, texts, 0.0, "entropy", max_seq_length)}
    for baseline in BASELINES:
        references[baseline] = references["full_depth"]
    references["early_exit_unshadowed"] = references["early_exit"]
    result = {"environment": bench_harness.environment(bench_harness.available_cpus(), "cpu"),
              "model": label, "layers": L, "threshold": threshold, "schedule": schedule,
              "rule": rule, "threshold_note": note, "max_seq_length": max_seq_length, "texts": len(texts),
              "rates": list(rates), "duration_s": duration_s, "max_requests": max_requests, "slo_p99_ms": slo_ms,
              "repeats": repeats, "length_spacing": length_spacing or "power-of-two", "modes": {}}
    servers = {}
    try:
        for mode in modes:  # all up first, then each rate runs every mode in turn (interleaved)
            say(f"== starting {MODE_NAMES[mode]}")
            servers[mode] = start_server([*server_command, *server_args(mode, model_dir, max_seq_length, schedule,
                                                                                length_spacing)],
                                         env, lambda line: say(name_model(line, model_dir, label)))
        rows = {mode: [] for mode in modes}
        bad = {mode: 0 for mode in modes}

        def one(mode, rate, k, repeat=0):
            row = measure(servers[mode][1], texts, labels, references[mode], rate, duration_s=duration_s,
                          max_requests=max_requests, seed=seed + k + 1000 * repeat, first_index=k * 997)
            row["repeat"] = repeat
            rows[mode].append(row)
            say(f"  {mode} {rate:g} req/s{f' (repeat {repeat + 1} of {repeats})' if repeats > 1 else ''}: achieved {row['achieved_rps']:g}, p50 {row['p50_ms']:g} ms, "
                f"p99 {row['p99_ms']:g} ms, errors {row['errors']}, mean exit {row['mean_exit_layer']}, "
                f"accuracy {row['accuracy']}")
            time.sleep(1.0)  # let the queue empty
            return row

        for k, rate in enumerate(rates):
            # A mode two rates in a row far past the SLO only queues more at higher rates: skipped.
            live = [m for m in modes if bad[m] < 2]
            if not live:
                break
            say(f"== {rate:g} req/s")
            far = {mode: True for mode in live}
            for repeat in range(repeats):
                for mode in live:
                    far[mode] &= _far_past(one(mode, rate, k, repeat), slo_ms)
            for mode in live:   # far past the SLO on every repeat
                bad[mode] = bad[mode] + 1 if far[mode] else 0
        full_capacity = _median_capacity(rows.get("full_depth", []), slo_ms)
        if full_capacity and {"full_depth", "early_exit"} <= set(modes):
            extra = round(0.6 * full_capacity, 1)
            say(f"== 60% of the full-depth capacity: {extra:g} req/s")
            for mode in ("full_depth", "early_exit"):
                one(mode, extra, len(rates))
    finally:
        status = {mode: stop_server(proc) for mode, (proc, _, _) in servers.items()}
    for mode in modes:
        result["modes"][mode] = {"name": MODE_NAMES[mode],
                                 "server_lines": [name_model(line, model_dir, label) for line in servers[mode][2]],
                                 "exit_status": status[mode], "rows": rows[mode],
                                 "capacity_rps": _median_capacity([r for r in rows[mode] if r["offered_rps"] in rates],
                                                                  slo_ms),
                                 "capacity": loadgen.capacity_over_repeats(
                                     [r for r in rows[mode] if r["offered_rps"] in rates], slo_ms)}
        say(f"{MODE_NAMES[mode]}: capacity (p99 <= {slo_ms:g} ms, no errors) {result['modes'][mode]['capacity_rps']} "
            f"req/s; server exit status {status[mode]}")
    result["load_average_after"] = bench_harness.load_average()
    result["targets"] = targets(result)
    return result


def _median_capacity(rows: Sequence[dict], slo_ms: float) -> float | None:
    """The grid capacity, its median over the sweep's repeats (one repeat: the capacity itself)."""
    over = loadgen.capacity_over_repeats(rows, slo_ms)["capacity_rps"]
    return None if over is None else over["median"]


def _sixty_percent_rate(result: dict) -> float | None:
    full = result["modes"].get("full_depth")
    if not full or not full["capacity_rps"]:
        return None
    return round(0.6 * full["capacity_rps"], 1)


def _row_at(rows: Sequence[dict], rate: float) -> dict | None:
    return next((r for r in reversed(rows) if r["offered_rps"] == rate), None)


def targets(result: dict) -> dict:
    """The serving targets, measured: capacity ratios, median latency at 60% load, agreement with predict."""
    modes, L = result["modes"], result["layers"]
    cap = {m: modes[m]["capacity_rps"] for m in modes}
    out: dict = {"capacity_rps": cap}
    ee = modes.get("early_exit")
    if ee:
        exits = [r["mean_exit_layer"] for r in ee["rows"] if r["mean_exit_layer"] is not None]
        saving = 1 - float(np.mean(exits)) / L if exits else None
        out["layer_saving"] = None if saving is None else round(saving, 4)
        if saving is not None and cap.get("full_depth") and cap.get("early_exit"):
            ideal = 1 / (1 - saving)
            out["early_exit_vs_full_depth"] = {"ratio": round(cap["early_exit"] / cap["full_depth"], 3),
                                               "ideal": round(ideal, 3), "target": round(0.85 * ideal, 3)}
        if cap.get("torch") and cap.get("early_exit"):
            out["early_exit_vs_torch"] = {"ratio": round(cap["early_exit"] / cap["torch"], 3), "target": 3.0}
        if cap.get("early_exit_unshadowed") and cap.get("early_exit"):
            out["shadow_cost"] = {"share": round(1 - cap["early_exit"] / cap["early_exit_unshadowed"], 3),
                                  "target": SHADOW_COST_TARGET}
        if cap.get("onnxruntime") and cap.get("early_exit"):
            out["early_exit_vs_onnxruntime"] = {"ratio": round(cap["early_exit"] / cap["onnxruntime"], 3),
                                                "target": ORT_CAPACITY_TARGET}
        rate = _sixty_percent_rate(result)
        if rate and "full_depth" in modes:
            a, b = _row_at(ee["rows"], rate), _row_at(modes["full_depth"]["rows"], rate)
            if a and b:
                out["median_at_60_percent"] = {"rate_rps": rate, "early_exit_p50_ms": a["p50_ms"],
                                               "full_depth_p50_ms": b["p50_ms"],
                                               "ratio": round(a["p50_ms"] / b["p50_ms"], 3), "target": 0.7}
        same = [r.get("same_as_predict") for r in ee["rows"] if r.get("same_as_predict") is not None]
        out["early_exit_same_as_predict"] = {"min": min(same) if same else None, "target": 1.0}
    return out


# ----------------------------------------------------------------------------------------------
# `--quick`: a tiny random model, so the whole benchmark runs in seconds with no data

QUICK_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "film", "was", "is", "good", "bad",
               "very", "not", "a", "plot", "."]


def tiny_model(directory: str, n_texts: int = 64, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """A random 3-layer model with a word-level tokenizer and an entropy exit policy in `directory`
    -> (random texts [n], random labels [n])."""
    import jax
    from transformers import BertTokenizerFast

    from deebert_jax.evaluation import calibration
    from deebert_jax.model import modeling
    from deebert_jax.weights.checkpoint import save_checkpoint
    from deebert_jax.core.config import tiny_config

    config = tiny_config(vocab_size=len(QUICK_WORDS), num_hidden_layers=3, initializer_range=0.5)
    params = modeling.init_params(config, jax.random.PRNGKey(seed))
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(QUICK_WORDS)})
    save_checkpoint(directory, config, params, overwrite=True,
                    write_extra=lambda tmp: tokenizer.save_pretrained(os.path.join(tmp, "tokenizer")))
    calibration.write_exit_policy(directory, {"rule": "entropy", "threshold": 0.6})
    rng = np.random.default_rng(seed)
    words = QUICK_WORDS[5:]
    texts = [" ".join(rng.choice(words, int(rng.integers(2, 12)))) for _ in range(n_texts)]
    return texts, rng.integers(0, 2, n_texts)
