"""A predict request's body -> examples -> rows padded to one of a few lengths.

The body is Text Embeddings Inference's predict shape: `{"inputs": "text"}`, `{"inputs": ["t1",
...]}` or `{"inputs": [["text", "pair"], ...]}` (a one-element list is a single text). Anything
else is a `RequestError` with the HTTP status (400, or 413 for too much) and one line naming the
field and index at fault.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from deebert_jax.core.errors import DeeBertError
from deebert_jax.data.glue import DataError
# Re-exported: their old home (the server's lengths are `data.lengths`').
from deebert_jax.data.lengths import SHORTEST_LENGTH, length_classes, padded_length  # noqa: F401
from deebert_jax.data.text_inputs import Example, check_text, loads_json
from deebert_jax.inference.predict import encode

MAX_INPUTS = 64               # texts in one request
MAX_BODY_BYTES = 1 << 20      # 1 MiB: an SST-2 sentence is ~100 bytes


class RequestError(DeeBertError, ValueError):
    """A request the server refuses: `status` (400, 413) and a one-line message. `kind` says
    which of our checks it was, for an API that answers them with other codes (TEI's):
    "empty" (a blank text), "batch_size" (too many inputs), "body_size", "too_long" (a text
    longer than the maximum length with truncation off), else None."""

    def __init__(self, status: int, message: str, kind: str | None = None):
        super().__init__(message)
        self.status, self.kind = status, kind


def _item(value, field: str) -> Example:
    """One input at `field` (`inputs[3]`): a text, or a list of a text and its optional pair."""
    if isinstance(value, list):
        if not 1 <= len(value) <= 2:
            raise RequestError(400, f'"{field}" has {len(value)} texts; expected 1 or 2 (a text and its pair)')
        texts = [_text(v, f"{field}[{j}]") for j, v in enumerate(value)]
        return texts[0], (texts[1] if len(texts) == 2 else None)
    return _text(value, field), None


def _text(value, field: str) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RequestError(400, f'"{field}" is empty', kind="empty")
    try:
        return check_text(value, f'"{field}"')
    except DataError as e:
        raise RequestError(400, str(e)) from None


def load_body(body: bytes, max_bytes: int = MAX_BODY_BYTES) -> dict:
    """The raw body -> its JSON object, which has an "inputs" field, or a `RequestError`."""
    if len(body) > max_bytes:
        raise RequestError(413, f"the body has {len(body)} bytes; at most {max_bytes}", kind="body_size")
    try:
        data = loads_json(body)
    except ValueError as e:   # UnicodeDecodeError, JSONDecodeError, nesting past the parser's limit
        raise RequestError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(data, dict) or "inputs" not in data:
        raise RequestError(400, 'the body must be a JSON object with an "inputs" field')
    return data


def check_fields(data: dict, allowed: Sequence[str], route: str) -> None:
    """A `RequestError` naming the first field of `data` not in `allowed`: none is ignored."""
    unknown = [key for key in data if key not in allowed]
    if unknown:
        raise RequestError(400, f'unknown field "{unknown[0]}": {route} takes '
                                + ", ".join(f'"{a}"' for a in allowed))


def parse_body(body: bytes, max_inputs: int = MAX_INPUTS, max_bytes: int = MAX_BODY_BYTES) -> list[Example]:
    """The raw body of `POST /predict` -> [(text, text_pair or None)] in input order, or a
    `RequestError` (a field other than "inputs" is one: nothing is silently ignored)."""
    data = load_body(body, max_bytes)
    try:
        check_fields(data, ("inputs",), "/predict")
    except RequestError as e:
        if "parameters" in data:   # a Hugging Face Inference API client pointed at /predict
            raise RequestError(400, f"{e} (the Inference API's body, with parameters, goes to POST /)") from None
        raise
    return parse_inputs(data["inputs"], max_inputs)


def count_inputs(n: int, max_inputs: int, field: str = "inputs") -> None:
    if n > max_inputs:
        raise RequestError(413, f'"{field}" has {n} items; at most {max_inputs} per request', kind="batch_size")


def parse_inputs(inputs, max_inputs: int = MAX_INPUTS) -> list[Example]:
    """`/predict`'s "inputs": a text, a list of texts, or of [text] / [text, pair] lists."""
    if isinstance(inputs, str):
        return [(_text(inputs, "inputs"), None)]
    if not isinstance(inputs, list):
        raise RequestError(400, f'"inputs" must be a string or a list, got {type(inputs).__name__}')
    if not inputs:
        raise RequestError(400, '"inputs" is an empty list')
    count_inputs(len(inputs), max_inputs)
    return [_item(value, f"inputs[{i}]") for i, value in enumerate(inputs)]


@dataclasses.dataclass(frozen=True)
class Row:
    """One tokenised input, padded to its length class: input_ids, attention_mask,
    token_type_ids [S] int32; `truncated`: longer than the server's maximum length."""
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    truncated: bool

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


def to_rows(tokenizer, examples: Sequence[Example], classes: Sequence[int], vocab_size: int | None = None,
            truncation_side: str = "right") -> list[Row]:
    """Tokenises as `train.predict` does (`predict.encode`, truncation at the longest class, from
    `truncation_side`), then pads each row to the shortest class that holds it, not to the
    request's longest."""
    arrays, truncated = encode(tokenizer, examples, max(classes), vocab_size, truncation_side=truncation_side)
    rows = []
    for i in range(len(examples)):
        real = int(arrays["attention_mask"][i].sum())
        size = padded_length(real, classes)
        cut = {}
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            row = arrays[key][i, :size]
            if row.shape[0] < size:  # the request's longest row was shorter than this class
                fill = (tokenizer.pad_token_id or 0) if key == "input_ids" else 0
                row = np.concatenate([row, np.full(size - row.shape[0], fill, row.dtype)])
            cut[key] = np.ascontiguousarray(row, np.int32)
        rows.append(Row(**cut, truncated=bool(truncated[i])))
    return rows
