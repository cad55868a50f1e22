"""Traffic that drifts: SST-2 dev sentences, then sentences of another kind, replayed through the
server's live check once per --on-drift action.

    python -m train.benchmark_drift --checkpoint DIR [--glue-dir D] [--before 20000] [--after 100000]
        [--shift rte] [--shadow-share 0.02] [--replays 10] [--max-seq-length S] [--seed 0] [--out FILE.json]

The first stream is the task's own dev sentences (SST-2), the second another GLUE task's dev
texts, each text of a pair a request of its own (RTE's news and Wikipedia sentences by default,
on which the demo's policy disagrees with the full model on 2.5%; `--shift shuffled`: the SST-2
sentences with their words shuffled). Every ramp runs once per sentence; the requests are drawn from the sentences with
replacement and shadowed as `train.serve --shadow-share` draws them (see `benchmarks.drift`).
Prints each stream's disagreement at the policy threshold and, per action, the false alarms, the
requests from the shift to the alarm and what was served after it; writes JSON (and .md beside it).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

from deebert_jax.commands.cli import add_dev_data_flags, number, positive_int, run

SHIFTS = ("rte", "qnli", "mrpc", "cola", "shuffled")


def parse_args(argv):
    from deebert_jax.serving.drift import DEFAULT_SHADOW_SHARE
    p = argparse.ArgumentParser(prog="python -m train.benchmark_drift", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="deebert-jax model directory with its exit_policy.json")
    add_dev_data_flags(p, default_length=None)
    p.add_argument("--before", type=positive_int, default=20000, help="requests like the calibration rows")
    p.add_argument("--after", type=positive_int, default=100000, help="requests after the shift")
    p.add_argument("--shift", default="rte", choices=SHIFTS,
                   help="the second stream: another task's dev texts (both texts of a pair), or SST-2's shuffled")
    p.add_argument("--shadow-share", type=number(lambda v: 0 < v <= 1, "must be a share in (0, 1]"),
                   default=DEFAULT_SHADOW_SHARE)
    p.add_argument("--replays", type=positive_int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/drift.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from deebert_jax.cpu.process import setup_process
    setup_process()   # process-wide settings, before JAX runs anything
    import numpy as np
    from benchmarks import drift as bench
    from benchmarks.results import command_line, relative_paths
    from deebert_jax.core.errors import InputError
    from deebert_jax.core.fileutil import atomic_write_text, check_outputs, with_siblings
    from deebert_jax.data import glue
    from deebert_jax.evaluation.sweep import all_ramp_logits
    from deebert_jax.inference import predict
    from deebert_jax.inference.model_dir import open_model_dir
    from deebert_jax.serving.drift import drift_settings
    from deebert_jax.weights.checkpoint import MODEL_DIR_FILES

    if not args.glue_dir:
        raise InputError("--glue-dir (or $GLUE_DIR) is needed for the SST-2 and shifted sentences")
    dev = glue.glue_file("sst2", "dev", args.glue_dir)
    other = None if args.shift == "shuffled" else glue.glue_file(args.shift, "dev", args.glue_dir)
    check_outputs(with_siblings("--out", args.out, table=".md"), {"--checkpoint": args.checkpoint, "--glue-dir (dev)": dev,
                                                                  "--glue-dir (shift)": other},
                  reads={"--checkpoint": MODEL_DIR_FILES})
    model = open_model_dir(args.checkpoint)
    length, _ = model.max_seq_length(args.max_seq_length)
    policy = model.policy(max_seq_length=length)
    if policy is None:
        raise InputError(f"{args.checkpoint}: no exit_policy.json (python -m train.calibrate chooses one): the "
                         "live check tests an exit policy's guarantee")
    rule, threshold = policy["rule"], float(policy["threshold"])
    budget, confidence, grid, _ = drift_settings(policy, rule, threshold)

    def answers(texts):
        arrays, _ = predict.encode(model.tokenizer, [(t, None) for t in texts], length, model.config.vocab_size)
        arrays = {**arrays, "labels": np.zeros(len(texts), np.int32)}
        return bench.Answers(all_ramp_logits(model.config, model.params, arrays, 64, progress=True), rule)

    sst2 = [p[0] for p in glue.read_texts("sst2", "dev", args.glue_dir)[0]]
    if args.shift == "shuffled":
        rng = np.random.default_rng(args.seed)
        shifted, name = [" ".join(rng.permutation(s.split())) for s in sst2], "SST-2 dev, words shuffled"
    else:
        pairs = glue.read_texts(args.shift, "dev", args.glue_dir)[0]
        shifted, name = [text for pair in pairs for text in pair], f"{args.shift.upper()} dev, every text"
    streams = [("SST-2 dev", answers(sst2), args.before), (name, answers(shifted), args.after)]
    result = bench.run(streams, rule=rule, threshold=threshold, num_layers=model.num_layers, budget=budget,
                       confidence=confidence, grid=grid, share=args.shadow_share, replays=args.replays,
                       seed=args.seed, progress=lambda line: print(line, file=sys.stderr, flush=True))
    command = command_line("train.benchmark_drift", sys.argv[1:] if argv is None else argv)
    result.update(command=command, max_seq_length=length, model=relative_paths(args.checkpoint))
    table = bench.markdown(result, command, model.num_layers)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    atomic_write_text(os.path.splitext(args.out)[0] + ".md", table)
    print(table)
    print(f"wrote {relative_paths(args.out)} and its .md", file=sys.stderr)
    return 0


entry = functools.partial(run, main)


if __name__ == "__main__":
    sys.exit(entry())
