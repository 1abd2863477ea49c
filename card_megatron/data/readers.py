"""Input formats: turning one :class:`~card_megatron.data.corpus.Chunk` into documents.

:func:`parse_chunk` is what a worker process runs on each chunk before tokenizing; it returns
a :class:`ParsedChunk` (the texts per key, what was skipped and why, and the first bad record).
The formats:

* ``jsonl`` (``.jsonl``/``.json``/``.ndjson``, plain, ``.gz`` or ``.zst``): one JSON object per
  line, the ``--json-keys`` taken from each. A whole-chunk fast path (:func:`_parse_clean_chunk`)
  handles chunks without a single unusual line; the line-by-line reference
  (:func:`_parse_lines`) finds and names the first bad line otherwise.
* ``txt``: one document per line.
* ``parquet``: one chunk per row group, read by the worker with only the ``--json-keys``
  columns (FineWeb's layout: ``text``, ``id``, ``url``, ...), so memory stays at a few row
  groups' worth of those columns. A null value is a bad row; a missing or non-string column,
  or two columns of one name, is an error for the whole file. A dictionary-encoded string column
  (each distinct value stored once) is text like any other.
* ``builtin``: the texts themselves.

Decompression (gzip, zstd), opening a Parquet file (:func:`~card_megatron.data.corpus.open_parquet`) and
cutting files into chunks live in :mod:`card_megatron.data.corpus`, which never imports this module.
"""

from __future__ import annotations

import itertools
import json
import operator
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from card_megatron.data.corpus import DEFAULT_MAX_LINE_BYTES, Chunk, open_parquet


@dataclass
class BadRecord:
    """The first bad record of a chunk: its 0-based index in the chunk (-1: the whole input is
    unreadable, ``message`` says why and names the file) and what is wrong with it."""

    index: int
    message: str


@dataclass
class ParsedChunk:
    """Documents of one chunk: ``texts[k]`` for ``keys[k]``; ``num_records`` lines, rows or
    built-in documents read (skipped ones included); ``text_bytes`` of input consumed."""

    texts: list[list[str]]
    skipped: Counter = field(default_factory=Counter)
    num_records: int = 0
    text_bytes: int = 0
    error: Optional[BadRecord] = None


def describe_location(chunk: Chunk, first_record: int, error: BadRecord) -> str:
    """``error`` with the place it occurred: file and line (1-based), parquet file, row group and
    row, or built-in corpus and document. ``first_record``: records of the input before ``chunk``."""
    if error.index < 0:
        return error.message
    n = first_record + error.index + 1
    if chunk.kind == "builtin":
        return f"{chunk.source} document {n}: {error.message}"
    if chunk.kind == "parquet":
        return f"{chunk.source}: row group {chunk.offset}, row {error.index} (row {n} of the file): {error.message}"
    return f"{chunk.source}:{n}: {error.message}"


def parse_chunk(
    chunk: Chunk, keys: Sequence[str], skip_bad_lines: bool, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> ParsedChunk:
    """Parses one chunk of any format (see the module docstring). Raises ValueError naming the
    file when it cannot be read at all. A line longer than ``max_line_bytes`` is an error even with
    ``skip_bad_lines`` (the reader stopped at it: what follows was not read)."""
    if chunk.kind == "parquet":
        return _parse_parquet(chunk, keys, skip_bad_lines)
    data = chunk.data()
    if chunk.kind != "builtin" and len(data) > max_line_bytes + 1:
        long_line = _first_line_longer_than(data, max_line_bytes)
        if long_line is not None:
            return ParsedChunk(
                [],
                num_records=long_line,
                error=BadRecord(
                    long_line,
                    f"line longer than --max-line-bytes ({max_line_bytes:,} bytes); "
                    "raise --max-line-bytes if it is meant to be one document",
                ),
            )
    if chunk.kind == "builtin":
        texts: list[list[str]] = [[] for _ in keys]
        skipped: Counter = Counter()
        for t in data:
            if t.strip():
                texts[0].append(t)
            else:
                skipped["empty documents"] += 1
        return ParsedChunk(texts, skipped, len(data), chunk.length)
    fast = _parse_clean_chunk(data, chunk.kind, keys)
    if fast is not None:
        return ParsedChunk(fast[0], fast[1], fast[2], len(data))
    texts, skipped, num_lines, error = _parse_lines(data, chunk.kind, keys, skip_bad_lines)
    return ParsedChunk(texts, skipped, num_lines, len(data), BadRecord(*error) if error else None)


# -- JSONL and text ---------------------------------------------------------------------
def _first_line_longer_than(data: bytes, max_line_bytes: int) -> Optional[int]:
    """0-based index of the first line of ``data`` (lines end with b"\\n") with more than
    ``max_line_bytes`` bytes before its line end, or None."""
    start = index = 0
    while start < len(data):
        end = data.find(b"\n", start)
        if end < 0:
            end = len(data)
        if end - start > max_line_bytes:
            return index
        start, index = end + 1, index + 1
    return None


_SCAN_ONCE = json.JSONDecoder().scan_once
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a JSON escape of a UTF-16 surrogate (paired or not)


def _json_loads(line: str):
    """``json.loads`` with a fast path for the common case (no surrounding whitespace)."""
    try:
        obj, end = _SCAN_ONCE(line, 0)
        if end == len(line):
            return obj
    except StopIteration:
        pass
    return json.loads(line)  # whitespace, trailing data or an error: the reference path


def _parse_clean_chunk(data: bytes, kind: str, keys: Sequence[str]) -> Optional[tuple[list[list[str]], Counter, int]]:
    """Fast path of :func:`parse_chunk` for a chunk without a single bad line: the whole chunk
    is decoded at once and every line parsed by the C JSON scanner without a Python call per
    line. Returns None at the first sign of anything unusual (bad UTF-8 or JSON, blank line,
    whitespace around a line, missing or non-string key), and the line-by-line reference path
    then takes over, finding and reporting the problem exactly.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    lines = text.split("\n")
    lines.pop()
    skipped: Counter = Counter()
    if kind == "txt":
        docs = [line.rstrip("\r") for line in lines]
        kept = [d for d in docs if d and not d.isspace()]
        if len(kept) != len(docs):
            skipped["empty documents"] = len(docs) - len(kept)
        return [kept], skipped, len(lines)
    if _SURROGATE_ESCAPE.search(text):
        return None  # maybe a lone surrogate: the reference path checks each value
    try:
        # A StopIteration from the scanner (e.g. on a blank line) ends map() early: caught by the length check.
        parsed = list(map(_SCAN_ONCE, lines, itertools.repeat(0)))
    except (json.JSONDecodeError, RecursionError):
        return None
    if len(parsed) != len(lines) or not all(map(operator.eq, map(operator.itemgetter(1), parsed), map(len, lines))):
        return None
    objs = list(map(operator.itemgetter(0), parsed))
    texts: list[list[str]] = []
    for key in keys:
        try:
            values = list(map(operator.itemgetter(key), objs))
        except (KeyError, TypeError, IndexError):
            return None  # a missing key or a line that is not an object
        if not all(map(isinstance, values, itertools.repeat(str))):
            return None
        kept = [v for v in values if v and not v.isspace()]
        if len(kept) != len(values):
            skipped["empty documents" if len(keys) == 1 else f"empty {key!r} documents"] = len(values) - len(kept)
        texts.append(kept)
    return texts, skipped, len(lines)


def _parse_lines(
    data: bytes, kind: str, keys: Sequence[str], skip_bad_lines: bool
) -> tuple[list[list[str]], Counter, int, Optional[tuple[int, str]]]:
    """Line-by-line reference parser: (texts per key, skip counts, lines, first error)."""
    texts: list[list[str]] = [[] for _ in keys]
    skipped: Counter = Counter()
    lines = data.split(b"\n")
    lines.pop()  # the data ends with a line end
    num_lines = len(lines)
    error: Optional[tuple[int, str]] = None

    def bad(i: int, reason: str, message: str) -> bool:
        nonlocal error
        if skip_bad_lines:
            skipped[reason] += 1
            return False
        error = (i, message)
        return True

    is_json = kind == "jsonl"
    for i, raw in enumerate(lines):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if bad(i, "lines with invalid UTF-8", f"invalid UTF-8 at byte {e.start} of the line"):
                break
            continue
        if not is_json:
            line = line.rstrip("\r")
            if line.strip():
                texts[0].append(line)
            else:
                skipped["empty documents"] += 1
            continue
        if not line.strip():
            skipped["blank lines"] += 1
            continue
        try:
            obj = _json_loads(line)
        except json.JSONDecodeError as e:
            if bad(i, "lines with invalid JSON", f"invalid JSON ({e.msg} at column {e.colno})"):
                break
            continue
        except RecursionError:
            if bad(i, "lines with JSON nested too deeply", "JSON nested too deeply to parse"):
                break
            continue
        if not isinstance(obj, dict):
            if bad(i, "lines that are not JSON objects", f"expected a JSON object, got {type(obj).__name__}"):
                break
            continue
        values = []
        for key in keys:
            v = obj.get(key)
            if v is None:
                what = "missing" if key not in obj else "null"
                bad(i, f"lines with key {key!r} {what}", f"key {key!r} is {what}")
                break
            if not isinstance(v, str):
                bad(i, f"lines with non-string {key!r}", f"key {key!r} is a {type(v).__name__}, not a string")
                break
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:  # valid JSON ("\ud800"), but no text: the tokenizer cannot take it
                bad(
                    i,
                    "lines with a lone surrogate",
                    f"key {key!r} holds a lone UTF-16 surrogate ({v[e.start]!r} at character {e.start})",
                )
                break
            values.append(v)
        else:
            for k, v in enumerate(values):
                if v.strip():
                    texts[k].append(v)
                else:
                    skipped["empty documents" if len(keys) == 1 else f"empty {keys[k]!r} documents"] += 1
        if error:
            break
    return texts, skipped, num_lines, error


# -- Parquet ----------------------------------------------------------------------------
_OPEN_PARQUET: dict = {}  # this process's one open file: (path, pyarrow.parquet.ParquetFile)


def _cached_parquet(path: str):
    if _OPEN_PARQUET.get("path") != path:
        _OPEN_PARQUET.clear()
        _OPEN_PARQUET.update(path=path, file=open_parquet(path))
    return _OPEN_PARQUET["file"]


def _is_string_type(t) -> bool:
    import pyarrow as pa

    is_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    return pa.types.is_string(t) or pa.types.is_large_string(t) or is_view(t)


def _parse_parquet(chunk: Chunk, keys: Sequence[str], skip_bad_lines: bool) -> ParsedChunk:
    """One row group (``chunk.offset``) of a Parquet file: the ``keys`` columns as texts."""
    import pyarrow as pa

    pf = _cached_parquet(chunk.source)
    names = pf.schema_arrow.names
    missing = [k for k in keys if k not in names]
    if missing:
        return ParsedChunk(
            [],
            error=BadRecord(
                -1,
                f"input {chunk.source}: no column {missing[0]!r} "
                f"(columns: {', '.join(names)}); choose it with --json-keys",
            ),
        )
    for k in keys:
        count = len(pf.schema_arrow.get_all_field_indices(k))
        if count > 1:
            return ParsedChunk(
                [],
                error=BadRecord(
                    -1,
                    f"input {chunk.source}: {count} columns are named {k!r} (columns: {', '.join(names)}); "
                    "which one holds the text is ambiguous: rename or drop the others",
                ),
            )
        t = pf.schema_arrow.field(k).type
        if pa.types.is_dictionary(t) and _is_string_type(t.value_type):
            continue  # dictionary-encoded text (repeated values stored once): read as its strings
        if not _is_string_type(t):
            return ParsedChunk([], error=BadRecord(-1, f"input {chunk.source}: column {k!r} holds {t}, not strings"))
    try:
        table = pf.read_row_group(chunk.offset, columns=list(keys))
    except Exception as e:  # corrupt pages, bad compression: pyarrow raises OSError/ArrowInvalid
        return ParsedChunk(
            [],
            error=BadRecord(
                -1, f"input {chunk.source}: row group {chunk.offset} cannot be read ({type(e).__name__}: {e})"
            ),
        )
    num_rows = table.num_rows
    skipped: Counter = Counter()
    bad_rows: set[int] = set()
    columns = []
    for k in keys:
        col = table.column(k)
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        try:
            values = col.to_pylist()
        except UnicodeDecodeError:  # invalid UTF-8 in some row: find it
            values = []
            for i, v in enumerate(col.cast(_binary_type()).to_pylist()):
                try:
                    values.append(None if v is None else v.decode("utf-8"))
                except UnicodeDecodeError as e:
                    if not skip_bad_lines:
                        return ParsedChunk(
                            [],
                            num_records=num_rows,
                            error=BadRecord(i, f"column {k!r}: invalid UTF-8 at byte {e.start}"),
                        )
                    skipped["rows with invalid UTF-8"] += 1
                    bad_rows.add(i)
                    values.append(None)
        if col.null_count:
            for i, v in enumerate(values):
                if v is None and i not in bad_rows:
                    if not skip_bad_lines:
                        return ParsedChunk([], num_records=num_rows, error=BadRecord(i, f"column {k!r} is null"))
                    skipped[f"rows with {k!r} null"] += 1
                    bad_rows.add(i)
        columns.append(values)
    texts: list[list[str]] = []
    for k, values in zip(keys, columns):
        if bad_rows:
            values = [v for i, v in enumerate(values) if i not in bad_rows]
        kept = [v for v in values if v and not v.isspace()]
        if len(kept) != len(values):
            skipped["empty documents" if len(keys) == 1 else f"empty {k!r} documents"] += len(values) - len(kept)
        texts.append(kept)
    return ParsedChunk(texts, skipped, num_rows, table.nbytes)


def _binary_type():
    import pyarrow as pa

    return pa.large_binary()
