"""Text inputs of the preprocessing tool: files (JSONL or text, plain, .gz or .zst; Parquet) and
built-in corpora.

Line files are read in raw blocks cut at line ends (:func:`iter_chunks`), Parquet files one
row group per chunk, so that parsing, decoding and tokenization all happen in worker processes
(:mod:`card_megatron.data.readers`); the reading process only counts lines and hashes the
bytes (:class:`InputFingerprint`). The built-in corpora
(``builtin:python-docs``, ``builtin:python-code``, ``builtin:synthetic-copy``) are
generated in :mod:`card_megatron.data.builtin` and come as lists of documents.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from card_megatron.data.builtin import (  # noqa: F401 (re-exported)
    BUILTIN_CORPORA,
    BUILTIN_PREFIX,
    builtin_documents,
    builtin_name,
    builtin_parameters,
    check_spec,
)

logger = logging.getLogger(__name__)

# A Parquet row group is read whole by one worker: above this many uncompressed bytes, say so.
LARGE_ROW_GROUP_BYTES = 1 << 29
# --max-line-bytes: the longest input line (JSONL or text) accepted. 256 MiB is hundreds of times
# the longest document of the web, code and book corpora this reads (their documents are KB to a
# few MB), and still a line a worker can hold in memory several times over while it decodes,
# parses and tokenizes it; a longer line is an error naming it, never an unbounded buffer.
DEFAULT_MAX_LINE_BYTES = 256 << 20
# zstd input is fed to the decompressor this many compressed bytes at a time: one call's output is
# then at most ~32768 x this (zstd's largest expansion, RLE blocks), 64 MB, whatever the file holds.
_ZSTD_FEED_BYTES = 1 << 11


@dataclass(frozen=True)
class InputSource:
    """One input: a file (``kind`` jsonl or txt, maybe gzip or zstd compressed; or parquet) or a
    built-in corpus (``kind`` builtin)."""

    name: str  # the path, or "builtin:python-docs"
    kind: str  # "jsonl" | "txt" | "parquet" | "builtin"
    gzip: bool = False
    spec: Optional[Any] = None  # a built-in corpus's parameters (SyntheticCopySpec); None = defaults
    zstd: bool = False

    @property
    def compression(self) -> Optional[str]:
        """ "gzip", "zstd" or None (Parquet compresses inside the file: None)."""
        return "gzip" if self.gzip else "zstd" if self.zstd else None

    def size_bytes(self) -> Optional[int]:
        """Bytes on disk (compressed for gzip), or None when unknown."""
        if self.kind == "builtin":
            return None
        try:
            return os.path.getsize(self.name)
        except OSError:
            return None


@dataclass
class Chunk:
    """A run of consecutive input lines (or built-in documents) handed to one worker.

    For an uncompressed regular file the chunk is a byte range (``offset``, ``length``) cut at
    line ends that the worker reads itself (``payload`` None); for Parquet, row group number
    ``offset`` (``length``: its compressed bytes), also read by the worker; otherwise ``payload``
    holds the raw bytes (ending with a line end) or, for a built-in corpus, a list of texts.
    ``input_pos`` is the reader's position in the source after this chunk (bytes on disk).
    ``source_index`` and ``progress_pos`` (bytes on disk of all inputs up to the end of this
    chunk) are set by the run, so that a chunk's result says where it came from.
    """

    source: str
    kind: str
    payload: Union[bytes, list, None]
    offset: int
    length: int
    input_pos: int
    source_index: int = 0
    progress_pos: int = 0

    def data(self) -> Union[bytes, list]:
        """The chunk's bytes (read from the file for a byte range) or its texts."""
        if self.payload is not None:
            return self.payload
        if self.kind == "parquet":
            raise AssertionError("a Parquet chunk is read by readers.parse_chunk")
        try:
            with open(self.source, "rb") as f:
                data = os.pread(f.fileno(), self.length, self.offset)
        except OSError as e:
            raise ValueError(f"input {self.source}: cannot read ({e.strerror})") from None
        if len(data) != self.length:
            raise ValueError(f"input {self.source} changed while being read")
        return data if data.endswith(b"\n") else data + b"\n"


def _source_for(path: str) -> InputSource:
    lower = path.lower()
    if lower.endswith((".parquet", ".pq")):
        return InputSource(path, "parquet")
    gz = lower.endswith(".gz")
    zst = lower.endswith((".zst", ".zstd"))
    base = lower[:-3] if gz else lower.rsplit(".", 1)[0] if zst else lower
    if base.endswith((".jsonl", ".json", ".ndjson")):
        return InputSource(path, "jsonl", gz, zstd=zst)
    if base.endswith(".txt"):
        return InputSource(path, "txt", gz, zstd=zst)
    raise ValueError(
        f"input {path}: unknown file type (expected .jsonl, .json, .ndjson or .txt, optionally "
        ".gz or .zst; or .parquet)"
    )


def builtin_source(name: str, spec: Optional[Any] = None) -> InputSource:
    """The input source of a built-in corpus, ``name`` with or without ``builtin:``; ``spec`` sets
    its parameters (a :class:`~card_megatron.data.builtin.SyntheticCopySpec` for synthetic-copy).
    The command line always uses the defaults; library callers (tests) pass a spec here."""
    bare = builtin_name(name)
    check_spec(bare, spec)
    return InputSource(BUILTIN_PREFIX + bare, "builtin", spec=spec)


def resolve_inputs(patterns: Sequence[Union[str, InputSource]]) -> list[InputSource]:
    """Expands files and globs (sorted) into input sources; ValueError for no match or an unknown type.

    A path that exists is that file even when its name has glob characters (``x[1].jsonl``).

    ``builtin:NAME`` is a built-in corpus with its default parameters; an :class:`InputSource`
    (e.g. from :func:`builtin_source`) is taken as it is.
    """
    if not patterns:
        raise ValueError("no input given (--input)")
    sources: list[InputSource] = []
    for pattern in patterns:
        if isinstance(pattern, InputSource):
            sources.append(pattern)
            continue
        if pattern.startswith(BUILTIN_PREFIX):
            sources.append(builtin_source(pattern))
            continue
        if glob.has_magic(pattern) and not os.path.exists(pattern):  # an existing path is a file, not a pattern
            matches = sorted(p for p in glob.glob(pattern) if not os.path.isdir(p))
            if not matches:
                raise ValueError(f"input {pattern}: no file matches")
        else:
            if not os.path.exists(pattern):
                raise ValueError(f"input {pattern}: no such file")
            if os.path.isdir(pattern):
                raise ValueError(f"input {pattern} is a directory (give files or a glob)")
            matches = [pattern]
        sources.extend(_source_for(p) for p in matches)
    return sources


# -- fingerprints ------------------------------------------------------------------------
def _add_document(sha, text: str) -> None:
    data = text.encode("utf-8")
    sha.update(len(data).to_bytes(8, "little"))
    sha.update(data)


def fingerprint_documents(texts: Iterable[str]) -> str:
    """sha256 (hex) over documents in order, each as its UTF-8 byte count (8 bytes, little
    endian) then its UTF-8 bytes: the fingerprint of a built-in corpus in the sidecar."""
    sha = hashlib.sha256()
    for text in texts:
        _add_document(sha, text)
    return sha.hexdigest()


class InputFingerprint:
    """The content fingerprint of one input, fed its chunks in order as they go by.

    ``sha256``: for a file, of its bytes (after gzip decompression), what ``sha256sum FILE``
    (or ``gzip -dc FILE | sha256sum``) prints; for a built-in corpus, of its documents
    (:func:`fingerprint_documents`). ``of`` says which ("file bytes" or "documents").
    """

    def __init__(self, source: InputSource) -> None:
        self.of = "documents" if source.kind == "builtin" else "file bytes"
        self._sha = hashlib.sha256()
        self._hashed = 0  # Parquet: bytes of the file hashed so far

    def update(self, chunk: Chunk) -> None:
        """Adds the next chunk of the input (for a byte range or a Parquet row group this reads
        the file's bytes up to the chunk's end)."""
        if chunk.kind == "parquet":
            self._hash_file_until(chunk.source, chunk.input_pos)
            return
        data = chunk.data()
        if chunk.kind == "builtin":
            for text in data:
                _add_document(self._sha, text)
        else:  # chunk.length excludes the line end added after an unterminated last line
            self._sha.update(memoryview(data)[: chunk.length])

    def _hash_file_until(self, path: str, end: int) -> None:
        try:
            with open(path, "rb") as f:
                while self._hashed < end:
                    block = os.pread(f.fileno(), min(1 << 22, end - self._hashed), self._hashed)
                    if not block:
                        raise ValueError(f"input {path} changed while being read")
                    self._sha.update(block)
                    self._hashed += len(block)
        except OSError as e:
            raise ValueError(f"input {path}: cannot read ({e.strerror})") from None

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()


# -- chunked reading -----------------------------------------------------------------
class _CountingReader:
    """A binary file object that remembers how many bytes were read from disk."""

    def __init__(self, f) -> None:
        self.f = f
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def readinto(self, b) -> int:  # used by gzip
        n = self.f.readinto(b)
        self.pos += n or 0
        return n

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.f.close()


def iter_chunks(
    source: InputSource,
    chunk_bytes: int = 1 << 20,
    chunk_docs: int = 256,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> Iterator[Chunk]:
    """Splits ``source`` into chunks of about ``chunk_bytes`` bytes cut at line ends.

    Built-in corpora come as lists of ``chunk_docs`` texts, Parquet files as one chunk per row
    group. Raises ValueError naming the file if it cannot be opened or is not valid gzip, zstd
    or Parquet, or is truncated. A line longer than ``max_line_bytes`` is not read to its end:
    the chunk holding its first bytes (more than ``max_line_bytes``) is the last one, and the
    parser (:func:`card_megatron.data.readers.parse_chunk`) names it by file and line.
    """
    if source.kind == "builtin":
        batch: list[str] = []
        size = 0
        for text in builtin_documents(source.name, source.spec):
            batch.append(text)
            size += len(text)
            if len(batch) >= chunk_docs:
                yield Chunk(source.name, "builtin", batch, 0, size, 0)
                batch, size = [], 0
        if batch:
            yield Chunk(source.name, "builtin", batch, 0, size, 0)
        return
    if source.kind == "parquet":
        yield from _parquet_chunks(source)
        return
    if source.compression is None and os.path.isfile(source.name):
        yield from _byte_range_chunks(source, chunk_bytes, max_line_bytes)
        return

    try:
        # Unbuffered: on a pipe each read returns what is there (one system call), so the reading
        # loop goes back to Python between reads, where signal handlers (Ctrl-C, SIGTERM) run.
        raw = open(source.name, "rb", buffering=0)
    except OSError as e:
        raise ValueError(f"input {source.name}: cannot open ({e.strerror})") from None
    counter = _CountingReader(raw)
    lines = LineChunker(chunk_bytes, max_line_bytes)
    try:
        blocks = _decompressed_blocks(source, counter, chunk_bytes)
        while True:
            try:
                block = next(blocks, None)
            except ValueError:  # already names the file (truncated zstd, zstandard missing)
                raise
            except Exception as e:  # OSError, EOFError, gzip.BadGzipFile, zstandard.ZstdError
                what = {"gzip": "not valid gzip: ", "zstd": "not valid zstd: "}.get(source.compression, "")
                raise ValueError(f"input {source.name}: cannot read ({what}{e})") from None
            if block is None:
                break
            payload = lines.feed(block)
            if payload is not None:
                yield Chunk(source.name, source.kind, payload, 0, len(payload), counter.pos)
            if lines.line_too_long:
                return
        rest = lines.finish()
        if rest:
            yield Chunk(source.name, source.kind, rest + b"\n", 0, len(rest), counter.pos)
    finally:
        raw.close()


class LineChunker:
    """Cuts a stream of byte blocks into payloads of whole lines (each ending with a line end) of
    at least ``chunk_bytes`` bytes, in time linear in the input: a line that spans many blocks is
    kept as the list of its blocks and joined once, when its end arrives (joining the carried part
    again at every block made a 128 MB line take 27.5 s, issue 21).

    Once the part of a line read so far exceeds ``max_line_bytes``, :meth:`feed` returns what is
    buffered (that line cut short, given a line end) and sets ``line_too_long``: the caller stops
    reading and the parser names the line. ``join`` concatenates a list of blocks (``b"".join``;
    the tests count what passes through it).
    """

    def __init__(self, chunk_bytes: int, max_line_bytes: int, join=b"".join) -> None:
        self.chunk_bytes = chunk_bytes
        self.max_line_bytes = max_line_bytes
        self.join = join
        self.line_too_long = False
        self._parts: list[bytes] = []
        self._size = 0  # bytes in _parts
        self._open = 0  # bytes of _parts after their last line end: the line being read

    def feed(self, block: bytes) -> Optional[bytes]:
        """Adds the next block; returns a payload of whole lines once ``chunk_bytes`` have gathered
        (or the over-long line, see the class docstring), else None."""
        if not block:
            return None
        nl = block.rfind(b"\n")
        if nl < 0 or self._size + nl + 1 < self.chunk_bytes:
            self._parts.append(block)
            self._size += len(block)
            self._open = self._open + len(block) if nl < 0 else len(block) - nl - 1
            payload = None
        else:
            self._parts.append(block[: nl + 1])
            payload = self.join(self._parts)
            tail = block[nl + 1 :]
            self._parts = [tail] if tail else []
            self._size = self._open = len(tail)
        if self._open > self.max_line_bytes:
            self.line_too_long = True
            return (payload or b"") + self.finish() + b"\n"
        return payload

    def finish(self) -> bytes:
        """What is buffered (whole lines, then maybe an unterminated last line), emptied."""
        rest = self._parts[0] if len(self._parts) == 1 else self.join(self._parts)
        self._parts, self._size, self._open = [], 0, 0
        return rest


def _decompressed_blocks(source: InputSource, counter: _CountingReader, block_bytes: int) -> Iterator[bytes]:
    """The decompressed bytes of ``source`` in blocks (gzip, zstd; otherwise as read)."""
    if source.zstd:
        yield from _zstd_blocks(source.name, counter)
        return
    stream = gzip.GzipFile(fileobj=counter, mode="rb") if source.gzip else counter
    while True:
        block = stream.read(block_bytes)
        if not block:
            return
        yield block


def _zstd_blocks(name: str, counter: _CountingReader) -> Iterator[bytes]:
    """Decompresses a zstd file frame by frame (files made by concatenating .zst files, as some
    datasets ship, read whole) and refuses one that ends inside a frame: zstandard's stream reader
    reads a truncated file to its cut without a word, so the end of every frame is checked here."""
    try:
        import zstandard
    except ImportError:
        raise ValueError(f"input {name}: reading .zst needs zstandard (pip install zstandard, or make setup)") from None
    dctx = zstandard.ZstdDecompressor()
    frame = dctx.decompressobj()
    in_frame = False  # bytes of the current frame were fed and its end is not seen yet
    while True:
        data = counter.read(1 << 16)
        if not data:
            break
        view = memoryview(data)
        for start in range(0, len(data), _ZSTD_FEED_BYTES):
            piece: Union[bytes, memoryview] = view[start : start + _ZSTD_FEED_BYTES]
            while piece:
                out = frame.decompress(piece)
                in_frame = True
                if out:
                    yield out
                if not frame.eof:
                    break
                piece = frame.unused_data  # the next frame starts here
                frame, in_frame = dctx.decompressobj(), False
    if in_frame:
        raise ValueError(
            f"input {name}: cannot read (truncated zstd: the file ends inside a frame, after "
            f"{counter.pos} bytes); the file is incomplete: copy or download it again"
        )


def open_parquet(path: str):
    """``pyarrow.parquet.ParquetFile`` of ``path``; ValueError naming the file when it is not Parquet
    or pyarrow is missing."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"input {path}: reading Parquet needs pyarrow (pip install pyarrow, or make setup)") from None
    try:
        return pq.ParquetFile(path)
    except OSError as e:
        raise ValueError(f"input {path}: cannot open ({e.strerror})") from None
    except Exception as e:  # pyarrow.ArrowInvalid and friends: not Parquet, truncated footer
        raise ValueError(f"input {path}: not a readable Parquet file ({e})") from None


def _parquet_chunks(source: InputSource) -> Iterator[Chunk]:
    """One chunk per row group; ``input_pos``: where the row group's data ends in the file (the
    file's size after the last), for progress and the fingerprint."""
    pf = open_parquet(source.name)
    meta = pf.metadata
    size = os.path.getsize(source.name)
    pos = 0
    largest = max((meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)), default=0)
    if largest > LARGE_ROW_GROUP_BYTES:
        logger.warning(
            "%s: a row group holds %.0f MB (uncompressed); each is read whole by one worker, so "
            "memory and parallelism follow the row groups: rewrite the file with smaller ones "
            "(row_group_size) if this is a problem",
            source.name,
            largest / 1e6,
        )
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        end, stored = pos, 0
        for c in range(rg.num_columns):
            col = rg.column(c)
            dictionary = col.has_dictionary_page and col.dictionary_page_offset
            start = col.dictionary_page_offset if dictionary else col.data_page_offset
            end = max(end, start + col.total_compressed_size)
        pos = size if g == meta.num_row_groups - 1 else min(end, size)
        yield Chunk(source.name, "parquet", None, g, stored, pos)


def _byte_range_chunks(source: InputSource, chunk_bytes: int, max_line_bytes: int) -> Iterator[Chunk]:
    """Byte ranges of an uncompressed file, each ending after a line end (or at the file end). A
    line end not found within ``max_line_bytes`` bytes past a cut makes that range the last one
    (cut there): it holds a line the parser refuses as too long."""
    try:
        f = open(source.name, "rb")
    except OSError as e:
        raise ValueError(f"input {source.name}: cannot open ({e.strerror})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        pos = 0
        while pos < size:
            # shrink the chunks near the end so that no worker idles long on the last one
            end = pos + max(min(chunk_bytes, (size - pos) // 8), min(chunk_bytes, 1 << 16))
            last = False
            if end >= size:
                end = size
            else:
                f.seek(end)
                limit = end + max_line_bytes + 1
                while True:
                    block = f.read(min(1 << 16, limit - end))
                    if not block:
                        end, last = min(end, size), end < size
                        break
                    nl = block.find(b"\n")
                    if nl >= 0:
                        end += nl + 1
                        break
                    end += len(block)
            yield Chunk(source.name, source.kind, None, pos, end - pos, end)
            if last:
                return
            pos = end
