"""How the live check behaves: false alarms and detection delays of the anytime-valid bound,
simulated over many streams of shadow rows, beside the fixed-sample bound repeated after every row.

    python -m train.monitoring_coverage [--budget 0.01] [--confidence 0.95] [--streams 2000]
        [--rows 20000] [--rates 0.5,0.8,1,1.2,1.5,2,3] [--out FILE.json]

Rates are multiples of the budget. Prints a Markdown table (rate, alarm share, median row of the
alarm, for the mixture bound and for the repeated Clopper-Pearson test); `--out` writes it as JSON.
See `deebert_jax.evaluation.monitoring`.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

from deebert_jax.commands.cli import confidence_level, floats, number, positive_int, run
from deebert_jax.core.fileutil import atomic_write_text, check_outputs
from deebert_jax.evaluation.monitoring import PRIOR_STRENGTH, simulate_streams

METHODS = ("mixture", "repeated")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m train.monitoring_coverage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=number(lambda v: 0 < v < 1, "must be a rate in (0, 1)"), default=0.01,
                        help="the disagreement budget as a rate (default 0.01: one point)")
    parser.add_argument("--confidence", type=confidence_level, default=0.95)
    parser.add_argument("--streams", type=positive_int, default=2000)
    parser.add_argument("--rows", type=positive_int, default=20000, help="shadow rows per stream")
    parser.add_argument("--rates", type=floats, default=[0.5, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0],
                        help="true disagreement rates, as multiples of the budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_outputs({"--out": args.out})
    rows = [{method: simulate_streams(multiple * args.budget, args.budget, args.confidence, args.streams, args.rows,
                                      seed=args.seed + i, method=method) for method in METHODS}
            for i, multiple in enumerate(args.rates)]
    print(format_table(rows, args))
    if args.out:
        atomic_write_text(args.out, json.dumps({"prior_strength": PRIOR_STRENGTH, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def format_table(rows, args) -> str:
    delay = lambda r: "-" if r["median_delay"] is None else f"{r['median_delay']:.0f}"
    lines = [f"budget {args.budget:g}, confidence {args.confidence:g}, {args.streams} streams of {args.rows} rows "
             f"(false alarm: a rate at or under the budget; at most {1 - args.confidence:.0%} is valid)", "",
             "| true rate | x budget | alarms, anytime-valid | median row of the alarm | alarms, Clopper-Pearson "
             "after every row | its median row |", "|---|---|---|---|---|---|"]
    for row in rows:
        mix, rep = row["mixture"], row["repeated"]
        lines.append(f"| {mix['rate']:.4g} | {mix['rate'] / args.budget:g} | {mix['alarm_share']:.1%} | {delay(mix)} | "
                     f"{rep['alarm_share']:.1%} | {delay(rep)} |")
    return "\n".join(lines)


entry = functools.partial(run, main)


if __name__ == "__main__":
    sys.exit(entry())
