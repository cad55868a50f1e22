"""Silent wrong answers refused in one line: train-holdout calibration on rows the model trained
on (or more rows than there are), a .tsv whose header names no text column, a damaged labels.json."""

import json
import os

import pytest

from deebert_jax.core.errors import InputError
from deebert_jax.data.glue import DataError
from deebert_jax.evaluation import calibration
from deebert_jax.weights.checkpoint import training_rows, write_training_info

from tests.conftest import word_model_and_glue


def test_train_holdout_refuses_trained_rows_and_missing_rows(tmp_path):
    write_training_info(tmp_path, 16, train_rows=64)
    assert training_rows(tmp_path) == 64
    assert calibration.check_untrained_tail(tmp_path, "sst2", 236, 300)
    with pytest.raises(InputError, match=r"^--calibration-size 280: .* trained on the first 64 of the 300 sst2 "
                                         r"training rows \(training.json\); the last 280 include 44 of them, .* "
                                         r"use at most --calibration-size 236$"):
        calibration.check_untrained_tail(tmp_path, "sst2", 280, 300)
    with pytest.raises(InputError, match=r"^--calibration-size 1000000: the sst2 training split has only 300 rows$"):
        calibration.check_untrained_tail(tmp_path, "sst2", 1000000, 300)
    with pytest.raises(InputError, match="--pool-size 290"):
        calibration.check_untrained_tail(tmp_path, "sst2", 290, 300, "--pool-size")
    # A model trained before training.json said which rows: nothing to check against (the caller warns).
    write_training_info(tmp_path, 16)
    assert training_rows(tmp_path) is None and not calibration.check_untrained_tail(tmp_path, "sst2", 280, 300)


@pytest.fixture(scope="module")
def model_and_glue(tmp_path_factory):
    return word_model_and_glue(tmp_path_factory.mktemp("rows"), train_rows=6, length=16, rows=10)


@pytest.mark.parametrize("size, message", [
    ("5", r"--calibration-size 5: \S*M was trained on the first 6 of the 10 sst2 training rows .* the last 5 include "
          r"1 of them, .* use at most --calibration-size 4$"),
    ("1000000", r"--calibration-size 1000000: the sst2 training split has only 10 rows$")])
def test_calibrate_train_holdout_in_one_line(model_and_glue, capsys, size, message):
    import re

    from train.calibrate import entry
    before = (model_and_glue / "M" / "training.json").read_bytes()
    rc = entry(["--checkpoint", str(model_and_glue / "M"), "--task", "sst2", "--glue-dir", str(model_and_glue / "G"),
                "--max-drop", "1", "--calibration-split", "train-holdout", "--calibration-size", size, "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 1 and len(err) == 1 and re.search(message, err[0]), err
    assert not (model_and_glue / "M" / "exit_policy.json").exists()
    assert (model_and_glue / "M" / "training.json").read_bytes() == before


@pytest.mark.parametrize("header", ["review\tlabel", "id\treview", "text_body\tgold_label"])
def test_a_tsv_header_naming_no_text_column_is_refused(tmp_path, header):
    from deebert_jax.data.text_inputs import read_inputs
    (tmp_path / "in.tsv").write_text(f"{header}\na fine film\t1\n")
    with pytest.raises(DataError, match=r"in\.tsv: line 1: the header \[.*\] names no text column: name the text "
                                        r"column one of text, sentence, sentence1, text_a"):
        read_inputs(tmp_path / "in.tsv")
    # Headerless pairs and a header with a text column still read as before.
    (tmp_path / "pairs.tsv").write_text("a fine film\tthe plot\n")
    assert read_inputs(tmp_path / "pairs.tsv") == [("a fine film", "the plot")]
    (tmp_path / "named.tsv").write_text("review\tsentence\tlabel\nx\ta fine film\t1\n")
    assert read_inputs(tmp_path / "named.tsv") == [("a fine film", None)]


@pytest.mark.parametrize("body, message", [
    ("{not json", r"labels\.json: not a readable labels file"),
    ('["negative", "positive"]', r"labels\.json: expected an object"),
    ('{"id2label": {"0": "negative"}}', r"labels\.json: id2label has keys \['0'\]; the model has 2 labels"),
    ('{"id2label": {"0": "negative", "1": "positive", "2": "neutral"}}', r"the model has 2 labels"),
    ('{"id2label": {"0": "negative", "1": 7}}', r"non-empty string")])
def test_a_damaged_labels_file_is_refused(tmp_path, body, message):
    from deebert_jax.inference.model_dir import label_names
    from deebert_jax.weights.torch_files import CheckpointError
    (tmp_path / "labels.json").write_text(body)
    with pytest.raises(CheckpointError, match=message):
        label_names(tmp_path, 2)
    (tmp_path / "labels.json").write_text(json.dumps({"id2label": {"0": "negative", "1": "positive"}}))
    assert label_names(tmp_path, 2) == ["negative", "positive"]
    os.remove(tmp_path / "labels.json")
    assert label_names(tmp_path, 2) == ["LABEL_0", "LABEL_1"]   # no file: the generic names, as before
