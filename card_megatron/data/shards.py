"""Token shards: Megatron ``MMIDIDX`` version-1 ``.bin``/``.idx`` pairs, read and written.

A shard ``PREFIX`` is ``PREFIX.bin`` (the tokens of every sequence back to back) and
``PREFIX.idx``::

    9 bytes  b"MMIDIDX\\x00\\x00"      8 bytes  u64 version (1)     1 byte  u8 dtype code
    8 bytes  u64 sequence count S      8 bytes  u64 document count D (= documents + 1)
    S x i32 sequence lengths (tokens)  S x i64 byte pointers into .bin
    D x i64 document indices: 0, then the sequence index one past each document

Dtype codes are Megatron's (4 int32, 8 uint16, ...); tokens are uint16 when the vocabulary
is under 65500, else int32. Files written here and by
``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`` are interchangeable.
Writing goes through the C++ ``card_megatron._indexer.ShardWriter`` into temporary names
that are renamed only once the shard is complete.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from card_megatron.fileio import file_sha256, fsync_path, temp_path

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 9 + 8 + 1 + 8 + 8
# Megatron's DType codes (megatron.core.datasets.indexed_dataset.DType); float codes are rejected.
DTYPE_CODES: dict[int, type] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
UINT16_VOCAB_LIMIT = 65500


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when the vocabulary (incl. reserved ids) is under 65500, else int32 (Megatron's rule)."""
    return np.dtype(np.uint16) if vocab_size < UINT16_VOCAB_LIMIT else np.dtype(np.int32)


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def shard_exists(prefix: str) -> bool:
    """True if either file of the shard exists."""
    return os.path.exists(bin_path(prefix)) or os.path.exists(idx_path(prefix))


class TokenShard:
    """Read-only, memory-mapped view of one shard.

    ``shard[i]`` is sequence i as a NumPy view ``[sequence_lengths[i]]`` of ``dtype`` (no copy).
    Opening checks the header (magic, version, dtype code) and that both file sizes match the
    counts and lengths; a truncated or foreign file raises ValueError naming the file.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.idx_path = idx_path(prefix)
        self.bin_path = bin_path(prefix)
        for p in (self.idx_path, self.bin_path):
            if not os.path.isfile(p):
                raise ValueError(f"token shard file not found: {p}")
        idx_size = os.path.getsize(self.idx_path)
        with open(self.idx_path, "rb") as f:
            header = f.read(HEADER_BYTES)
        if len(header) < len(MAGIC) or header[: len(MAGIC)] != MAGIC:
            raise ValueError(f"{self.idx_path} is not a Megatron MMIDIDX index (bad magic)")
        if len(header) < HEADER_BYTES:
            raise ValueError(f"{self.idx_path} is truncated ({idx_size} bytes, header needs {HEADER_BYTES})")
        version, code, num_seq, num_doc = struct.unpack("<QBQQ", header[len(MAGIC) :])
        if version != VERSION:
            raise ValueError(f"{self.idx_path}: unsupported MMIDIDX version {version} (expected {VERSION})")
        if code not in DTYPE_CODES:
            raise ValueError(
                f"{self.idx_path}: unsupported token dtype code {code} (integer codes: {sorted(DTYPE_CODES)})"
            )
        expected = HEADER_BYTES + num_seq * (4 + 8) + num_doc * 8
        if idx_size != expected:
            what = "truncated" if idx_size < expected else "longer than its header says (multimodal or foreign?)"
            raise ValueError(
                f"{self.idx_path} is {what}: {idx_size} bytes, expected {expected} for {num_seq} sequences "
                f"and {num_doc} document indices"
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        self.dtype_code = code
        idx = np.memmap(self.idx_path, dtype=np.uint8, mode="r") if idx_size else np.empty(0, np.uint8)
        off = HEADER_BYTES
        self.sequence_lengths: np.ndarray = idx[off : off + 4 * num_seq].view(np.int32)
        off += 4 * num_seq
        self.sequence_pointers: np.ndarray = idx[off : off + 8 * num_seq].view(np.int64)
        off += 8 * num_seq
        self.document_indices: np.ndarray = idx[off : off + 8 * num_doc].view(np.int64)
        self._check_bin()
        bin_size = os.path.getsize(self.bin_path)
        self._tokens = (
            np.memmap(self.bin_path, dtype=self.dtype, mode="r") if bin_size else np.empty(0, dtype=self.dtype)
        )

    def _check_bin(self) -> None:
        bin_size = os.path.getsize(self.bin_path)
        n = len(self.sequence_lengths)
        item = self.dtype.itemsize
        if n == 0:
            expected = 0
        else:
            if self.sequence_pointers[0] != 0 or int(self.sequence_lengths.min()) < 0:
                raise ValueError(f"{self.idx_path}: corrupt index (first pointer {self.sequence_pointers[0]} != 0)")
            expected = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * item
            total = int(self.sequence_lengths.sum(dtype=np.int64)) * item
            if expected != total:
                raise ValueError(f"{self.idx_path}: corrupt index (pointers do not follow the lengths)")
        if bin_size != expected:
            what = "truncated" if bin_size < expected else "longer than its index says"
            raise ValueError(
                f"{self.bin_path} is {what}: {bin_size} bytes, the index {self.idx_path} expects {expected}"
            )
        docs = self.document_indices
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != n:
            raise ValueError(f"{self.idx_path}: corrupt document indices (must run from 0 to {n})")

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getstate__(self) -> dict:  # pickles as its prefix (e.g. to DataLoader workers), not its data
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({n} sequences)")
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self._tokens[start : start + int(self.sequence_lengths[i])]

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> np.ndarray:
        """All tokens of the shard, memory-mapped ``[num_tokens]``."""
        return self._tokens

    def check_consistency(self) -> None:
        """O(N) check of every pointer and document index (opening checks only sizes and ends)."""
        item = self.dtype.itemsize
        expected = np.zeros(len(self), dtype=np.int64)
        if len(self):
            np.cumsum(self.sequence_lengths[:-1], dtype=np.int64, out=expected[1:])
        if not np.array_equal(expected * item, self.sequence_pointers):
            raise ValueError(f"{self.idx_path}: sequence pointers do not match the lengths")
        if np.any(np.diff(self.document_indices) < 0):
            raise ValueError(f"{self.idx_path}: document indices are not non-decreasing")

    def __repr__(self) -> str:
        return f"TokenShard({self.prefix!r}, sequences={len(self)}, tokens={self.num_tokens}, dtype={self.dtype})"


def shard_fingerprint(prefix: str) -> str:
    """Cheap identity of a shard: sizes and mtimes (ns) of both files plus a SHA-256 of the .idx.

    Changes whenever either file is rewritten; the sample-index cache keys on it.
    """
    parts = []
    for p in (bin_path(prefix), idx_path(prefix)):
        try:
            st = os.stat(p)
        except OSError:
            raise ValueError(f"token shard file not found: {p}") from None
        parts.append(f"{st.st_size}:{st.st_mtime_ns}")
    return "-".join(parts) + "-" + file_sha256(idx_path(prefix))[:32]


@dataclass
class ShardStats:
    """What a finished shard holds."""

    prefix: str
    num_sequences: int
    num_documents: int
    num_tokens: int
    dtype: np.dtype


class ShardWriter:
    """Streams documents into ``PREFIX.bin``/``PREFIX.idx`` via the C++ writer.

    Files are written under ``PREFIX.{bin,idx}.<pid>.tmp`` and renamed by :meth:`finalize`
    (.bin first, .idx last: an existing .idx means the shard is complete). Used as a context
    manager, an exception aborts (deletes the temporaries); a clean exit finalizes.
    ``dtype`` defaults to :func:`token_dtype` of ``vocab_size``.
    """

    def __init__(
        self, prefix: str, vocab_size: Optional[int] = None, dtype: Optional[np.dtype] = None, overwrite: bool = False
    ) -> None:
        from card_megatron import _indexer

        if dtype is None:
            if vocab_size is None:
                raise ValueError("ShardWriter needs vocab_size or dtype")
            dtype = token_dtype(vocab_size)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self.vocab_size = vocab_size
        if vocab_size is not None and vocab_size - 1 > np.iinfo(self.dtype).max:
            raise ValueError(f"vocab size {vocab_size} does not fit dtype {self.dtype}")
        self.prefix = prefix
        if not overwrite and shard_exists(prefix):
            raise ValueError(f"output {prefix}.bin/.idx already exists (pass --overwrite to replace it)")
        parent = os.path.dirname(os.path.abspath(prefix))
        if not os.path.isdir(parent):
            raise ValueError(f"output directory {parent} does not exist")
        self._tmp_bin = temp_path(bin_path(prefix))
        self._tmp_idx = temp_path(idx_path(prefix))
        self._w = _indexer.ShardWriter(self._tmp_bin, self._tmp_idx, CODE_OF_DTYPE[self.dtype])
        self._done = False

    def _as_tokens(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.dtype != self.dtype:
            if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max):
                raise ValueError(f"token ids out of range for {self.dtype}")
            tokens = tokens.astype(self.dtype)
        return np.ascontiguousarray(tokens.reshape(-1))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Appends ``len(lengths)`` documents, one sequence each; tokens ``[sum(lengths)]`` concatenated."""
        self._w.add_documents(self._as_tokens(tokens), np.asarray(lengths, dtype=np.int64))

    def add_document(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Appends one document (one sequence)."""
        t = self._as_tokens(np.asarray(tokens))
        self._w.add_documents(t, np.array([t.size], dtype=np.int64))

    def add_shard(self, prefix: str, block_tokens: int = 1 << 24) -> None:
        """Appends every sequence and document of shard ``prefix`` (streamed, same dtype required)."""
        src = TokenShard(prefix)
        if src.dtype != self.dtype:
            raise ValueError(f"cannot merge {prefix} ({src.dtype}) into {self.prefix} ({self.dtype})")
        base = self._w.num_sequences
        n = len(src)
        lengths = src.sequence_lengths
        start = 0
        while start < n:
            # as many sequences as fit in block_tokens (at least one)
            csum = np.cumsum(lengths[start : start + 65536], dtype=np.int64)
            k = max(1, int(np.searchsorted(csum, block_tokens, side="right")))
            stop = start + k
            t0 = int(src.sequence_pointers[start]) // self.dtype.itemsize
            t1 = t0 + int(csum[k - 1])
            self._w.add_sequences(src.tokens[t0:t1], lengths[start:stop])
            start = stop
        self._w.add_document_ends(src.document_indices[1:] + base)

    @property
    def num_documents(self) -> int:
        return self._w.num_documents

    @property
    def num_tokens(self) -> int:
        return self._w.num_tokens

    def finalize(self) -> ShardStats:
        """Writes the index and renames both files into place."""
        num_seq, num_doc, num_tok = self._w.finalize()
        if os.path.exists(idx_path(self.prefix)):
            os.remove(idx_path(self.prefix))  # never pair an old .idx with the new .bin
        fsync_path(self._tmp_bin)
        fsync_path(self._tmp_idx)
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(self._tmp_idx, idx_path(self.prefix))
        self._done = True
        return ShardStats(self.prefix, num_seq, num_doc, num_tok, self.dtype)

    def abort(self) -> None:
        """Deletes the temporary files; the final names are never touched."""
        if not self._done:
            self._w.abort()
            self._done = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()


def merge_shards(prefixes: Sequence[str], output_prefix: str, overwrite: bool = False) -> ShardStats:
    """Concatenates shards (same dtype) into ``output_prefix``, streaming; returns its stats."""
    if not prefixes:
        raise ValueError("merge needs at least one input shard")
    shards = [TokenShard(p) for p in prefixes]  # validates every input before writing anything
    dtypes = {s.dtype for s in shards}
    if len(dtypes) != 1:
        raise ValueError(
            "cannot merge shards of different dtypes: " + ", ".join(f"{s.prefix} ({s.dtype})" for s in shards)
        )
    if os.path.abspath(output_prefix) in {os.path.abspath(p) for p in prefixes}:
        raise ValueError(f"merge output {output_prefix} is also an input")
    del shards
    with ShardWriter(output_prefix, dtype=dtypes.pop(), overwrite=overwrite) as w:
        for p in prefixes:
            w.add_shard(p)
        return w.finalize()
