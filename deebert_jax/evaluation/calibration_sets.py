"""The examples a threshold is chosen on and the ones it is reported on, as every ramp's logits
computed once (`calibration_sets`), and what train-holdout calibration must stay clear of."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from deebert_jax.core.errors import InputError
from deebert_jax.data import glue as data
from deebert_jax.evaluation import sweep
from deebert_jax.weights.checkpoint import TRAINING_FILE, model_fingerprint, ramp_temperature_record, training_rows

CALIBRATION_SPLITS = ("dev-half", "train-holdout")


def split_indices(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed seeded halving of n examples -> (calibration rows, reported rows), each sorted;
    the calibration half gets the odd one out."""
    order = np.random.default_rng(seed).permutation(n)
    half = (n + 1) // 2
    return np.sort(order[:half]), np.sort(order[half:])


@dataclasses.dataclass(frozen=True)
class CalibrationSets:
    """Every ramp's logits on the calibration and the reported examples, computed once.

    calibration, reported: ([L, n, K] float32 logits, [n] labels). split: one of
    CALIBRATION_SPLITS. extra: what the policy records about the split ({"seed"} for dev-half,
    {"calibration_size"} for train-holdout) and the model (`model_fingerprint`, `max_seq_length`). rows: for dev-half, the (calibration, reported) dev
    row indices, disjoint and sorted; None for train-holdout (the two come from different splits).
    """
    calibration: tuple[np.ndarray, np.ndarray]
    reported: tuple[np.ndarray, np.ndarray]
    split: str
    extra: dict
    rows: tuple[np.ndarray, np.ndarray] | None = None


def calibration_sets(config, params, task: str, tokenizer=None, *, split: str = "dev-half", seed: int = 0,
                     calibration_size: int = 1000, glue_dir: str | os.PathLike | None = None,
                     max_seq_length: int = 128, limit: int | None = None, batch_size: int = 32,
                     progress: bool = False, model_dir: str | os.PathLike | None = None,
                     flag: str = "--calibration-size") -> CalibrationSets:
    """The examples a threshold is chosen on and the ones it is reported on, as all-ramp logits.

    dev-half: a seeded half of dev (`split_indices`, `limit` first rows) calibrates, the other
    half is reported. train-holdout: the last `calibration_size` train rows calibrate, dev is
    reported (sound only when training did not see those rows: with `model_dir`, rows its
    training.json says it trained on, or more rows than the split has, are refused, naming `flag`).
    """
    if split not in CALIBRATION_SPLITS:
        raise InputError(f"unknown calibration split {split!r}; expected one of {list(CALIBRATION_SPLITS)}")
    common = dict(glue_dir=glue_dir, tokenizer=tokenizer, max_seq_length=max_seq_length,
                  vocab_size=config.vocab_size)
    # What the policy was calibrated on, so that loading it can refuse other weights or lengths.
    model = {"model_fingerprint": model_fingerprint(config, params), "max_seq_length": int(max_seq_length)}
    dev = data.load_split(task, "dev", limit=limit, **common)
    logits = lambda arrays: sweep.all_ramp_logits(config, params, arrays, batch_size, progress=progress)
    if split == "dev-half":
        n = data.num_examples(dev)
        if n < 2:
            raise InputError(f"{task} dev: {n} example(s); the dev-half split needs at least 2")
        dev_logits = logits(dev)
        cal_rows, rep_rows = split_indices(n, seed)
        return CalibrationSets((dev_logits[:, cal_rows], dev["labels"][cal_rows]),
                               (dev_logits[:, rep_rows], dev["labels"][rep_rows]),
                               split, {"seed": seed, **model}, (cal_rows, rep_rows))
    train = data.load_split(task, "train", **common)
    if model_dir is not None:
        check_untrained_tail(model_dir, task, calibration_size, data.num_examples(train), flag)
    tail = {k: v[-calibration_size:] for k, v in train.items()}
    return CalibrationSets((logits(tail), tail["labels"]), (logits(dev), dev["labels"]), split,
                           {"calibration_size": data.num_examples(tail), **model})


def check_untrained_tail(model_dir: str | os.PathLike, task: str, size: int, rows: int,
                         flag: str = "--calibration-size") -> bool:
    """The last `size` of a train split of `rows` rows, as train-holdout calibration reads them:
    an InputError (naming `flag`) when there are fewer rows, or when `model_dir`'s training.json
    says training used some of them (`train_rows`). -> whether training.json says which rows
    training used (False for a model trained before it recorded them: nothing to check against)."""
    if size > rows:
        raise InputError(f"{flag} {size}: the {task} training split has only {rows} rows")
    trained = training_rows(model_dir)
    if trained is None or data.TASKS.get(data.canonical_task(task)) is None:   # synthetic rows are drawn anew
        return False
    if rows - size < trained:
        raise InputError(f"{flag} {size}: {os.fspath(model_dir)} was trained on the first {trained} of the {rows} "
                         f"{task} training rows ({TRAINING_FILE}); the last {size} include "
                         f"{trained - (rows - size)} of them, so the calibration would not be on unseen rows: "
                         f"use at most {flag} {max(rows - trained, 0)}")
    return True


def check_clear_of_temperature_rows(model_dir: str | os.PathLike, calibration_size: int,
                                    flag: str = "--calibration-size") -> None:
    """train-holdout calibration of a model whose off-ramp temperatures were fitted on held-out
    rows (`training.json`): the last `calibration_size` training rows (`flag`) must not include
    them, or the thresholds tested would depend on the calibration draw (an InputError says how
    many fit)."""
    record = ramp_temperature_record(model_dir)
    if record is None:
        return
    clear = record["holdout"] - record["rows"]
    if calibration_size > clear:
        raise InputError(f"{flag} {calibration_size}: the off-ramp temperatures of {model_dir} were fitted "
                         f"on the first {record['rows']} of the last {record['holdout']} training rows "
                         f"({TRAINING_FILE}); calibrating on them would void the guarantee: use at most "
                         f"{flag} {clear}")
