"""Convert a PyTorch BERT / DeeBERT / RoBERTa / DeeRoBERTa checkpoint into a deebert-jax (orbax) checkpoint.

    python -m train.convert --pytorch PATH --out DIR [--num-labels K] [--seed S] [--overwrite]

Prints what was imported and what was initialised. On bad input its last line, `error: ...`,
names the file or key at fault and the exit status is 1 (`--debug`: the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys

from deebert_jax.commands import cli


def main(argv=None) -> int:
    """-> exit status: 0, 1 on a project error (one line on stderr), 2 on bad flags."""
    return cli.run(_main, argv)


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pytorch", required=True, help="model directory: config.json + model.safetensors or pytorch_model.bin")
    parser.add_argument("--out", required=True, help="output directory (deebert-jax orbax checkpoint)")
    parser.add_argument("--num-labels", type=cli.positive_int, default=None, help="classes; default: from the checkpoint, else 2")
    parser.add_argument("--seed", type=int, default=0, help="seed for heads the checkpoint does not have")
    parser.add_argument("--no-tokenizer", action="store_true", help="do not copy the tokenizer files")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even if it is not an earlier deebert-jax checkpoint")
    args = parser.parse_args(argv)
    from deebert_jax.cpu.process import setup_process
    setup_process()   # process-wide settings, before JAX runs anything

    from deebert_jax.weights.checkpoint import is_checkpoint_dir, save_checkpoint
    from deebert_jax.weights.convert import convert_pytorch_checkpoint
    from deebert_jax.weights.torch_files import resolve_model_dir
    from deebert_jax.data.glue import has_tokenizer, load_tokenizer
    from deebert_jax.core.fileutil import check_output_path

    # Before any work: --out must not hold the user's files or overlap the source.
    check_output_path(args.out, sources=[args.pytorch], is_ours=is_checkpoint_dir, overwrite=args.overwrite)
    config, params, report = convert_pytorch_checkpoint(args.pytorch, args.num_labels, seed=args.seed)
    source_dir = resolve_model_dir(args.pytorch)
    # The source's fast tokenizer (WordPiece or RoBERTa's BPE) goes beside the weights, so
    # evaluation needs only `--out`; loaded before anything is written, so a broken one stops here.
    # One that cannot tokenise for this model (no vocabulary, another padding id) is refused here.
    tokenizer = None if args.no_tokenizer or not has_tokenizer(source_dir) else load_tokenizer(source_dir, config)
    copy = None if tokenizer is None else (
        lambda tmp_dir: tokenizer.save_pretrained(os.path.join(tmp_dir, "tokenizer")))
    # The tokenizer goes inside the same atomic rename as the weights.
    out = save_checkpoint(args.out, config, params, write_extra=copy, overwrite=args.overwrite,
                          sources=[source_dir])
    tokenizer_note = ("not copied" if args.no_tokenizer else
                      os.path.join(out, "tokenizer") if copy else f"none found in {source_dir}")
    print(report.summary())
    print(f"tokenizer:   {tokenizer_note}")
    print(f"saved:       {out}")
    return 0


entry = main   # the console script and `python -m`: `main` prints its own errors


if __name__ == "__main__":
    sys.exit(entry())
