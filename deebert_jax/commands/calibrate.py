"""Choose an early-exit threshold within an accuracy-drop budget and save it with the model.

    python -m train.calibrate --checkpoint DIR --task T --max-drop 1.0 [--rule entropy] [--confidence 0.95]
        [--calibration-split dev-half|train-holdout] [--glue-dir D] [--max-seq-length S] [--limit N] [--out FILE]

Computes every ramp's logits once, picks the threshold with the largest layer saving whose drop
(in points of the task metric, against the full model) stays within `--max-drop` on the
calibration examples, and reports its drop and saving on examples disjoint from them.
`--confidence` adds a Learn-then-Test guarantee on the disagreement with the full model (see
`deebert_jax.evaluation.calibration`). Writes DIR/exit_policy.json (or `--out`), which `train.predict` reads.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from deebert_jax.commands.calibration_data import add_calibration_data_flags, check_length_and_outputs, load_calibration_sets
from deebert_jax.commands.cli import confidence_level, floats, number, run

_confidence = confidence_level
_max_drop = number(lambda v: 0 <= v < float("inf"), "must be a number of points >= 0")


def parse_args(argv):
    from deebert_jax.inference.early_exit import EXIT_RULES

    parser = argparse.ArgumentParser(prog="python -m train.calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="deebert-jax model directory")
    parser.add_argument("--task", required=True, help="GLUE task or synthetic")
    parser.add_argument("--max-drop", type=_max_drop, required=True,
                        help="budget: points of the task metric (accuracy 1.0 = one point) below the full model")
    parser.add_argument("--rule", default="entropy", choices=sorted(EXIT_RULES))
    parser.add_argument("--confidence", type=_confidence, default=None,
                        help="e.g. 0.95: bound the disagreement with the full model at this confidence")
    parser.add_argument("--thresholds", type=floats, default=None,
                        help="the grid to test, safe to aggressive (default: a fixed grid per rule)")
    add_calibration_data_flags(parser)
    parser.add_argument("--out", default=None, help="policy path (default DIR/exit_policy.json)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from deebert_jax.cpu.process import setup_process
    setup_process()   # process-wide settings, before JAX runs anything
    from deebert_jax.evaluation import calibration

    out_dir, filename = ((os.path.dirname(os.path.abspath(args.out)), os.path.basename(args.out)) if args.out
                         else (args.checkpoint, calibration.POLICY_FILE))
    from deebert_jax.core.fileutil import same_path
    # Before the work: --out is neither a directory nor a file this command reads (the model's own
    # policy file, the default, is the one file of the model directory it may replace).
    if args.out and not same_path(args.out, os.path.join(args.checkpoint, calibration.POLICY_FILE)):
        check_length_and_outputs(args, {"--out": args.out})
    task, sets = load_calibration_sets(args)
    n = sets.calibration[1].shape[0]
    if args.confidence is None and n < SMALL_CALIBRATION:
        print(f"warning: {n} calibration examples: the empirical choice on so few is noise, with no guarantee "
              "(--confidence adds one and refuses what so few cannot support)", file=sys.stderr)
    try:
        chosen, tested = calibration.choose_threshold(task, *sets.calibration, args.max_drop, args.rule,
                                                      args.confidence, args.thresholds)
    except calibration.CalibrationError as e:
        raise calibration.CalibrationError(f"{e}; {existing_policy_note(out_dir, filename)}") from None
    reported = calibration.threshold_stats(task, *sets.reported, chosen["threshold"], args.rule)
    policy = calibration.make_policy(task, args.rule, args.max_drop, args.confidence, chosen, tested, reported,
                                     args.calibration_split, sets.calibration[0].shape[0], **sets.extra)
    if args.out:
        os.makedirs(out_dir, exist_ok=True)
    path = calibration.write_exit_policy(out_dir, policy, filename)
    print(calibration.format_summary(policy))
    print(f"wrote {path}")
    return 0


# Below this many calibration examples an empirical (no --confidence) choice gets a warning.
SMALL_CALIBRATION = 200


def existing_policy_note(directory: str, filename: str) -> str:
    """What a refused calibration leaves: the policy file as it was (named, with its threshold and
    budget), or none, so train.predict runs at full depth."""
    import json

    path = os.path.join(directory, filename)
    if not os.path.isfile(path):
        return f"nothing written ({path} does not exist: train.predict and the server run at full depth)"
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        what = (f"rule {old['rule']}, threshold {old['threshold']:g}, budget {old.get('max_drop', '?')} points"
                f"{'' if old.get('confidence') is None else ' at confidence ' + format(old['confidence'], 'g')}"
                f"{', chosen ' + old['chosen_at'] if old.get('chosen_at') else ''}")
    except (OSError, ValueError, KeyError, TypeError):
        what = "unreadable"
    return (f"{path} left as it was ({what}), and train.predict and the server keep using it; "
            f"move it away to run at full depth")


entry = functools.partial(run, main)   # the console script and `python -m`: errors as one line


if __name__ == "__main__":
    sys.exit(entry())
