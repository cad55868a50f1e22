"""`train.predict` and `deebert_jax.inference.predict` on a tiny random model with a tiny WordPiece tokenizer."""

import json
import shutil

import jax
import numpy as np
import pytest

from deebert_jax.evaluation import calibration
from deebert_jax.data import glue as data
from deebert_jax.model import modeling
from deebert_jax.weights.checkpoint import load_checkpoint, save_checkpoint
from deebert_jax.core.config import tiny_config
from deebert_jax.inference.early_exit import early_exit_predict
from train import predict as predict_cli
from train.cli import run

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "film", "was", "is", "good", "bad",
         "very", "not", "a", "plot", "."]
CONFIG = tiny_config(vocab_size=len(WORDS), num_hidden_layers=3, initializer_range=0.5)
SEQ = 16
TEXTS = ["the movie was good", "a very bad film", "the plot is not good .", "good"]
PAIRS = [("the movie was good", "the film was bad"), ("good", "very good")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)})
    params = modeling.init_params(CONFIG, jax.random.PRNGKey(4))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", CONFIG, params,
                           write_extra=lambda tmp: tokenizer.save_pretrained(f"{tmp}/tokenizer"))


def predict_main(model_dir, *argv):
    return run(predict_cli.main, ["--checkpoint", str(model_dir), "--max-seq-length", str(SEQ), "--no-progress", *argv])


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected(model_dir, examples, threshold, rule="entropy"):
    """(probabilities, exit layers) from `early_exit_predict` on the tokenizer's own padded encoding."""
    _, params = load_checkpoint(model_dir)
    tok = data.load_tokenizer(model_dir)
    firsts, seconds = [e[0] for e in examples], [e[1] for e in examples]
    enc = tok(firsts, seconds if seconds[0] is not None else None, truncation=True, max_length=SEQ,
              padding="max_length", return_tensors="np")
    out = early_exit_predict(CONFIG, params, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"],
                             threshold, rule)
    return np.asarray(jax.nn.softmax(out.logits)), np.asarray(out.exit_layer)


def check_records(records, examples, probs, exits):
    assert len(records) == len(examples)
    for r, (text, pair), p, layer in zip(records, examples, probs, exits):
        assert r["text"] == text and r.get("text_pair") == pair
        assert set(r) >= {"label", "label_id", "probabilities", "exit_layer", "truncated"}
        assert r["label"] == f"LABEL_{r['label_id']}" and r["label_id"] == int(np.argmax(r["probabilities"]))
        assert sum(r["probabilities"]) == pytest.approx(1, abs=1e-5)
        np.testing.assert_allclose(r["probabilities"], p, atol=1e-4)
        assert r["exit_layer"] == layer and r["truncated"] is False


def test_files_of_each_format(model_dir, tmp_path, capsys):
    files = {
        "in.txt": "\n".join(TEXTS) + "\n",
        "one.tsv": "\n".join(TEXTS) + "\n",
        "header.tsv": "label\tsentence\n" + "".join(f"1\t{t}\n" for t in TEXTS),
        "jsonl.jsonl": "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)),
    }
    probs, exits = expected(model_dir, [(t, None) for t in TEXTS], 0.35)
    assert len(set(exits.tolist())) >= 2, "the threshold should give different exits"
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        out = tmp_path / (name + ".preds.jsonl")
        assert predict_main(model_dir, "--input", str(tmp_path / name), "--threshold", "0.35", "--out", str(out)) == 0
        check_records(read_jsonl(out), [(t, None) for t in TEXTS], probs, exits)
        err = capsys.readouterr().err
        assert "examples/s" in err and "mean exit layer" in err and "layer saving" in err and "0 truncated" in err


def test_pairs_in_tsv_jsonl_and_on_the_command_line(model_dir, tmp_path, capsys):
    probs, exits = expected(model_dir, PAIRS, 0.35)
    assert len(set(exits.tolist())) == 2
    (tmp_path / "pairs.tsv").write_text("".join(f"{a}\t{b}\n" for a, b in PAIRS))
    header_rows = "".join(f"{i}\t{a}\t{b}\n" for i, (a, b) in enumerate(PAIRS))
    (tmp_path / "header.tsv").write_text("idx\tsentence1\tsentence2\n" + header_rows)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"text": a, "text_pair": b}) + "\n" for a, b in PAIRS))
    for name in ("pairs.tsv", "header.tsv", "pairs.jsonl"):
        out = tmp_path / f"{name}.out.jsonl"
        assert predict_main(model_dir, "--input", str(tmp_path / name), "--threshold", "0.35", "--out", str(out)) == 0
        check_records(read_jsonl(out), PAIRS, probs, exits)
    capsys.readouterr()
    assert predict_main(model_dir, "--text", PAIRS[0][0], "--text-pair", PAIRS[0][1], "--threshold", "0.35") == 0
    check_records([json.loads(capsys.readouterr().out)], PAIRS[:1], probs[:1], exits[:1])
    # Single texts and pairs mixed in one file: each as when alone.
    mixed = [{"text": TEXTS[0]}, {"text": PAIRS[0][0], "text_pair": PAIRS[0][1], "label": 1}]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))
    out = tmp_path / "mixed.out.jsonl"
    assert predict_main(model_dir, "--input", str(tmp_path / "mixed.jsonl"), "--threshold", "0.35", "--out", str(out)) == 0
    one_probs, one_exits = expected(model_dir, [(TEXTS[0], None)], 0.35)
    check_records(read_jsonl(out), [(TEXTS[0], None), PAIRS[0]], [one_probs[0], probs[0]], [one_exits[0], exits[0]])


@pytest.mark.parametrize("name, content, line, message", [
    ("empty.txt", "good\n\nbad\n", 2, "the line is empty"),
    ("blank.txt", "good\n   \n", 2, "the line is empty"),
    ("cols.tsv", "good\tbad\nbad\n", 2, "1 tab-separated columns; expected 2"),
    ("three.tsv", "a\tb\tc\n", 1, "3 tab-separated columns; expected 1 or 2"),
    ("short.tsv", "label\tsentence\n1\tgood\n0\n", 3, "1 columns, the header needs 2"),
    ("emptycol.tsv", "good\t\n", 1, "the second text is empty"),
    ("twoheads.tsv", "text\tsentence\n", 1, "several text columns"),
    ("bad.jsonl", '{"text": "good"}\n{"text": "bad"\n', 2, "not valid JSON"),
    ("notext.jsonl", '{"text": "good"}\n{"sentence": "bad"}\n', 2, 'an object with a "text" key'),
    ("emptytext.jsonl", '{"text": ""}\n', 1, '"text" is empty'),
    ("number.jsonl", '{"text": "a", "text_pair": 3}\n', 1, '"text_pair" must be a string'),
    ("blank.jsonl", '{"text": "a"}\n\n', 2, "empty line"),
])
def test_bad_lines_name_the_file_and_line_and_write_nothing(model_dir, tmp_path, capsys, name, content, line, message):
    path = tmp_path / name
    path.write_text(content)
    out = tmp_path / "out.jsonl"
    assert predict_main(model_dir, "--input", str(path), "--out", str(out)) == 1
    err = capsys.readouterr().err.strip()
    assert err == err.splitlines()[-1] and f"{path}: line {line}: " in err and message in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == [path]


def test_other_input_errors(model_dir, tmp_path, capsys):
    for name, content, message in [("empty.txt", "", "no examples"), ("x.csv", "a\n", "unknown input format")]:
        (tmp_path / name).write_text(content)
        assert predict_main(model_dir, "--input", str(tmp_path / name)) == 1
        assert message in capsys.readouterr().err
    assert predict_main(model_dir, "--input", str(tmp_path / "missing.txt")) == 1
    assert "missing.txt" in capsys.readouterr().err
    assert predict_main(model_dir, "--text", "  ") == 1
    assert "--text is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        predict_main(model_dir, "--text-pair", "x", "--input", str(tmp_path / "empty.txt"))
    assert exit_info.value.code == 2 and "--text-pair needs --text" in capsys.readouterr().err
    assert predict_main(model_dir, "--text", "good", "--threshold", "-1") == 1
    assert "threshold=-1.0" in capsys.readouterr().err


def test_threshold_from_exit_policy_labels_and_truncation(model_dir, tmp_path, capsys):
    assert predict_main(model_dir, "--text", "good") == 0
    captured = capsys.readouterr()
    assert f"no {calibration.POLICY_FILE}" in captured.err and "threshold 0: the full depth" in captured.err
    assert json.loads(captured.out)["exit_layer"] == CONFIG.num_hidden_layers
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    calibration.write_exit_policy(copy, {"rule": "entropy", "threshold": 0.7})
    (copy / "config.json").write_text(json.dumps({"id2label": {"0": "negative", "1": "positive"}}))
    long_text = " ".join(["the very good movie"] * 10)
    (tmp_path / "in.txt").write_text(f"{long_text}\ngood\n")
    out = tmp_path / "preds.jsonl"
    assert predict_main(copy, "--input", str(tmp_path / "in.txt"), "--max-seq-length", "8", "--out", str(out)) == 0
    err = capsys.readouterr().err
    assert "threshold 0.7 from" in err and "1 truncated to 8 tokens" in err
    records = read_jsonl(out)
    assert [r["truncated"] for r in records] == [True, False]
    assert all(r["label"] in ("negative", "positive") for r in records)
    # 0.7 > ln 2: every example exits at the first ramp.
    assert [r["exit_layer"] for r in records] == [1, 1]
    # A given --rule other than the policy's falls back to that rule's full depth.
    assert predict_main(copy, "--text", "good", "--rule", "max_prob") == 0
    assert json.loads(capsys.readouterr().out)["exit_layer"] == CONFIG.num_hidden_layers


@pytest.mark.parametrize("side", ["right", "left"])
def test_encode_cuts_only_rows_that_do_not_fit_as_the_tokenizer_would(model_dir, side):
    """`encode` tokenises each row once and again, cut, only when it is too long: the ids, types
    and truncation flags are still those of the tokenizer's own truncating call, row by row."""
    from deebert_jax.inference import predict

    tok = data.load_tokenizer(model_dir)
    long = " ".join(["the movie was very good"] * 4)
    examples = [(TEXTS[0], None), (long, None), (long, "good"), (PAIRS[0][0], PAIRS[0][1]), ("good", long)]
    arrays, truncated = predict.encode(tok, examples, SEQ, truncation_side=side)
    tok.truncation_side = side
    for i, (first, second) in enumerate(examples):
        want = tok(first, second, truncation=True, max_length=SEQ, return_token_type_ids=True)
        n = len(want["input_ids"])
        assert arrays["input_ids"][i, :n].tolist() == want["input_ids"]
        assert arrays["token_type_ids"][i, :n].tolist() == want["token_type_ids"]
        assert arrays["attention_mask"][i].sum() == n
        assert truncated[i] == (len(tok(first, second)["input_ids"]) > SEQ)
    assert truncated.tolist() == [False, True, True, False, True]
