"""GLUE/synthetic data: reading, tokenising, batching, and the errors bad input gets."""

import numpy as np
import pytest

from deebert_jax.data import batching
from deebert_jax.data import glue as data


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return data.load_tokenizer(minilm_dir)


def _write(path, text, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def test_task_names_and_labels():
    assert data.canonical_task("SST-2") == data.canonical_task("sst2") == "sst2"
    assert data.canonical_task("CoLA") == "cola"
    assert {t: data.num_labels(t) for t in data.TASKS} == {
        "sst2": 2, "mrpc": 2, "rte": 2, "qnli": 2, "qqp": 2, "mnli": 3, "cola": 2, "synthetic": 2}
    with pytest.raises(data.DataError, match="unknown task 'stsb'"):
        data.num_labels("stsb")


@pytest.mark.parametrize("task,n,counts", [("sst2", 872, [428, 444]), ("mrpc", 408, [129, 279]),
                                           ("rte", 277, [146, 131]), ("cola", 1043, [322, 721])])
def test_real_glue_dev_splits(glue_path, tokenizer, task, n, counts):
    arrays = data.load_split(task, "dev", glue_dir=glue_path, tokenizer=tokenizer, max_seq_length=64)
    assert arrays["input_ids"].shape == arrays["attention_mask"].shape == arrays["token_type_ids"].shape == (n, 64)
    assert all(arrays[k].dtype == np.int32 for k in data.ARRAY_KEYS)
    assert np.bincount(arrays["labels"]).tolist() == counts
    assert (arrays["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    pair = task in ("mrpc", "rte")
    assert bool(arrays["token_type_ids"].any()) == pair  # second sentences get segment 1


def test_pair_tokenisation_and_truncation(tmp_path, tokenizer):
    long = " ".join(["word"] * 50)
    _write(tmp_path / "RTE" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n"
           f"0\tA cat sat.\tA cat is sitting.\tentailment\n1\t{long}\t{long}\tnot_entailment\n")
    arrays = data.load_split("RTE", "dev", glue_dir=tmp_path, tokenizer=tokenizer, max_seq_length=16)
    assert arrays["labels"].tolist() == [0, 1]
    expected = tokenizer("A cat sat.", "A cat is sitting.")
    n = len(expected["input_ids"])
    assert arrays["input_ids"][0, :n].tolist() == expected["input_ids"]
    assert arrays["token_type_ids"][0, :n].tolist() == expected["token_type_ids"]
    assert arrays["attention_mask"][0].sum() == n and arrays["input_ids"][0, n:].tolist() == [0] * (16 - n)
    assert arrays["attention_mask"][1].all() and arrays["input_ids"][1, -1] == tokenizer.sep_token_id


def test_limit_and_cola_headerless(tmp_path, tokenizer):
    _write(tmp_path / "CoLA" / "train.tsv", "gj04\t1\t\tGood sentence.\ngj04\t0\t*\tSentence bad.\ngj04\t1\t\tOk.\n")
    arrays = data.load_split("cola", "train", glue_dir=tmp_path, tokenizer=tokenizer, max_seq_length=8, limit=2)
    assert arrays["labels"].tolist() == [1, 0]


def test_mrpc_bom_header(tmp_path, tokenizer):
    _write(tmp_path / "MRPC" / "dev.tsv", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA .\tB .\n")
    assert data.load_split("mrpc", "dev", glue_dir=tmp_path, tokenizer=tokenizer, max_seq_length=8)["labels"].tolist() == [1]


@pytest.mark.parametrize("task, folder, header", [
    ("sst2", "SST-2", "sentence\tlabel\nfine .\t1\n"),
    ("rte", "RTE", "index\tsentence1\tsentence2\tlabel\n0\tA .\tB .\tentailment\n"),
    ("cola", "CoLA", "gj04\t1\t\tGood sentence.\n"),
])
def test_bom_header_any_task(tmp_path, tokenizer, task, folder, header):
    _write(tmp_path / folder / "dev.tsv", "\ufeff" + header)
    arrays = data.load_split(task, "dev", glue_dir=tmp_path, tokenizer=tokenizer, max_seq_length=8)
    assert arrays["labels"].tolist() == [1 if task != "rte" else 0]
    plain = data.load_split(task, "dev", glue_dir=_write(tmp_path / "plain" / folder / "dev.tsv", header).parents[1],
                            tokenizer=tokenizer, max_seq_length=8)
    assert all(np.array_equal(arrays[k], plain[k]) for k in data.ARRAY_KEYS)  # the mark is not text


@pytest.mark.parametrize("raw, match", [
    (b"sentence\tlabel\nfine .\t1\nbad \xff byte\t0\n", r"SST-2/dev.tsv: line 3: byte 0xff at column 5 is not valid"),
    (b"\xef\xbb\xbfsentence\tlabel\nfine .\t1\n" + b"x .\t1\n" * 5000 + b"caf\xe9 .\t1\n",
     r"SST-2/dev.tsv: line 5003: byte 0xe9 at column 4 is not valid"),
])
def test_undecodable_bytes_name_file_and_line(tmp_path, tokenizer, raw, match):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "dev.tsv").write_bytes(raw)
    with pytest.raises(data.DataError, match=match):
        data.load_split("sst2", "dev", glue_dir=tmp_path, tokenizer=tokenizer)


@pytest.mark.parametrize("content,match", [
    (None, r"SST-2/dev.tsv: GLUE file not found"),
    ("sentence\tlabels\nfine .\t1\n", r"dev.tsv: line 1: missing column\(s\) \['label'\]"),
    ("sentence\tlabel\nfine .\t1\nbad .\tpositive\n", r"dev.tsv: line 3: unknown label 'positive'"),
    ("sentence\tlabel\n", r"dev.tsv: no examples \(empty split\)"),
    ("", r"dev.tsv: empty file"),
    ("sentence\tlabel\nfine .\t1\nno label column\n", r"dev.tsv: line 3: 1 columns, expected at least 2"),
])
def test_malformed_files_name_file_and_line(tmp_path, tokenizer, content, match):
    if content is not None:
        _write(tmp_path / "SST-2" / "dev.tsv", content)
    with pytest.raises(data.DataError, match=match):
        data.load_split("sst2", "dev", glue_dir=tmp_path, tokenizer=tokenizer)


def test_synthetic_is_deterministic_and_learnable_rule():
    a = data.load_split("synthetic", "train", vocab_size=50, max_seq_length=10, seed=3)
    b = data.load_split("synthetic", "train", vocab_size=50, max_seq_length=10, seed=3)
    dev = data.load_split("synthetic", "dev", vocab_size=50, max_seq_length=10, seed=3)
    for k in data.ARRAY_KEYS:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["input_ids"].shape == (data.SYNTHETIC_SIZES["train"], 10) and dev["labels"].shape == (100,)
    assert not np.array_equal(a["input_ids"][:100], dev["input_ids"])
    assert a["input_ids"].max() < 50 and (a["input_ids"][:, 0] == data.SYNTHETIC_CLS).all()
    assert ((a["input_ids"] != 0) == (a["attention_mask"] == 1)).all()
    assert 0.3 < a["labels"].mean() < 0.7
    with pytest.raises(data.DataError, match="vocab_size is required"):
        data.load_split("synthetic", "dev")


@pytest.mark.parametrize("n,batch", [(37, 8), (32, 8), (5, 16), (1, 1)])
def test_eval_batches_count_every_example_once(n, batch):
    arrays = data.load_split("synthetic", "dev", vocab_size=30, max_seq_length=6, limit=n)
    arrays["labels"] = np.arange(n, dtype=np.int32)  # label = example index, to track each one
    seen = []
    for b in batching.eval_batches(arrays, batch):
        assert all(b[k].shape[0] == batch for k in (*data.ARRAY_KEYS, "valid"))
        assert (b["attention_mask"][~b["valid"]] == 0).all()
        seen.extend(b["labels"][b["valid"]].tolist())
    assert seen == list(range(n))


def test_train_batches_resume_and_host_shards():
    arrays = data.load_split("synthetic", "train", vocab_size=30, max_seq_length=6, limit=40)
    per_epoch = batching.steps_per_epoch(40, 16)
    assert per_epoch == 2
    epoch0 = [batching.train_batch(arrays, 16, seed=1, step=s)["input_ids"] for s in range(2)]
    again = batching.train_batch(arrays, 16, seed=1, step=1)["input_ids"]
    np.testing.assert_array_equal(epoch0[1], again)
    next_epoch = batching.train_batch(arrays, 16, seed=1, step=2)["input_ids"]
    assert not np.array_equal(next_epoch, epoch0[0])  # reshuffled each epoch
    hosts = [batching.train_batch(arrays, 16, seed=1, step=1, process_index=i, process_count=2) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["input_ids"] for h in hosts]), epoch0[1])
    sharded = batching.shard(hosts[0], 4)
    assert sharded["input_ids"].shape == (4, 2, 6) and sharded["labels"].shape == (4, 2)
    with pytest.raises(data.DataError, match="fewer than one global batch"):
        batching.train_batch(arrays, 64, seed=1, step=0)


def test_load_tokenizer_prefers_tokenizer_subdir(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "model" / "tokenizer")
    loaded = data.load_tokenizer(tmp_path / "model")
    assert loaded.is_fast and loaded("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]
    with pytest.raises(data.DataError, match="no tokenizer found"):
        data.load_tokenizer(tmp_path)


def test_hub_path_maps_columns_and_labels(monkeypatch, tokenizer):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"premise": ["A man sleeps.", "Dogs bark."],
                                           "hypothesis": ["A person rests.", "Cats meow."], "label": [0, 2]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    arrays = data.load_split("MNLI", "dev", tokenizer=tokenizer, max_seq_length=12)
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched")]
    assert arrays["labels"].tolist() == [0, 2] and arrays["token_type_ids"].any()
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict(
        {"sentence": ["x"], "label": [-1]}))
    with pytest.raises(data.DataError, match=r"nyu-mll/glue/sst2\[train\]: row 0: unknown label -1"):
        data.load_split("sst2", "train", tokenizer=tokenizer)


def test_host_eval_rows_cover_the_split_once():
    arrays = data.load_split("synthetic", "dev", vocab_size=30, max_seq_length=6, limit=11)
    arrays["labels"] = np.arange(11, dtype=np.int32)
    seen, batches = [], set()
    for host in range(3):
        part = batching.host_eval_rows(arrays, host, 3)
        assert part["input_ids"].shape == (4, 6)  # every host the same number of rows
        host_batches = list(batching.eval_batches(part, 3))
        batches.add(len(host_batches))
        for b in host_batches:
            seen.extend(b["labels"][b["valid"]].tolist())
    assert seen == list(range(11)) and batches == {2}
