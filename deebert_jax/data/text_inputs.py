"""The user's own text, as `deebert-predict --input FILE` and the server take it.

Input files, by extension (every line one example; an empty or malformed line is a `DataError`
naming the file and line, so nothing half-read is used):
- `.txt`: one text per line.
- `.tsv`: tab-separated. If the first line names a text column (`text`, `sentence`, `sentence1`
  or `text_a`, case-insensitive) it is a header: that column is the text, a column named
  `text_pair`, `sentence2` or `text_b` the optional second text, and other columns (labels, ids)
  are ignored. A first line naming no text column but a label or id column (`label`, `id`, ...)
  is refused, naming the columns expected. Otherwise there is no header and every line holds one
  text, or two (a pair), the same number on every line.
- `.jsonl`: one object per line, `{"text": "...", "text_pair": "..."}` (`text_pair` optional or
  null; other keys ignored).
"""


from __future__ import annotations

import codecs
import json
import os
import re
from typing import Iterator, Sequence

from deebert_jax.core.errors import InputError
from deebert_jax.data.glue import DataError

Example = tuple[str, "str | None"]   # (text, text_pair or None)
INPUT_FORMATS = (".txt", ".tsv", ".jsonl")
FIRST_COLUMNS = ("text", "sentence", "sentence1", "text_a")
SECOND_COLUMNS = ("text_pair", "sentence2", "text_b")
# Names a header gives columns that are not text: a first line holding one is a header, and
# without a text column it is refused (else it would be read as an example, labels as texts).
OTHER_COLUMNS = ("label", "labels", "gold_label", "id", "idx", "index", "guid", "score", "class", "target",
                 "category", "sentiment", "rating", "y")


_LONE_CR = re.compile("\r(?!\n)")


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, line without its end) one at a time: memory does not grow with the file.

    Lines end at \n, \r\n or a lone \r (as a text-mode file with newline="" splits them); a
    byte-order mark (an editor may write one) is not part of the first text; bytes that are not
    UTF-8 are a DataError naming the line and the byte within it."""
    number = 0
    with open(path, "rb") as f:
        for raw in f:
            if number == 0 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
                if not raw:   # the mark alone: an empty file
                    continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {number + 1}: not UTF-8 text ({e.reason} at byte {e.start + 1} "
                                "of the line)") from None
            parts = _LONE_CR.split(text) if "\r" in text else [text]
            if len(parts) > 1 and parts[-1] == "":   # the line ended with a lone \r
                parts.pop()
            for part in parts:
                number += 1
                yield number, part.rstrip("\r\n")


class HugeNumber(int):
    """A JSON integer too long to convert (`loads_json`): kept as its digit count, so that the
    field holding it is named instead of the parser failing on the whole document."""

    def __new__(cls, digits: int):
        obj = super().__new__(cls, 0)
        obj.digits = digits
        return obj


MAX_INT_DIGITS = 100   # longer JSON integers are not numbers a text field could hold


def _parse_int(text: str) -> int:
    return HugeNumber(len(text.lstrip("-"))) if len(text) > MAX_INT_DIGITS else int(text)


def loads_json(text: str | bytes):
    """`json.loads` for what a user or client sends: an integer of any length is no error (it
    becomes a `HugeNumber`, refused where a text is expected); nesting deeper than the parser's
    recursion limit is a ValueError, not a RecursionError."""
    try:
        return json.loads(text, parse_int=_parse_int)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def check_text(value, where: str) -> str:
    """`value` if it is a non-blank string of valid Unicode, else a DataError naming `where`
    ('<where> is empty', not a string, or holding a lone surrogate no tokenizer can encode)."""
    if isinstance(value, str) and value.strip():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"{where} is not valid Unicode: a lone surrogate U+{ord(value[e.start]):04X} at "
                            f"character {e.start}") from None
        return value
    if value is None or isinstance(value, str):
        raise DataError(f"{where} is empty")
    if isinstance(value, HugeNumber):
        raise DataError(f"{where} must be a string, got a {value.digits}-digit number")
    raise DataError(f"{where} must be a string, got {type(value).__name__}")


def _text(path: str, number: int, value, what: str) -> str:
    return check_text(value, f"{path}: line {number}: {what}")


def _read_txt(path: str) -> Iterator[Example]:
    for n, line in _lines(path):
        yield _text(path, n, line, "the line"), None


def _tsv_header(fields: Sequence[str]) -> tuple[int, int | None] | None:
    names = [f.strip().lower() for f in fields]
    first = [i for i, name in enumerate(names) if name in FIRST_COLUMNS]
    second = [i for i, name in enumerate(names) if name in SECOND_COLUMNS]
    if not first:
        if any(name in OTHER_COLUMNS for name in names):
            raise InputError(f"the header {fields} names no text column: name the text column one of "
                             f"{', '.join(FIRST_COLUMNS)} (and a second text {', '.join(SECOND_COLUMNS)}); "
                             "other columns are ignored")
        return None
    if len(first) > 1 or len(second) > 1:
        raise InputError(f"header names several text columns {fields}")
    return first[0], (second[0] if second else None)


def _read_tsv(path: str) -> Iterator[Example]:
    columns, width = None, None
    for n, line in _lines(path):
        fields = line.split("\t")
        if n == 1:
            try:
                columns = _tsv_header(fields)
            except ValueError as e:
                raise DataError(f"{path}: line 1: {e}") from None
            if columns is not None:
                continue
        if columns is None:
            width = width or len(fields)
            if len(fields) not in (1, 2) or len(fields) != width:
                raise DataError(f"{path}: line {n}: {len(fields)} tab-separated columns; expected "
                                f"{width if width in (1, 2) else '1 or 2'} (or a header naming {FIRST_COLUMNS[:2]})")
            first, second = 0, (1 if width == 2 else None)
        else:
            first, second = columns
            needed = max(first, second or 0) + 1
            if len(fields) < needed:
                raise DataError(f"{path}: line {n}: {len(fields)} columns, the header needs {needed}")
        pair = None if second is None else _text(path, n, fields[second], "the second text")
        yield _text(path, n, fields[first], "the text"), pair


def _read_jsonl(path: str) -> Iterator[Example]:
    for n, line in _lines(path):
        if not line.strip():
            raise DataError(f"{path}: line {n}: empty line")
        try:
            record = loads_json(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
        except ValueError as e:
            raise DataError(f"{path}: line {n}: not valid JSON ({e})") from None
        if not isinstance(record, dict) or "text" not in record:
            raise DataError(f"{path}: line {n}: expected an object with a \"text\" key")
        pair = record.get("text_pair")
        yield (_text(path, n, record["text"], '"text"'),
               None if pair is None else _text(path, n, pair, '"text_pair"'))


def read_inputs(path: str | os.PathLike) -> list[Example]:
    """A `.txt`, `.tsv` or `.jsonl` file (see the module docstring) -> [(text, text_pair or None)]."""
    return list(iter_inputs(path))


def iter_inputs(path: str | os.PathLike) -> Iterator[Example]:
    """`read_inputs` one example at a time (memory does not grow with the file); the file is
    checked (a directory, an unknown extension, a missing file) before the first one is yielded,
    and a file with no examples is a DataError once it is read through."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    readers = {".txt": _read_txt, ".tsv": _read_tsv, ".jsonl": _read_jsonl}
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory; expected a {', '.join(INPUT_FORMATS)} file of texts")
    if ext not in readers:
        raise DataError(f"{path}: unknown input format {ext or '(no extension)'!r}; expected one of {INPUT_FORMATS}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such input file")
    return _non_empty(readers[ext](path), path)


def _non_empty(examples: Iterator[Example], path: str) -> Iterator[Example]:
    any_example = False
    for example in examples:
        any_example = True
        yield example
    if not any_example:
        raise DataError(f"{path}: no examples (empty file)")
