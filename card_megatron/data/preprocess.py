"""Text -> token shards: the library behind ``tools/preprocess_data.py``.

Pipeline: the main process reads raw blocks of input lines or Parquet row groups
(:func:`corpus.iter_chunks`) and hands them, in order, to a pool of worker processes
(:mod:`~card_megatron.data.pool`), at most a few per worker in flight so memory stays bounded.
Each worker parses the chunk (:mod:`~card_megatron.data.readers`: UTF-8, JSON, Parquet columns;
the ``json_keys``), tokenizes with SentencePiece or a Hugging Face ``tokenizer.json``, appends
the end-of-document id and returns the tokens as one packed array per key, with the chunk it
came from. The main process streams them into one C++ shard writer per key
(``{output_prefix}_{key}_document.bin/.idx``), reports progress
(:mod:`~card_megatron.data.progress`) and renames the shards into place only when everything
succeeded; a tokenizer trained by the run (``--train-tokenizer``)
is renamed to ``{output_prefix}.model`` with them. The run holds ``{output_prefix}.lock``
throughout (a second run on the prefix is refused, naming the holder) and first removes the
``*.<pid>.tmp`` files that killed runs left beside its outputs. Every bad line (invalid UTF-8
or JSON, nesting too deep, a lone surrogate, a missing or non-string key; a null Parquet value)
is named by file and line (Parquet: row group and row), or skipped with ``--skip-bad-lines``;
an I/O error names the file (and a full disk).

The sidecar ``{output_prefix}.tokenizer.json`` holds the tokenizer's reserved ids and sizes,
its ``sha256`` (of the serialized SentencePiece model or the tokenizer.json's bytes: training
refuses a shard whose tokenizer differs from ``data.tokenizer_model``) and, under ``"inputs"``,
one record per input saying what the shards were made of::

    {"name": "builtin:synthetic-copy" or the file's absolute path,
     "kind": "builtin" | "jsonl" | "txt" | "parquet",
     "num_lines": lines read (files) or documents generated (built-in), skipped ones included,
     "num_documents": {json key: documents written to that key's shard},
     "sha256": hex digest, "sha256_of": "file bytes" | "documents",
     "parameters": {...}                     built-in only: builtin.builtin_parameters()
     "gzip": bool, "size_bytes": int}        files only
     "zstd": true                             .zst files only

``sha256`` of a file is over its bytes (after gzip or zstd decompression; a Parquet file as
stored; ``sha256sum`` prints the same); of a built-in corpus, over its documents
(``corpus.fingerprint_documents``). Both are computed in the reading process as the chunks go by.
The record lives in the tokenizer sidecar because that is the file the run already writes
atomically next to the shards, and the one a checkpoint copies when the tokenizer was trained
here (``{output_prefix}.model``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import itertools
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from card_megatron.data.corpus import (
    DEFAULT_MAX_LINE_BYTES,
    Chunk,
    InputFingerprint,
    InputSource,
    builtin_parameters,
    iter_chunks,
    resolve_inputs,
)
from card_megatron.data.pool import EncodedChunk, EncodePool
from card_megatron.data.progress import Progress
from card_megatron.data.readers import describe_location, parse_chunk
from card_megatron.data.shards import ShardStats, ShardWriter, shard_exists, token_dtype
from card_megatron.fileio import temp_path, write_error_message
from card_megatron.lock import ExclusiveLock, LockHeldError
from card_megatron.tokenizers import load_tokenizer, train_tokenizer, write_tokenizer_sidecar

logger = logging.getLogger(__name__)


class PreprocessError(ValueError):
    """A user error in the input or the options (the tool prints it without a traceback)."""


@dataclass
class PreprocessOptions:
    """Settings of one preprocessing run (the tool's flags).

    ``inputs``: paths, globs and ``builtin:NAME``, or :class:`InputSource` objects (e.g.
    ``corpus.builtin_source("synthetic-copy", SyntheticCopySpec(num_documents=100))``).
    """

    inputs: Sequence[Union[str, InputSource]]
    output_prefix: str
    json_keys: Sequence[str] = ("text",)
    tokenizer_model: Optional[str] = None
    train_tokenizer: bool = False
    vocab_size: Optional[int] = None
    tokenizer_type: str = "unigram"  # SentencePiece model type for train_tokenizer
    tokenizer_kind: Optional[str] = None  # Megatron's --tokenizer-type; None: told from the file's content
    tokenizer_sample_sentences: int = 1_000_000
    tokenizer_scan_sentences: int = 10_000_000
    workers: int = 1
    overwrite: bool = False
    skip_bad_lines: bool = False
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES  # a longer JSONL/text line is an error naming it
    chunk_bytes: int = 1 << 20
    log_interval: float = 2.0
    seed: int = 0


@dataclass
class PreprocessStats:
    """Summary of a run: counts per output key, lines skipped and why, and timing."""

    outputs: dict[str, ShardStats] = field(default_factory=dict)
    num_lines: int = 0
    skipped: Counter = field(default_factory=Counter)
    text_bytes: int = 0
    elapsed_s: float = 0.0
    tokenizer: Optional[dict] = None
    inputs: list[dict[str, Any]] = field(default_factory=list)  # the sidecar's "inputs" records

    def summary(self) -> str:
        lines = [f"read {self.num_lines} lines/documents ({self.text_bytes / 1e6:.1f} MB) in {self.elapsed_s:.1f} s"]
        for key, s in self.outputs.items():
            lines.append(
                f"  {key}: {s.num_documents} documents, {s.num_tokens} tokens ({s.dtype}) -> {s.prefix}.bin/.idx"
            )
        if self.skipped:
            lines.append("  skipped: " + ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())))
        else:
            lines.append("  skipped: none")
        return "\n".join(lines)


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron's naming: ``{output_prefix}_{key}_document``."""
    return f"{output_prefix}_{key}_document"


def sidecar_for(data_prefix: str) -> Optional[str]:
    """The ``{output_prefix}.tokenizer.json`` written with the shard ``data_prefix``
    (``{output_prefix}_{key}_document``, or ``{data_prefix}.tokenizer.json``); None if there is none."""
    stem = data_prefix[: -len("_document")] if data_prefix.endswith("_document") else ""
    cuts = [i for i, c in enumerate(stem) if c == "_"]
    for candidate in [stem[:i] for i in reversed(cuts)] + [data_prefix]:
        if os.path.isfile(f"{candidate}.tokenizer.json"):
            return f"{candidate}.tokenizer.json"
    return None


# -- the run --------------------------------------------------------------------------
def _iter_texts_for_training(
    sources: Sequence[InputSource], keys: Sequence[str], skip_bad: bool, max_line_bytes: int
) -> Iterator[str]:
    for src in sources:
        line = 0
        for chunk in iter_chunks(src, max_line_bytes=max_line_bytes):
            parsed = parse_chunk(chunk, keys, skip_bad, max_line_bytes)
            if parsed.error:
                raise PreprocessError(describe_location(chunk, line, parsed.error))
            line += parsed.num_records
            for key_texts in parsed.texts:
                yield from key_texts


def _prepare_tokenizer(opts: PreprocessOptions, sources: Sequence[InputSource], keys: tuple[str, ...]):
    if opts.train_tokenizer:
        if opts.tokenizer_kind == "HuggingFaceTokenizer":
            raise PreprocessError(
                "--train-tokenizer trains a SentencePiece model; with --tokenizer-type "
                "HuggingFaceTokenizer give --tokenizer-model path/to/tokenizer.json"
            )
        if opts.tokenizer_model:
            raise PreprocessError("give either --tokenizer-model or --train-tokenizer, not both")
        if not opts.vocab_size:
            raise PreprocessError("--train-tokenizer needs --vocab-size")
        model_path = f"{opts.output_prefix}.model"
        if os.path.exists(model_path) and not opts.overwrite:
            raise PreprocessError(f"output {model_path} already exists (pass --overwrite to replace it)")
        texts = _iter_texts_for_training(sources, keys, opts.skip_bad_lines, opts.max_line_bytes)
        sentences = itertools.islice(texts, opts.tokenizer_scan_sentences)
        # Trained into a temporary file, renamed once the shards are done: a failed run leaves no model.
        tok = train_tokenizer(
            sentences,
            _staged_model(opts),
            opts.vocab_size,
            opts.tokenizer_type,
            opts.tokenizer_sample_sentences,
            opts.seed,
        )
        tok.source = model_path
        return tok
    if not opts.tokenizer_model:
        raise PreprocessError("no tokenizer: give --tokenizer-model PATH or --train-tokenizer --vocab-size N")
    return load_tokenizer(opts.tokenizer_model, opts.tokenizer_kind)


def _staged_model(opts: PreprocessOptions) -> str:
    return temp_path(f"{opts.output_prefix}.model")


def _all_chunks(
    sources: Sequence[InputSource], chunk_bytes: int, fingerprints: Sequence[InputFingerprint], max_line_bytes: int
) -> Iterator[Chunk]:
    """The chunks of every source in order, each told its source's index and the bytes on disk
    of all inputs up to its end; each is fed to its source's fingerprint."""
    done = 0
    for i, src in enumerate(sources):
        last = 0
        for chunk in iter_chunks(src, chunk_bytes, max_line_bytes=max_line_bytes):
            fingerprints[i].update(chunk)
            last = chunk.input_pos
            yield dataclasses.replace(chunk, source_index=i, progress_pos=done + chunk.input_pos)
        done += src.size_bytes() or last


@dataclass
class _InputCounts:
    num_lines: int = 0
    num_documents: Counter = field(default_factory=Counter)


def _input_record(
    src: InputSource, keys: Sequence[str], fingerprint: InputFingerprint, counts: _InputCounts
) -> dict[str, Any]:
    """One entry of the sidecar's "inputs" list (format in the module docstring)."""
    builtin = src.kind == "builtin"
    record: dict[str, Any] = {
        "name": src.name if builtin else os.path.abspath(src.name),
        "kind": src.kind,
        "num_lines": counts.num_lines,
        "num_documents": {k: counts.num_documents[k] for k in keys},
        "sha256": fingerprint.sha256,
        "sha256_of": fingerprint.of,
    }
    if builtin:
        record["parameters"] = builtin_parameters(src.name, src.spec)
    else:
        record["gzip"] = src.gzip
        if src.zstd:
            record["zstd"] = True
        record["size_bytes"] = src.size_bytes()
    return record


def preprocess(opts: PreprocessOptions) -> PreprocessStats:
    """Tokenizes ``opts.inputs`` into one shard per JSON key; returns the run's statistics.

    Raises PreprocessError (a ValueError) for every user error: bad input lines (naming file
    and line), missing key, missing tokenizer, existing output without ``overwrite``, another
    run writing the same output prefix (``{output_prefix}.lock`` names it). On any error or
    interruption no finished-looking shard is left behind.
    """
    out_dir = os.path.dirname(os.path.abspath(opts.output_prefix))
    if not os.path.isdir(out_dir):
        raise PreprocessError(f"output directory {out_dir} does not exist")
    lock = ExclusiveLock(
        f"{opts.output_prefix}.lock",
        0.0,
        "Another preprocessing run is writing this "
        "--output-prefix: wait for it to end, or choose another --output-prefix.",
    )
    try:
        lock.acquire()
    except LockHeldError as e:
        raise PreprocessError(str(e)) from None
    try:
        _remove_dead_temporaries(opts)
        return _preprocess(opts)
    except OSError as e:  # a full disk, above all: the shard writer and the sidecar raise it naming the file
        raise PreprocessError(f"{write_error_message(e, opts.output_prefix)}; no output written") from None
    finally:
        lock.release()


def _remove_dead_temporaries(opts: PreprocessOptions) -> None:
    """Removes the temporary files (``OUTPUT.<pid>.tmp``) that killed runs left beside this run's
    outputs: under the output prefix's lock no other run is writing them."""
    outputs = [f"{opts.output_prefix}.model", f"{opts.output_prefix}.tokenizer.json"]
    for key in opts.json_keys:
        outputs += [f"{output_prefix_for(opts.output_prefix, key)}.{ext}" for ext in ("bin", "idx")]
    for out in outputs:
        for path in glob.glob(f"{glob.escape(out)}.*.tmp"):
            if re.fullmatch(r"(\.\d+\.tmp)+", path[len(out) :]) and os.path.isfile(path):
                logger.warning("removing %s, left by a preprocessing run that was killed", path)
                os.remove(path)


def _preprocess(opts: PreprocessOptions) -> PreprocessStats:
    t0 = time.monotonic()
    keys = tuple(opts.json_keys)
    if not keys:
        raise PreprocessError("--json-keys needs at least one key")
    if opts.workers < 1:
        raise PreprocessError(f"--workers ({opts.workers}) must be at least 1")
    if opts.max_line_bytes < 1:
        raise PreprocessError(f"--max-line-bytes ({opts.max_line_bytes}) must be at least 1")
    sources = resolve_inputs(opts.inputs)
    for src in sources:
        if src.kind not in ("jsonl", "parquet") and keys != ("text",):
            raise PreprocessError(
                f"input {src.name} has one document per line (no JSON keys); "
                f"--json-keys must be 'text', got {list(keys)}"
            )
    prefixes = {k: output_prefix_for(opts.output_prefix, k) for k in keys}
    if not opts.overwrite:
        for p in prefixes.values():
            if shard_exists(p):
                raise PreprocessError(f"output {p}.bin/.idx already exists (pass --overwrite to replace it)")

    tok = _prepare_tokenizer(opts, sources, keys)
    dtype = token_dtype(tok.vocab_size)
    logger.info("tokenizer %s; tokens stored as %s", tok, dtype)

    stats = PreprocessStats(tokenizer=tok.metadata())
    sizes = [s.size_bytes() for s in sources]
    progress = Progress(sum(sizes) if all(x is not None for x in sizes) else None, opts.log_interval)
    fingerprints = [InputFingerprint(src) for src in sources]
    counts = [_InputCounts() for _ in sources]
    writers: dict[str, ShardWriter] = {}
    placed: list[str] = []  # outputs renamed into place: removed again if a later step fails
    try:
        for k in keys:
            writers[k] = ShardWriter(prefixes[k], dtype=dtype, overwrite=opts.overwrite)
        chunks = _all_chunks(sources, opts.chunk_bytes, fingerprints, opts.max_line_bytes)
        with EncodePool(opts.workers, tok, keys, opts.skip_bad_lines, dtype, opts.max_line_bytes) as pool:
            try:
                for result in pool.imap(chunks):
                    _write(result, keys, writers, stats, counts[result.chunk.source_index])
                    progress.update(
                        result.num_documents, result.num_tokens, result.text_bytes, result.chunk.progress_pos
                    )
            except BrokenProcessPool:
                raise PreprocessError("a tokenizer worker process died (out of memory or killed?)") from None
        progress.close()
        for k, w in writers.items():
            if w.num_documents == 0:
                raise PreprocessError(f"no documents for key {k!r} in the input (all skipped: {dict(stats.skipped)})")
        for k, w in writers.items():
            stats.outputs[k] = w.finalize()
            placed += [f"{w.prefix}.bin", f"{w.prefix}.idx"]
        if opts.train_tokenizer:
            os.replace(_staged_model(opts), f"{opts.output_prefix}.model")
            placed.append(f"{opts.output_prefix}.model")
        stats.inputs = [_input_record(src, keys, fp, c) for src, fp, c in zip(sources, fingerprints, counts)]
        write_tokenizer_sidecar(tok, f"{opts.output_prefix}.tokenizer.json", inputs=stats.inputs)
    except BaseException:
        progress.close()
        for w in writers.values():
            w.abort()
        if opts.train_tokenizer and os.path.exists(_staged_model(opts)):
            os.remove(_staged_model(opts))
        for path in placed:  # e.g. the sidecar met a full disk after the shards were in place
            with contextlib.suppress(OSError):
                os.remove(path)
        raise
    stats.elapsed_s = time.monotonic() - t0
    return stats


def _write(
    result: EncodedChunk,
    keys: tuple[str, ...],
    writers: dict[str, ShardWriter],
    stats: PreprocessStats,
    counts: _InputCounts,
) -> None:
    """Appends one chunk's documents to the shards, or raises the chunk's first bad record
    (named by file and line, row or document)."""
    first_record = counts.num_lines
    if result.error:
        raise PreprocessError(describe_location(result.chunk, first_record, result.error))
    counts.num_lines = first_record + result.num_records
    for k, key in enumerate(keys):
        writers[key].add_documents(result.tokens[k], result.lengths[k])
        counts.num_documents[key] += len(result.lengths[k])
    stats.skipped.update(result.skipped)
    stats.num_lines += result.num_records
    stats.text_bytes += result.text_bytes
