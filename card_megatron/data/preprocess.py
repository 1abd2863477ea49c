"""Text -> token shards: the library behind ``tools/preprocess_data.py``.

Pipeline: the main process reads raw blocks of input lines (:func:`corpus.iter_chunks`) and
hands them, in order, to a pool of worker processes, at most a few per worker in flight so
memory stays bounded. Each worker decodes UTF-8, parses JSON, takes the ``json_keys``,
tokenizes with SentencePiece, appends the end-of-document id and returns the tokens as one
packed array per key. The main process streams them into one C++ shard writer per key
(``{output_prefix}_{key}_document.bin/.idx``), reports progress and renames the shards into
place only when everything succeeded; a tokenizer trained by the run (``--train-tokenizer``)
is renamed to ``{output_prefix}.model`` with them. The run holds ``{output_prefix}.lock``
throughout (a second run on the prefix is refused, naming the holder) and first removes the
``*.<pid>.tmp`` files that killed runs left beside its outputs. Every bad line (invalid UTF-8
or JSON, nesting too deep, a lone surrogate, a missing or non-string key) is named by file and
line, or skipped with ``--skip-bad-lines``; an I/O error names the file (and a full disk).

The sidecar ``{output_prefix}.tokenizer.json`` holds the tokenizer's reserved ids and sizes,
its ``sha256`` (of the serialized SentencePiece model: training refuses a shard whose tokenizer
differs from ``data.tokenizer_model``) and, under ``"inputs"``, one record per input saying what
the shards were made of::

    {"name": "builtin:synthetic-copy" or the file's absolute path,
     "kind": "builtin" | "jsonl" | "txt",
     "num_lines": lines read (files) or documents generated (built-in), skipped ones included,
     "num_documents": {json key: documents written to that key's shard},
     "sha256": hex digest, "sha256_of": "file bytes" | "documents",
     "parameters": {...}                     built-in only: builtin.builtin_parameters()
     "gzip": bool, "size_bytes": int}        files only

``sha256`` of a file is over its bytes (after gzip decompression; ``sha256sum`` prints the
same); of a built-in corpus, over its documents (``corpus.fingerprint_documents``). Both are
computed in the reading process as the chunks go by. The record lives in the tokenizer
sidecar because that is the file the run already writes atomically next to the shards, and
the one a checkpoint copies when the tokenizer was trained here (``{output_prefix}.model``).
"""

from __future__ import annotations

import errno
import glob
import itertools
import json
import logging
import multiprocessing as mp
import operator
import os
import re
import signal
import sys
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

from card_megatron.data.corpus import (
    Chunk,
    InputFingerprint,
    InputSource,
    builtin_parameters,
    iter_chunks,
    resolve_inputs,
)
from card_megatron.data.shards import ShardStats, ShardWriter, shard_exists, token_dtype
from card_megatron.lock import ExclusiveLock, LockHeldError
from card_megatron.tokenizer import Tokenizer, train_tokenizer, write_tokenizer_sidecar

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
    tokenizer_type: str = "unigram"
    tokenizer_sample_sentences: int = 1_000_000
    tokenizer_scan_sentences: int = 10_000_000
    workers: int = 1
    overwrite: bool = False
    skip_bad_lines: bool = False
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


# -- parsing (shared by the workers and tokenizer training) ---------------------------
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


def _parse_clean_chunk(
    data: bytes, kind: str, keys: Sequence[str]
) -> Optional[tuple[list[list[str]], Counter, int]]:
    """Fast path of :func:`_parse_chunk` for a chunk without a single bad line: the whole chunk
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
    for k, key in enumerate(keys):
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


def _parse_chunk(
    chunk: Chunk, keys: Sequence[str], skip_bad_lines: bool
) -> tuple[list[list[str]], Counter, int, int, Optional[tuple[int, str]]]:
    """Parses one chunk.

    Returns (texts per key, skip counts, number of lines, text bytes, first error). The error,
    when not skipping bad lines, is (0-based line index within the chunk, message).
    """
    texts: list[list[str]] = [[] for _ in keys]
    skipped: Counter = Counter()
    data = chunk.data()
    if chunk.kind == "builtin":
        for t in data:
            if t.strip():
                texts[0].append(t)
            else:
                skipped["empty documents"] += 1
        return texts, skipped, len(data), chunk.length, None

    fast = _parse_clean_chunk(data, chunk.kind, keys)
    if fast is not None:
        return fast[0], fast[1], fast[2], len(data), None
    texts, skipped, num_lines, error = _parse_lines(data, chunk.kind, keys, skip_bad_lines)
    return texts, skipped, num_lines, len(data), error


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
                bad(i, "lines with a lone surrogate", f"key {key!r} holds a lone UTF-16 surrogate "
                    f"({v[e.start]!r} at character {e.start})")
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


# -- workers --------------------------------------------------------------------------
_W: dict = {}


_STARTUP_BLOCKED = {signal.SIGINT, signal.SIGTERM}


def _noop() -> None:
    pass


def _start_pool(workers: int, ctx, init_state: Optional[dict]) -> ProcessPoolExecutor:
    """Starts every worker with SIGINT/SIGTERM blocked, so that an interruption can never land
    half-way through the executor's start-up (it would leave workers nobody shuts down)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STARTUP_BLOCKED)
    try:
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(init_state,))
        pool.submit(_noop).result()  # under fork this starts all the workers
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a pending signal is delivered here
    return pool


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when the main process dies (even by SIGKILL);
    otherwise it would wait on the task queue forever."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - no prctl
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _init_worker(state: Optional[dict]) -> None:
    """Worker start: ``state`` is None under fork, where the parent's ``_W`` (tokenizer already
    loaded) is inherited; otherwise the bytes-based state to rebuild it from."""
    # Forked workers inherit the parent's Python signal handlers; a worker must die on SIGTERM
    # (pool shutdown) and leave Ctrl-C to the parent, which cleans up.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STARTUP_BLOCKED)  # blocked by the parent around the fork
    _die_with_parent()
    if state is not None:
        _W.update(_worker_state(**state))


def _worker_state(model_bytes: bytes, keys: tuple[str, ...], skip_bad_lines: bool, dtype: str,
                  tokenizer: Optional[Tokenizer] = None) -> dict:
    tok = tokenizer if tokenizer is not None else Tokenizer.from_serialized(model_bytes)
    return {"tok": tok, "keys": keys, "skip": skip_bad_lines, "dtype": np.dtype(dtype)}


@dataclass
class _ChunkResult:
    tokens: list  # per key: packed tokens, shard dtype
    lengths: list  # per key: int32 lengths
    skipped: Counter
    num_lines: int
    text_bytes: int
    error: Optional[tuple[int, str]]  # (line index within the chunk, message)


def _encode_chunk(chunk: Chunk) -> _ChunkResult:
    tok: Tokenizer = _W["tok"]
    try:
        texts, skipped, num_lines, text_bytes, error = _parse_chunk(chunk, _W["keys"], _W["skip"])
    except ValueError as e:  # the file could not be read
        return _ChunkResult([], [], Counter(), 0, 0, (-1, str(e)))
    out_tokens, out_lengths = [], []
    if error is None:
        for key_texts in texts:
            ids = tok.encode_batch(key_texts, add_eos=True) if key_texts else []
            lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
            # ids < vocab size, which fits the dtype (checked when the shard dtype was chosen)
            packed = np.concatenate(ids, dtype=_W["dtype"], casting="unsafe") if ids else np.empty(0, _W["dtype"])
            out_tokens.append(packed)
            out_lengths.append(lengths)
    return _ChunkResult(out_tokens, out_lengths, skipped, num_lines, text_bytes, error)


def _ordered_map(pool: ProcessPoolExecutor, fn, items: Iterable, max_in_flight: int) -> Iterator:
    """Like ``Pool.imap(fn, items)`` (ordered) but reads ``items`` only as results are consumed."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= max_in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# -- progress -------------------------------------------------------------------------
class _Progress:
    def __init__(self, total_bytes: Optional[int], interval: float) -> None:
        self.total = total_bytes
        self.interval = interval
        self.start = time.monotonic()
        self.last = self.start
        self.docs = self.tokens = self.text_bytes = self.disk_done = 0

    def update(self, docs: int, tokens: int, text_bytes: int, disk_pos: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.text_bytes += text_bytes
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        dt = max(now - self.start, 1e-9)
        msg = (
            f"{self.docs:,} docs ({self.docs / dt:,.0f} docs/s), {self.tokens:,} tokens ({self.tokens / dt:,.0f} tokens/s), "
            f"{self.text_bytes / 1e6 / dt:.2f} MB/s"
        )
        if self.total and disk_pos:
            frac = min(disk_pos / self.total, 1.0)
            eta = dt * (1 - frac) / max(frac, 1e-9)
            msg += f", {100 * frac:.1f}% done, ETA {eta:,.0f} s"
        logger.info(msg)


# -- the run --------------------------------------------------------------------------
def _iter_texts_for_training(sources: Sequence[InputSource], keys: Sequence[str], skip_bad: bool) -> Iterator[str]:
    for src in sources:
        line = 0
        for chunk in iter_chunks(src):
            texts, _, num_lines, _, error = _parse_chunk(chunk, keys, skip_bad)
            if error:
                raise PreprocessError(_error_message(chunk, line, error))
            line += num_lines
            for key_texts in texts:
                yield from key_texts


def _error_message(chunk: Chunk, first_line: int, error: tuple[int, str]) -> str:
    if error[0] < 0:
        return error[1]
    unit = "document" if chunk.kind == "builtin" else "line"
    sep = " " + unit + " " if chunk.kind == "builtin" else ":"
    return f"{chunk.source}{sep}{first_line + error[0] + 1}: {error[1]}"


def _prepare_tokenizer(opts: PreprocessOptions, sources: Sequence[InputSource], keys: tuple[str, ...]) -> Tokenizer:
    if opts.train_tokenizer:
        if opts.tokenizer_model:
            raise PreprocessError("give either --tokenizer-model or --train-tokenizer, not both")
        if not opts.vocab_size:
            raise PreprocessError("--train-tokenizer needs --vocab-size")
        model_path = f"{opts.output_prefix}.model"
        if os.path.exists(model_path) and not opts.overwrite:
            raise PreprocessError(f"output {model_path} already exists (pass --overwrite to replace it)")
        sentences = itertools.islice(
            _iter_texts_for_training(sources, keys, opts.skip_bad_lines), opts.tokenizer_scan_sentences
        )
        # Trained into a temporary file, renamed once the shards are done: a failed run leaves no model.
        tok = train_tokenizer(sentences, _staged_model(opts), opts.vocab_size, opts.tokenizer_type,
                              opts.tokenizer_sample_sentences, opts.seed)
        tok.source = model_path
        return tok
    if not opts.tokenizer_model:
        raise PreprocessError("no tokenizer: give --tokenizer-model PATH or --train-tokenizer --vocab-size N")
    return Tokenizer.load(opts.tokenizer_model)


def _staged_model(opts: PreprocessOptions) -> str:
    return f"{opts.output_prefix}.model.{os.getpid()}.tmp"


def _all_chunks(sources: Sequence[InputSource], chunk_bytes: int, disk_before: deque,
                fingerprints: Sequence[InputFingerprint]) -> Iterator[Chunk]:
    """The chunks of every source in order; appends (disk position, source index) of each to
    ``disk_before`` and feeds it to its source's fingerprint."""
    done = 0
    for i, src in enumerate(sources):
        last = 0
        for chunk in iter_chunks(src, chunk_bytes):
            fingerprints[i].update(chunk)
            disk_before.append((done + chunk.input_pos, i))
            last = chunk.input_pos
            yield chunk
        done += src.size_bytes() or last


@dataclass
class _InputCounts:
    num_lines: int = 0
    num_documents: Counter = field(default_factory=Counter)


def _input_record(src: InputSource, keys: Sequence[str], fingerprint: InputFingerprint,
                  counts: _InputCounts) -> dict[str, Any]:
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
    lock = ExclusiveLock(f"{opts.output_prefix}.lock", 0.0, "Another preprocessing run is writing this "
                         "--output-prefix: wait for it to end, or choose another --output-prefix.")
    try:
        lock.acquire()
    except LockHeldError as e:
        raise PreprocessError(str(e)) from None
    try:
        _remove_dead_temporaries(opts)
        return _preprocess(opts)
    except OSError as e:
        why = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
        raise PreprocessError(f"{e.filename or opts.output_prefix}: {why}; no output written") from None
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
            if re.fullmatch(r"(\.\d+\.tmp)+", path[len(out):]) and os.path.isfile(path):
                logger.warning("removing %s, left by a preprocessing run that was killed", path)
                os.remove(path)


def _preprocess(opts: PreprocessOptions) -> PreprocessStats:
    t0 = time.monotonic()
    keys = tuple(opts.json_keys)
    if not keys:
        raise PreprocessError("--json-keys needs at least one key")
    if opts.workers < 1:
        raise PreprocessError(f"--workers ({opts.workers}) must be at least 1")
    sources = resolve_inputs(opts.inputs)
    for src in sources:
        if src.kind != "jsonl" and keys != ("text",):
            raise PreprocessError(
                f"input {src.name} has one document per line (no JSON keys); --json-keys must be 'text', got {list(keys)}"
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
    progress = _Progress(sum(sizes) if all(x is not None for x in sizes) else None, opts.log_interval)
    disk_pos: deque = deque()  # (disk position, source index) after each submitted chunk, consumed in order
    fingerprints = [InputFingerprint(src) for src in sources]
    counts = [_InputCounts() for _ in sources]
    writers: dict[str, ShardWriter] = {}
    try:
        for k in keys:
            writers[k] = ShardWriter(prefixes[k], dtype=dtype, overwrite=opts.overwrite)
        meta: deque = deque()  # submitted chunks, in order, until their result is consumed
        chunks = _track(_all_chunks(sources, opts.chunk_bytes, disk_pos, fingerprints), meta)
        state = {"model_bytes": b"", "keys": keys, "skip_bad_lines": opts.skip_bad_lines, "dtype": dtype.str}
        _W.clear()
        _W.update(_worker_state(**state, tokenizer=tok))
        if opts.workers == 1:
            _run(map(_encode_chunk, chunks), meta, keys, writers, stats, progress, disk_pos, counts)
        else:
            fork = "fork" in mp.get_all_start_methods()
            ctx = mp.get_context("fork") if fork else mp.get_context()
            init_state = None if fork else {**state, "model_bytes": tok.serialized()}
            # ProcessPoolExecutor rather than Pool: a worker that dies (OOM killer, signal) raises
            # BrokenProcessPool instead of leaving its task unanswered forever.
            pool = _start_pool(opts.workers, ctx, init_state)
            try:
                results = _ordered_map(pool, _encode_chunk, chunks, 2 * opts.workers)
                _run(results, meta, keys, writers, stats, progress, disk_pos, counts)
            except BrokenProcessPool:
                raise PreprocessError("a tokenizer worker process died (out of memory or killed?)") from None
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        for k, w in writers.items():
            if w.num_documents == 0:
                raise PreprocessError(f"no documents for key {k!r} in the input (all skipped: {dict(stats.skipped)})")
        for k, w in writers.items():
            stats.outputs[k] = w.finalize()
        if opts.train_tokenizer:
            os.replace(_staged_model(opts), f"{opts.output_prefix}.model")
        stats.inputs = [_input_record(src, keys, fp, c) for src, fp, c in zip(sources, fingerprints, counts)]
        write_tokenizer_sidecar(tok, f"{opts.output_prefix}.tokenizer.json", inputs=stats.inputs)
    except BaseException:
        for w in writers.values():
            w.abort()
        if opts.train_tokenizer and os.path.exists(_staged_model(opts)):
            os.remove(_staged_model(opts))
        raise
    finally:
        _W.clear()  # the tokenizer, shared with forked workers
    stats.elapsed_s = time.monotonic() - t0
    return stats


def _track(chunks: Iterable[Chunk], meta: deque) -> Iterator[Chunk]:
    for c in chunks:
        meta.append(c)
        yield c


def _run(results, meta, keys, writers, stats, progress, disk_pos, counts: list[_InputCounts]) -> None:
    # meta and disk_pos hold the submitted chunks in order: each result belongs to the oldest
    for res in results:
        chunk = meta.popleft()
        pos, source = disk_pos.popleft()
        first_line = counts[source].num_lines
        if res.error:
            raise PreprocessError(_error_message(chunk, first_line, res.error))
        counts[source].num_lines = first_line + res.num_lines
        docs = toks = 0
        for k, key in enumerate(keys):
            writers[key].add_documents(res.tokens[k], res.lengths[k])
            docs += len(res.lengths[k])
            toks += len(res.tokens[k])
            counts[source].num_documents[key] += len(res.lengths[k])
        stats.skipped.update(res.skipped)
        stats.num_lines += res.num_lines
        stats.text_bytes += res.text_bytes
        progress.update(docs // max(len(keys), 1), toks, res.text_bytes, pos)
