"""Classify text with a deebert-jax model, exiting early (exit-aware batching).

    python -m train.predict --checkpoint DIR (--text "..." [--text-pair "..."] | --input FILE)
        [--threshold X] [--rule entropy] [--batch-size N] [--max-seq-length S] [--out preds.jsonl]

FILE is `.txt` (one text a line), `.tsv` (one or two text columns; a header naming `text` /
`sentence` / `sentence1` / `text_a` and optionally `text_pair` / `sentence2` / `text_b` columns
is allowed) or `.jsonl` (`{"text": ..., "text_pair": ...}`). Writes one JSON line per example
(label, label_id, probabilities, exit_layer, truncated) to `--out`, else to stdout; notes and
the summary go to stderr. Without `--threshold`: DIR/exit_policy.json (`train.calibrate`), else
the full depth. Without `--max-seq-length`: the length the model was trained at (DIR/training.json),
else the longest its positions cover; a longer one is refused. A text the model cannot see whole
is `"truncated": true`. An empty or malformed line is an error naming the file and line; nothing
is written (the file is read through once before any prediction), and `--out` may not be
`--input` or a file of DIR. Memory stays bounded whatever the file's length: examples are read,
tokenised, run and written a chunk at a time (`inference.predict.predict_stream`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Iterable, Mapping

from deebert_jax.commands.cli import positive_int, run
from deebert_jax.core.fileutil import atomic_write_lines


def parse_args(argv):
    from deebert_jax.inference.early_exit import EXIT_RULES

    parser = argparse.ArgumentParser(prog="python -m train.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="deebert-jax model directory with its tokenizer/")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="one text to classify")
    source.add_argument("--input", help="a .txt, .tsv or .jsonl file of texts")
    parser.add_argument("--text-pair", help="the second text of a pair (with --text)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="default: DIR/exit_policy.json, else the full depth")
    parser.add_argument("--rule", default=None, choices=sorted(EXIT_RULES),
                        help="default: the exit policy's rule, else entropy")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="rows per exit-aware pool")
    parser.add_argument("--max-seq-length", type=positive_int, default=None,
                        help="longer inputs are truncated; default: the length the model was trained at, "
                             "else the longest its positions cover (and at most the tokenizer's model_max_length)")
    parser.add_argument("--out", default=None, help="predictions JSONL (default: stdout)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.text_pair is not None and args.text is None:
        parser.error("--text-pair needs --text")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from deebert_jax.cpu.process import setup_process
    setup_process()   # process-wide settings, before JAX runs anything
    from deebert_jax.core.fileutil import check_outputs
    from deebert_jax.data import text_inputs
    from deebert_jax.inference import predict
    from deebert_jax.inference.model_dir import open_model_dir
    from deebert_jax.weights.checkpoint import MODEL_DIR_FILES

    # Before anything is read: --out may be neither a directory nor what this command reads.
    check_outputs({"--out": args.out}, {"--input": args.input, "--checkpoint": args.checkpoint},
                        reads={"--checkpoint": MODEL_DIR_FILES})
    if args.input:
        # Read through once, one line at a time, before any prediction: a bad line anywhere is
        # refused with nothing written; the second pass streams the examples to the model.
        total = sum(1 for _ in text_inputs.iter_inputs(args.input))
        examples = text_inputs.iter_inputs(args.input)
    else:
        examples = [(text_inputs.check_text(args.text, "--text"),
                     None if args.text_pair is None else text_inputs.check_text(args.text_pair, "--text-pair"))]
        total = 1
    model = open_model_dir(args.checkpoint)
    config = model.config
    max_seq_length, why = model.max_seq_length(args.max_seq_length)
    threshold, rule, note = model.threshold(args.threshold, args.rule, max_seq_length=max_seq_length)
    print(note, file=sys.stderr)
    if why != "given":
        print(f"max sequence length {max_seq_length}: {why}", file=sys.stderr)
    tally = predict.Tally()
    records = predict.predict_stream(config, model.params, model.tokenizer, examples, max_seq_length, threshold,
                                     model.label_names, rule, args.batch_size, tally=tally, total=total,
                                     progress=bool(args.input) and not args.no_progress)
    if args.out:
        print(f"wrote {write_jsonl(records, args.out)}", file=sys.stderr)
    else:
        sys.stdout.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    print(tally_summary(tally, config.num_hidden_layers, max_seq_length), file=sys.stderr)
    return 0


def write_jsonl(records: Iterable[Mapping], path: str | os.PathLike) -> str:
    """The records as they come (a list or a generator), atomically: nothing appears at `path`
    until every line is written, and memory does not grow with their number."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return atomic_write_lines(path, (json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def summary(exit_layer, num_layers: int, seconds: float, truncated, max_seq_length: int) -> str:
    """The line on stderr after the predictions ([N] numpy exit layers and truncation flags)."""
    return _summary(len(exit_layer), float(exit_layer.sum()), num_layers, seconds, int(truncated.sum()),
                    max_seq_length)


def tally_summary(tally, num_layers: int, max_seq_length: int) -> str:
    """`summary` from a `predict.Tally` (what `predict_stream` counted)."""
    return _summary(tally.examples, tally.exit_layers, num_layers, tally.seconds, tally.truncated, max_seq_length)


def _summary(n: int, exit_sum: float, num_layers: int, seconds: float, truncated: int, max_seq_length: int) -> str:
    mean_exit = exit_sum / max(n, 1)
    return (f"{n} examples in {seconds:.2f} s ({n / max(seconds, 1e-9):.1f} examples/s, compilation included); "
            f"mean exit layer {mean_exit:.2f} of {num_layers}, layer saving {1 - mean_exit / num_layers:.1%}; "
            f"{truncated} truncated to {max_seq_length} tokens")


entry = functools.partial(run, main)   # the console script and `python -m`: errors as one line


if __name__ == "__main__":
    sys.exit(entry())
