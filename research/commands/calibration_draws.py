"""Repeat a calibration over many random draws and report what its threshold gives on unseen rows.

    python -m train.calibration_draws --checkpoint DIR --task sst2 --max-drop 1.0 --confidence 0.95
        [--splits train-holdout,dev-half] [--pool-size 16000] [--draw-size 4000] [--draws 200]
        [--ramp-temperature agreement --temperature-rows 1000]
        [--glue-dir D] [--max-seq-length S] [--seed 0] [--out FILE.json]

train-holdout: each draw samples --draw-size rows from the last --pool-size training rows (rows
the model must not have trained on: `config.calibration_holdout`, or a `train_limit` that stops
before them) and reports the chosen threshold on dev. dev-half: each draw halves dev at random.
Prints one summary line per split and writes every draw to --out. With --ramp-temperature
agreement (train-holdout only), the first --temperature-rows pool rows fit one temperature per
off-ramp (as `config.ramp_temperature` does after training) and the draws come from the rest.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

from deebert_jax.core.errors import InputError

from deebert_jax.commands.cli import (DEV_MAX_SEQ_LENGTH, add_dev_data_flags, confidence_level, floats, number,
                                      positive_int, run)

_max_drop = number(lambda v: 0 <= v < float("inf"), "must be a number of points >= 0")


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer from 0 to 2**63 - 1 (a random seed)")
    return value


def parse_args(argv):
    from research.calibration_draws import SPLITS
    from deebert_jax.inference.early_exit import EXIT_RULES

    p = argparse.ArgumentParser(prog="python -m train.calibration_draws", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="deebert-jax model directory")
    p.add_argument("--task", required=True)
    p.add_argument("--max-drop", type=_max_drop, required=True)
    p.add_argument("--confidence", type=confidence_level, default=None)
    p.add_argument("--rule", default="entropy", choices=sorted(EXIT_RULES))
    p.add_argument("--thresholds", type=floats, default=None,
                   help="the grid to test, safe to aggressive (default: train.calibrate's)")
    p.add_argument("--splits", default="train-holdout,dev-half",
                   type=lambda v: [s for s in v.split(",") if s],
                   help=f"comma-separated, of {', '.join(SPLITS)}")
    p.add_argument("--pool-size", type=positive_int, default=16000, help="train-holdout: the last N training rows")
    p.add_argument("--draw-size", type=positive_int, default=4000, help="train-holdout: rows per draw")
    p.add_argument("--ramp-temperature", default="none", choices=["none", "agreement"],
                   help="fit off-ramp temperatures on the first --temperature-rows pool rows (train-holdout)")
    p.add_argument("--temperature-rows", type=positive_int, default=1000)
    p.add_argument("--draws", type=positive_int, default=200)
    p.add_argument("--seed", type=_seed, default=0)
    add_dev_data_flags(p, default_length=None)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--out", default=None, help="JSON with every draw and the summaries")
    args = p.parse_args(argv)
    bad = [s for s in args.splits if s not in SPLITS]
    if bad or not args.splits:
        p.error(f"--splits {','.join(args.splits)}: expected a comma-separated list of {', '.join(SPLITS)}")
    if "dev-half" in args.splits and args.limit is not None and args.limit < 2:
        p.error(f"--limit {args.limit}: the dev-half split halves dev, so it needs at least 2 rows")
    if args.ramp_temperature != "none":
        if args.splits != ["train-holdout"]:
            p.error("--ramp-temperature fits on training rows the draws do not use: pass --splits train-holdout")
        if args.temperature_rows >= args.pool_size:
            p.error(f"--temperature-rows {args.temperature_rows} leaves no pool rows to draw from "
                    f"(--pool-size {args.pool_size})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from deebert_jax.cpu.process import setup_process
    setup_process()
    import os

    from deebert_jax.core.fileutil import atomic_write_text, check_outputs
    from deebert_jax.inference.model_dir import resolve_max_seq_length
    from deebert_jax.weights.checkpoint import MODEL_DIR_FILES, read_model_config
    from deebert_jax.data import glue as data
    from deebert_jax.evaluation import calibration
    from research import calibration_draws as draws_lib
    from deebert_jax.evaluation import sweep
    from deebert_jax.weights.model_loading import load_model_for_task

    # Before the model is read: --out is neither a directory nor a file this command reads.
    task = data.canonical_task(args.task)
    read = {f"--glue-dir ({split})": data.glue_file(task, split, args.glue_dir)
            for split in ("train", "dev") if args.glue_dir and data.TASKS[task] is not None}
    check_outputs({"--out": args.out}, {"--checkpoint": args.checkpoint, **read},
                  reads={"--checkpoint": MODEL_DIR_FILES})
    # The length the model was trained at (training.json) unless given; one too long refused now.
    config = read_model_config(args.checkpoint)
    args.max_seq_length, why = resolve_max_seq_length(
        args.max_seq_length, config, args.checkpoint,
        None if data.TASKS[task] is None else data.load_tokenizer(args.checkpoint, config), fallback=DEV_MAX_SEQ_LENGTH)
    if why != "given":
        print(f"max sequence length {args.max_seq_length}: {why}", file=sys.stderr)
    config, params, task, tokenizer = load_model_for_task(args.checkpoint, args.task)
    if "train-holdout" in args.splits:   # a model's own fitting rows are not calibration rows
        calibration.check_clear_of_temperature_rows(args.checkpoint, args.pool_size, "--pool-size")
    common = dict(glue_dir=args.glue_dir, tokenizer=tokenizer, max_seq_length=args.max_seq_length,
                  vocab_size=config.vocab_size)
    logits = lambda arrays: sweep.all_ramp_logits(config, params, arrays, args.batch_size, progress=True)
    dev = data.load_split(task, "dev", limit=args.limit, **common)
    if "dev-half" in args.splits and data.num_examples(dev) < 2:
        raise InputError(f"{task} dev: {data.num_examples(dev)} example(s); the dev-half split needs at least 2")
    dev_set = (logits(dev), dev["labels"])
    result = {"command": " ".join(["python", "-m", "train.calibration_draws", *(argv or sys.argv[1:])]),
              "task": task, "max_drop": args.max_drop, "confidence": args.confidence, "rule": args.rule,
              "max_seq_length": args.max_seq_length, "thresholds": args.thresholds, "splits": {}}
    for split in args.splits:
        if split == "train-holdout":
            train = data.load_split(task, "train", **common)   # the pool: its last rows, none trained on
            calibration.check_untrained_tail(args.checkpoint, task, args.pool_size, data.num_examples(train), "--pool-size")
            pool = {k: v[-args.pool_size:] for k, v in train.items()}
            pool_set, reported, setting = (logits(pool), pool["labels"]), dev_set, {"pool_size": args.pool_size}
            if args.ramp_temperature != "none":
                pool_set, reported, temps = draws_lib.fit_temperatures_on_pool(pool_set, dev_set, args.temperature_rows)
                setting["ramp_temperatures"] = {"fit": args.ramp_temperature, "rows": args.temperature_rows,
                                                "temperatures": [round(float(t), 6) for t in temps]}
                print("off-ramp temperatures fitted on the first", args.temperature_rows, "pool rows:",
                      ", ".join(f"{t:.3g}" for t in temps))
            pool_rows = pool_set[1].shape[0]
            records = draws_lib.run_draws(task, split, pool_set, reported, draws=args.draws,
                                          draw_size=args.draw_size, max_drop=args.max_drop,
                                          confidence=args.confidence, rule=args.rule, seed=args.seed,
                                          thresholds=args.thresholds)
            setting.update({"draw_size": min(args.draw_size, pool_rows), "reported": f"dev, {data.num_examples(dev)} rows"})
        else:
            records = draws_lib.run_draws(task, split, dev_set, None, draws=args.draws, draw_size=None,
                                          max_drop=args.max_drop, confidence=args.confidence, rule=args.rule,
                                          seed=args.seed, thresholds=args.thresholds)
            n = data.num_examples(dev)
            setting = {"draw_size": (n + 1) // 2, "reported": f"the other half of dev, {n // 2} rows"}
        summary = draws_lib.summarize(records, args.max_drop)
        result["splits"][split] = {**setting, "summary": summary, "draws": records}
        print(draws_lib.format_summary(summary, f"{split} ({setting['draw_size']} calibration rows, "
                                                f"reported on {setting['reported']})"))
    if args.out:
        path = os.path.abspath(args.out)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_text(path, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


entry = functools.partial(run, main)   # the console script and `python -m`: errors as one line


if __name__ == "__main__":
    sys.exit(entry())
