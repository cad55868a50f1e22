"""Compare the exit rules at the same drop budgets: each rule's calibrated threshold, measured on held-out examples.

    python -m train.compare_rules --checkpoint DIR --task T --out FILE.json [--plot FILE.png] [--markdown FILE.md]
        [--budgets 0.5,1.0] [--rules entropy,max_prob,patience] [--confidence C]
        [--calibration-split dev-half|train-holdout] [--calibration-size N] [--seed 0] [--glue-dir D]
        [--max-seq-length S] [--limit N]

Computes every ramp's logits once (as `train.calibrate` does), then for each rule and budget
picks the threshold with the largest layer saving within the budget on the calibration examples
(or records the refusal) and measures it on the held-out ones; each rule's held-out trade-off
curve goes with it. Writes strict JSON (`--out`), and on request the Markdown table and the plot;
`train.report --rules FILE.json ...` puts them in RESULTS.md. See `research.rule_comparison`.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys

from deebert_jax.commands.calibration_data import add_calibration_data_flags, check_length_and_outputs, load_calibration_sets
from deebert_jax.core.errors import InputError
from deebert_jax.commands.cli import confidence_level, floats, run


def parse_args(argv):
    from research.rule_comparison import DEFAULT_BUDGETS, DEFAULT_RULES

    parser = argparse.ArgumentParser(prog="python -m train.compare_rules", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="deebert-jax model directory")
    parser.add_argument("--task", required=True, help="GLUE task or synthetic")
    parser.add_argument("--budgets", type=floats, default=list(DEFAULT_BUDGETS),
                        help="drop budgets in points of the task metric, comma-separated (default 0.5,1.0)")
    parser.add_argument("--rules", default=",".join(DEFAULT_RULES),
                        help=f"exit rules, comma-separated (default {','.join(DEFAULT_RULES)})")
    parser.add_argument("--confidence", type=confidence_level, default=None,
                        help="e.g. 0.95: choose with train.calibrate's Learn-then-Test bound")
    add_calibration_data_flags(parser)
    parser.add_argument("--out", required=True, help="the comparison as JSON")
    parser.add_argument("--plot", default=None, help="PNG: held-out saving against held-out drop per rule")
    parser.add_argument("--markdown", default=None, help="the table (and the plot's link) as Markdown")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from deebert_jax.cpu.process import setup_process
    setup_process()   # process-wide settings, before JAX runs anything
    from research import rule_comparison
    from benchmarks.results import relative_paths

    # Every flag and output path checked before the model is read.
    try:
        rules = rule_comparison.check_rules(args.rules.split(","))
    except ValueError as e:
        raise InputError(f"--rules: {e}") from None
    try:
        budgets = rule_comparison.check_budgets(args.budgets)
    except ValueError as e:
        raise InputError(f"--budgets: {e}") from None
    check_length_and_outputs(args, {flag: path for flag, path in (("--out", args.out), ("--plot", args.plot),
                                                                   ("--markdown", args.markdown)) if path is not None})

    task, sets = load_calibration_sets(args)
    result = rule_comparison.compare_rules(task, sets.calibration, sets.reported, rules, budgets, args.confidence)
    result.update({"command": relative_paths(shlex.join(["python", "-m", "train.compare_rules", *argv])),
                   "checkpoint": relative_paths(os.path.abspath(args.checkpoint)),
                   "calibration_split": sets.split, **sets.extra,
                   "max_seq_length": args.max_seq_length, "limit": args.limit})
    paths = rule_comparison.write_outputs(result, args.out, args.plot, args.markdown)
    print(rule_comparison.format_markdown(result), end="")
    print("wrote " + ", ".join(paths.values()))
    return 0


entry = functools.partial(run, main)   # the console script and `python -m`: errors as one line


if __name__ == "__main__":
    sys.exit(entry())
