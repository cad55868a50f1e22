"""The main job end to end: convert MiniLM-L6, train both stages, sweep thresholds, time JAX vs PyTorch.

    python -m train.demo --config configs/demo.py [--config.FIELD=VALUE ...]
    python -m train.demo --config configs/glue.py:model=minilm,budget=demo

Each step is one of the project's own commands, printed before it runs so it can be re-run
alone; a second run on the same workdir resumes training and redoes the rest. Ends with one
summary table and the paths of the plots and JSON files. A failed step or missing data ends with
one line `error: ...` and exit status 1 (`--debug`: tracebacks, here and in every step).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import subprocess
import sys
import time

from deebert_jax.commands import cli
from deebert_jax.commands.config_file import add_config_argument, parse_args_with_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__.split("\n\n")[0])
    add_config_argument(parser, default="configs/demo.py", help="demo/training config file (configs/*.py[:ARGS])")
    parser.add_argument(cli.DEBUG_FLAG, action="store_true",
                        help="on an error, show the traceback instead of one line (each step too)")
    return parse_args_with_config(parser, argv, lock_config=False)


COMMANDS: list[str] = []


def source_commit() -> str | None:
    """The checkout's commit (`git describe --always --dirty`: "-dirty" when files differ from it),
    or None outside a git checkout, for run.json: a report names the code behind its numbers."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty", "--abbrev=7"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _run(step: str, cmd: list[str]) -> float:
    line = shlex.join(["python", *cmd[1:]] if cmd[0] == sys.executable else cmd)
    COMMANDS.append(line)
    print(f"\n==> {step}\n$ {line}", flush=True)
    start = time.time()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise ChildProcessError(f"demo: step '{step}' failed (exit {proc.returncode}); see its output above")
    return time.time() - start


def _glue_note(cfg) -> str:
    glue_dir = cfg.get("glue_dir", "") or os.environ.get("GLUE_DIR", "")
    if cfg.task == "synthetic":
        return "synthetic data"
    if glue_dir:
        if not os.path.isdir(glue_dir):
            raise NotADirectoryError(f"demo: GLUE_DIR={glue_dir} is not a directory; point it at the GLUE TSV folder")
        return f"GLUE TSVs from {glue_dir}"
    try:
        from huggingface_hub import HfApi
        HfApi().dataset_info("nyu-mll/glue", timeout=10)
    except Exception as e:
        raise FileNotFoundError("demo: no GLUE data: GLUE_DIR is not set and the datasets hub (nyu-mll/glue) cannot be "
                                f"reached ({type(e).__name__}). Set GLUE_DIR=/path/to/glue (folders SST-2, MRPC, ...)")
    return "GLUE from the datasets hub (nyu-mll/glue)"


def _check_outputs(cfg, workdir: str) -> None:
    """Before any step: what the demo writes (the workdir's files, and the directories convert and
    train replace) is none of what it reads (the init checkpoint, the GLUE files)."""
    from deebert_jax.core.fileutil import check_outputs, with_siblings
    from deebert_jax.data import glue as data

    outputs = {"--config.workdir (run.json)": os.path.join(workdir, "run.json"),
               **with_siblings("--config.workdir (results.json)", os.path.join(workdir, "results.json"), plot=".png"),
               **with_siblings("--config.workdir (bench.json)", os.path.join(workdir, "bench.json"),
                               table=".md", plot=".png")}
    directories = {"--config.workdir (converted)": os.path.join(workdir, "converted"),
                   "--config.workdir (train)": os.path.join(workdir, "train")}
    init = cfg.init_checkpoint if cfg.init_checkpoint not in ("", "random") else None
    glue_dir = cfg.get("glue_dir", "") or os.environ.get("GLUE_DIR", "")
    reads = {}
    if glue_dir and data.TASKS.get(data.canonical_task(cfg.task)) is not None:
        reads = {f"--config.glue_dir ({split})": data.glue_file(cfg.task, split, glue_dir) for split in ("train", "dev")}
    check_outputs(outputs, {"--config.init_checkpoint": init, **reads}, reads={"--config.init_checkpoint": ["."]},
                  directories=directories)


def main(argv=None) -> int:
    if cli.debug_requested():
        os.environ["DEEBERT_DEBUG"] = "1"   # read by every step's command
    return _demo(parse_args(argv))


def _demo(args: argparse.Namespace) -> int:
    from deebert_jax.cpu.process import setup_process
    setup_process()   # process-wide settings, before JAX runs anything
    cfg = args.config
    py = sys.executable
    workdir = os.path.abspath(cfg.workdir)
    config_file, overrides = args.config_file, args.config_overrides
    source = _glue_note(cfg)
    _check_outputs(cfg, workdir)
    os.makedirs(workdir, exist_ok=True)
    timings, started, commit = {}, time.time(), source_commit()

    init = cfg.init_checkpoint
    if init != "random":
        from deebert_jax.weights.model_loading import default_init_checkpoint
        from deebert_jax.data.glue import num_labels
        converted = os.path.join(workdir, "converted")
        timings["convert"] = _run("convert the PyTorch checkpoint", [
            py, "-m", "train.convert", "--pytorch", init or default_init_checkpoint(), "--out", converted,
            "--num-labels", str(num_labels(cfg.task))])
        init = converted
    train_dir = os.path.join(workdir, "train")
    timings["train"] = _run("train: stage 1 (backbone + final ramp), stage 2 (off-ramps)", [
        py, "-m", "train.train", f"--config={config_file}", *overrides, f"--config.workdir={train_dir}",
        f"--config.init_checkpoint={init}"])
    model = os.path.join(train_dir, "model")
    glue = ["--glue-dir", cfg.glue_dir] if cfg.get("glue_dir", "") else []
    eval_limit = ["--limit", str(cfg.eval_limit)] if cfg.get("eval_limit", 0) else []
    results_path = os.path.join(workdir, "results.json")
    timings["evaluate"] = _run("evaluate: every ramp, then the threshold sweep", [
        py, "-m", "train.evaluate", "--checkpoint", model, "--task", cfg.task, "--max-seq-length",
        str(cfg.max_seq_length), "--batch-size", str(cfg.eval_batch_size), "--mode", cfg.eval_mode,
        *glue, *eval_limit, "--out", results_path])
    bench_path = os.path.join(workdir, "bench.json")
    from deebert_jax.evaluation.calibration import with_policy_threshold
    # The threshold training chose (exit_policy.json) is timed too, as the sweep evaluates it.
    bench_thresholds = ",".join(f"{t:g}" for t in with_policy_threshold(cli.floats(str(cfg.bench_thresholds)), model))
    timings["benchmark"] = _run("benchmark: the same weights and sentences through JAX, eager PyTorch and ONNX Runtime", [
        py, "-m", "train.benchmark", "--checkpoint", model, "--task", cfg.task, "--seq-len", str(cfg.max_seq_length),
        "--batch-sizes", str(cfg.bench_batch_sizes), "--thresholds", bench_thresholds,
        "--runs", str(cfg.bench_runs), *glue, "--no-progress", "--out", bench_path])

    from deebert_jax.evaluation.calibration import POLICY_FILE
    from benchmarks.results import format_summary, ramp_pooling, same_set_line, target_line
    with open(results_path) as f:
        results = json.load(f)
    # The threshold train.train chose on its held-out rows (config.calibration_holdout), if any.
    policy_path = os.path.join(model, POLICY_FILE)
    policy = None
    if cfg.get("calibration_holdout", 0) and os.path.isfile(policy_path):
        with open(policy_path) as f:
            policy = json.load(f)
    with open(bench_path) as f:
        bench = json.load(f)
    batch = int(str(cfg.bench_batch_sizes).split(",")[0])
    limit = cfg.get("train_limit", 0)
    print("\n" + "=" * 100)
    print(f"deebert-jax demo: {cfg.task}, {source}; trained on "
          + (f"the first {limit} training examples (train_limit; 0 = all)" if limit else "the full training set")
          + f", length {cfg.max_seq_length}, {cfg.stage1_epochs:g} + {cfg.stage2_epochs:g} epochs; off-ramps read "
          + ("the mean of the tokens" if ramp_pooling(cfg.to_dict()) == "mean" else "the first token"))
    print(f"device: {bench.get('device')}, threads {bench.get('threads')}, precision {bench.get('precision')}")
    print(format_summary(results, bench, batch))
    if policy is not None:
        print(target_line(results, policy=policy))
        print(same_set_line(results) or "")
    else:
        print(target_line(results) or "")
    print("\nfiles:")
    for label, path in [("sweep", results_path), ("sweep plot", os.path.splitext(results_path)[0] + ".png"),
                        ("latency", bench_path), ("latency plot", os.path.splitext(bench_path)[0] + ".png"),
                        ("model", model), ("exit policy", policy_path if policy is not None else "none"),
                        ("training log", os.path.join(train_dir, "metrics.jsonl"))]:
        print(f"  {label:<13} {path}")
    print("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total {time.time() - started:.0f}s")
    # What produced these files, for reports (train.report) that must not type numbers by hand.
    with open(os.path.join(workdir, "run.json"), "w") as f:
        json.dump({"command": shlex.join(["python", "-m", "train.demo", *sys.argv[1:]]), "commit": commit,
                   "steps": COMMANDS,
                   "config": cfg.to_dict(), "data": source, "seconds": timings,
                   "results": results_path, "bench": bench_path, "model": model, "policy": policy},
                  f, indent=2, default=str)
    return 0


entry = functools.partial(cli.run, main)   # `python -m train.demo`: errors as one line


if __name__ == "__main__":
    sys.exit(entry())
