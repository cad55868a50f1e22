"""Evaluate a deebert-jax checkpoint on a dev set: each ramp alone, then an early-exit threshold sweep.

    python -m train.evaluate --checkpoint DIR --task T [--thresholds 0,0.001,...] [--rule entropy]
        [--batch-size B] [--mode batch|exit_aware] [--glue-dir D] [--max-seq-length S] [--limit N]
        --out results.json

Prints a table, writes `results.json` and a PNG beside it (metric against layer saving, and each
ramp's metric against its layer). GLUE tasks are tokenised with DIR/tokenizer (or DIR); the
`synthetic` task needs no tokenizer. Bad input: one line `error: ...` naming what is at fault and
exit status 1 (`--debug`: the traceback).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from deebert_jax.commands import cli
from deebert_jax.commands.cli import positive_int  # noqa: F401 (importable from here, as before)
from deebert_jax.core.optional import check_installed


def parse_thresholds(text: str) -> list[float]:
    """'0,0.001 0.005' -> [0.0, 0.001, 0.005]."""
    values = []
    for item in text.replace(",", " ").split():
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--thresholds: {item!r} is not a number") from None
        if math.isnan(value) or value < 0:
            raise argparse.ArgumentTypeError(f"--thresholds: {item!r} must be a number >= 0")
        if math.isinf(value):
            raise argparse.ArgumentTypeError(f"--thresholds: {item!r} must be finite (results.json is strict JSON)")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError("--thresholds: no values given")
    return values


def dev_file(task: str, glue_dir: str | None) -> dict[str, str]:
    """{"--glue-dir": the dev file read} for a GLUE task read from a folder, else {}."""
    from deebert_jax.data import glue as data
    try:
        name = data.canonical_task(task)
    except data.DataError:
        return {}   # refused with its own message when the model is loaded
    return {"--glue-dir": data.glue_file(name, "dev", glue_dir)} if glue_dir and data.TASKS[name] else {}


def main(argv=None) -> int:
    """-> exit status: 0, 1 on a project error (one line on stderr), 2 on bad flags."""
    return cli.run(_main, argv)


def _main(argv) -> int:
    from deebert_jax.evaluation.sweep import MODES
    from deebert_jax.inference.early_exit import EXIT_RULES

    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="deebert-jax checkpoint directory (save_checkpoint)")
    parser.add_argument("--task", required=True, help="GLUE task (sst2, mrpc, rte, qnli, qqp, mnli, cola) or synthetic")
    parser.add_argument("--thresholds", type=parse_thresholds, default=None,
                        help="comma-separated; default for entropy: 0,0.001,0.005,0.01,0.05,0.1,...,0.7, "
                             "plus CHECKPOINT/exit_policy.json's threshold when it is for --rule")
    parser.add_argument("--rule", default="entropy", choices=sorted(EXIT_RULES))
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--mode", default="batch", choices=MODES,
                        help="batch: one loop per batch (pmap over local devices); exit_aware: rows compacted as they exit")
    cli.add_dev_data_flags(parser, "evaluate only the first N dev examples", default_length=None)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--out", required=True, help="results JSON path; the PNG goes beside it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    check_installed(("matplotlib",), "plot", "deebert-evaluate's plot beside --out")   # before the work, not after
    from deebert_jax.cpu.process import setup_process
    setup_process()   # process-wide settings, before JAX runs anything

    from deebert_jax.data import glue as data
    from deebert_jax.evaluation import sweep as evaluation
    from deebert_jax.inference.exit_policy import with_policy_threshold
    from deebert_jax.core.fileutil import check_outputs, with_siblings
    from deebert_jax.inference.model_dir import open_model_dir
    from deebert_jax.weights.checkpoint import MODEL_DIR_FILES

    # Before the evaluation, not after it: the JSON and its PNG are neither directories nor files it reads.
    check_outputs(with_siblings("--out", args.out, plot=".png"),
                  {"--checkpoint": args.checkpoint, **dev_file(args.task, args.glue_dir)},
                        reads={"--checkpoint": MODEL_DIR_FILES})
    model = open_model_dir(args.checkpoint, task=args.task)
    config, params, task, tokenizer = model.config, model.params, model.task, model.tokenizer
    args.max_seq_length, why = model.max_seq_length(args.max_seq_length, fallback=cli.DEV_MAX_SEQ_LENGTH)
    if why != "given":
        print(f"max sequence length {args.max_seq_length}: {why}", file=sys.stderr)
    # A calibrated threshold (train.calibrate) joins the default sweep, so its point is on the curve.
    thresholds = args.thresholds or with_policy_threshold(
        evaluation.default_thresholds(args.rule, config.num_hidden_layers), args.checkpoint, args.rule)
    arrays = data.load_split(task, "dev", glue_dir=args.glue_dir, tokenizer=tokenizer,
                             max_seq_length=args.max_seq_length, limit=args.limit, vocab_size=config.vocab_size)
    print(f"{task} dev: {data.describe(arrays)}", file=sys.stderr)
    results = evaluation.evaluate(config, params, arrays, task, thresholds=thresholds, rule=args.rule,
                                  batch_size=args.batch_size, mode=args.mode, dtype=args.dtype,
                                  progress=not args.no_progress)
    results["checkpoint"] = os.path.abspath(args.checkpoint)
    json_path, png_path = evaluation.write_results(results, args.out)
    print(evaluation.format_table(results))
    print(f"\nwrote {json_path} and {png_path}")
    return 0


entry = main   # the console script and `python -m`: `main` prints its own errors


if __name__ == "__main__":
    sys.exit(entry())
