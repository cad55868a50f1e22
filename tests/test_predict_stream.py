"""`train.predict` streams: the same bytes as the whole-file path for a file that fits one chunk,
the same answers across chunks, examples read lazily, and nothing written when a late line is bad."""

import json

import numpy as np
import pytest
from test_exit_aware import random_params
from test_serve import CONFIG, TEXTS, save_model

from deebert_jax.data import glue as data
from deebert_jax.data import text_inputs
from deebert_jax.inference import predict
from deebert_jax.weights.checkpoint import load_checkpoint

SEQ = 32
LINES = [TEXTS[i % len(TEXTS)] + " good" * (i % 5) for i in range(40)] + [" ".join(["very bad"] * 30)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("ckpt") / "model", CONFIG, random_params(CONFIG, 4),
                      labels=("negative", "positive"))


def _whole_file_output(model_dir, path, threshold, batch_size):
    """What train.predict wrote before it streamed: the whole file encoded, run and dumped at once."""
    config, params = load_checkpoint(model_dir)
    examples = text_inputs.read_inputs(path)
    arrays, truncated = predict.encode(data.load_tokenizer(model_dir), examples, SEQ, config.vocab_size)
    probs, exits, _ = predict.predict_arrays(config, params, arrays, threshold, "entropy", batch_size)
    records = predict.format_predictions(examples, probs, exits, ["negative", "positive"], truncated)
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def test_a_file_that_fits_gives_the_same_bytes_as_before(model_dir, tmp_path, capsys):
    from train.predict import entry
    (tmp_path / "in.txt").write_text("\n".join(LINES) + "\n")
    args = ["--checkpoint", str(model_dir), "--input", str(tmp_path / "in.txt"), "--threshold", "0.4",
            "--max-seq-length", str(SEQ), "--batch-size", "8", "--no-progress"]
    assert entry(args + ["--out", str(tmp_path / "out.jsonl")]) == 0
    want = _whole_file_output(model_dir, tmp_path / "in.txt", 0.4, 8)
    assert (tmp_path / "out.jsonl").read_bytes() == want
    capsys.readouterr()
    assert entry(args) == 0   # stdout: the same lines
    out = capsys.readouterr()
    assert out.out.encode() == want and "41 examples in" in out.err and "1 truncated to 32 tokens" in out.err


def test_chunks_give_the_answers_of_one_pass(model_dir):
    config, params = load_checkpoint(model_dir)
    tok = data.load_tokenizer(model_dir)
    examples = [(t, None) for t in LINES]
    whole = list(predict.predict_stream(config, params, tok, examples, SEQ, 0.4, ["n", "p"], batch_size=4,
                                        chunk_rows=len(examples)))
    tally = predict.Tally()
    chunked = list(predict.predict_stream(config, params, tok, iter(examples), SEQ, 0.4, ["n", "p"], batch_size=4,
                                          chunk_rows=7, tally=tally))
    assert [(r["text"], r["label"], r["exit_layer"], r["truncated"]) for r in chunked] == \
        [(r["text"], r["label"], r["exit_layer"], r["truncated"]) for r in whole]
    np.testing.assert_allclose([r["probabilities"] for r in chunked], [r["probabilities"] for r in whole], atol=2e-6)
    assert tally.examples == len(LINES) and tally.exit_layers == sum(r["exit_layer"] for r in whole)
    assert tally.truncated == 1


def test_examples_are_read_a_chunk_at_a_time(model_dir):
    config, params = load_checkpoint(model_dir)
    read = []

    def endless():
        while True:
            read.append(1)
            yield "the movie was good", None
    stream = predict.predict_stream(config, params, data.load_tokenizer(model_dir), endless(), SEQ, 0.4, ["n", "p"],
                                    batch_size=4, chunk_rows=8)
    first = [next(stream) for _ in range(10)]
    assert len(first) == 10 and len(read) <= 17   # two chunks read, not the whole (endless) input


def test_a_bad_line_late_in_the_file_writes_nothing(model_dir, tmp_path, capsys):
    from train.predict import entry
    (tmp_path / "in.txt").write_bytes(("good\n" * 5000).encode() + b"ba\xffd\n")
    rc = entry(["--checkpoint", str(model_dir), "--input", str(tmp_path / "in.txt"), "--max-seq-length", str(SEQ),
                "--no-progress"])
    out = capsys.readouterr()
    assert rc == 1 and out.out == ""
    assert out.err.strip().endswith("in.txt: line 5001: not UTF-8 text (invalid start byte at byte 3 of the line)")
