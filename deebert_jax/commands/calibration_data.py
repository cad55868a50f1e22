"""The calibration data flags and loading that `calibrate` shares with the research commands
(`train.compare_rules`): which examples choose a threshold, which report it, and the checks made
before any work."""

from __future__ import annotations

import sys

from deebert_jax.commands.cli import DEV_MAX_SEQ_LENGTH, add_dev_data_flags, positive_int


def add_calibration_data_flags(parser) -> None:
    """Which examples calibrate and which are reported (`train.calibrate`, `train.compare_rules`)."""
    from deebert_jax.evaluation.calibration import CALIBRATION_SPLITS

    parser.add_argument("--calibration-split", default="dev-half", choices=CALIBRATION_SPLITS,
                        help="dev-half: a seeded half of dev calibrates, the other half is reported; "
                             "train-holdout: the last --calibration-size train rows calibrate, dev is reported")
    parser.add_argument("--calibration-size", type=positive_int, default=1000, help="rows for train-holdout")
    parser.add_argument("--seed", type=int, default=0, help="the dev-half split's seed")
    add_dev_data_flags(parser, default_length=None)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--no-progress", action="store_true")


def check_length_and_outputs(args, outputs) -> None:
    """Before the work: no output is a file this command reads, and --max-seq-length fits the model."""
    from deebert_jax.core.fileutil import check_outputs
    from deebert_jax.data import glue as data
    from deebert_jax.inference.model_dir import resolve_max_seq_length
    from deebert_jax.weights.checkpoint import MODEL_DIR_FILES, read_model_config

    task = data.canonical_task(args.task)
    read = {f"--glue-dir ({split})": data.glue_file(task, split, args.glue_dir)
            for split in ("train", "dev") if args.glue_dir and data.TASKS[task] is not None}
    check_outputs(outputs, {"--checkpoint": args.checkpoint, **read}, reads={"--checkpoint": MODEL_DIR_FILES})
    config = read_model_config(args.checkpoint)
    tokenizer = None if data.TASKS[task] is None else data.load_tokenizer(args.checkpoint, config)
    resolve_max_seq_length(args.max_seq_length, config, args.checkpoint, tokenizer, fallback=DEV_MAX_SEQ_LENGTH)


def load_calibration_sets(args):
    """The flags of `add_calibration_data_flags` (+ --checkpoint, --task) -> (task, CalibrationSets)."""
    from deebert_jax.evaluation import calibration
    from deebert_jax.inference.model_dir import open_model_dir

    model = open_model_dir(args.checkpoint, task=args.task)
    config, params, task, tokenizer = model.config, model.params, model.task, model.tokenizer
    if args.calibration_split == "train-holdout":
        calibration.check_clear_of_temperature_rows(args.checkpoint, args.calibration_size)
        from deebert_jax.weights.checkpoint import TRAINING_FILE, training_rows
        if training_rows(args.checkpoint) is None and task != "synthetic":
            print(f"warning: {args.checkpoint}/{TRAINING_FILE} does not say which rows the model was trained on; "
                  f"train-holdout assumes the last {args.calibration_size} training rows were not among them",
                  file=sys.stderr)
    # Default: the length the model was trained at (what its exit_policy.json is then checked at).
    args.max_seq_length, why = model.max_seq_length(args.max_seq_length, fallback=DEV_MAX_SEQ_LENGTH)
    if why != "given":
        print(f"max sequence length {args.max_seq_length}: {why}", file=sys.stderr)
    return task, calibration.calibration_sets(config, params, task, tokenizer, split=args.calibration_split,
                                              seed=args.seed, calibration_size=args.calibration_size,
                                              glue_dir=args.glue_dir, max_seq_length=args.max_seq_length,
                                              limit=args.limit, batch_size=args.batch_size,
                                              progress=not args.no_progress, model_dir=args.checkpoint)
