"""The tokenizing workers of preprocessing: chunk in, packed token arrays out, in order.

:class:`EncodePool` maps :func:`encode_chunk` over chunks, in the calling process
(``workers == 1``) or in a ``ProcessPoolExecutor`` with at most ``2 * workers`` chunks in
flight (memory stays bounded whatever the input size). Each :class:`EncodedChunk` carries the
chunk it came from (without its payload), so the consumer needs no bookkeeping of its own to
tell which input, position and line numbers a result belongs to.

Workers are forked where possible (they inherit the loaded tokenizer); otherwise they rebuild
it from its serialized bytes. They die with the main process (``PR_SET_PDEATHSIG`` on Linux),
ignore Ctrl-C (the main process cleans up) and a worker that dies raises ``BrokenProcessPool``
instead of hanging.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import sys
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from card_megatron.data.corpus import DEFAULT_MAX_LINE_BYTES, Chunk
from card_megatron.data.readers import BadRecord, parse_chunk

# This process's worker state: the tokenizer, keys, skip flag, shard dtype and line-length bound.
_WORKER_STATE: dict = {}

_STARTUP_BLOCKED = {signal.SIGINT, signal.SIGTERM}


@dataclass
class EncodedChunk:
    """The tokens of one chunk: per key, the packed tokens (shard dtype) and int32 document lengths."""

    chunk: Chunk  # where it came from (payload dropped)
    tokens: list
    lengths: list
    skipped: Counter
    num_records: int  # lines, rows or documents read, skipped ones included
    text_bytes: int
    error: Optional[BadRecord]

    @property
    def num_documents(self) -> int:
        """Documents of the first key (each key has one per kept record)."""
        return len(self.lengths[0]) if self.lengths else 0

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def worker_state(tokenizer, keys: tuple[str, ...], skip_bad_lines: bool, dtype: np.dtype, max_line_bytes: int) -> dict:
    """What :func:`encode_chunk` needs, for this process."""
    return {
        "tok": tokenizer,
        "keys": keys,
        "skip": skip_bad_lines,
        "dtype": np.dtype(dtype),
        "max_line_bytes": max_line_bytes,
    }


def encode_chunk(chunk: Chunk) -> EncodedChunk:
    """Parses and tokenizes one chunk with the state set by :func:`worker_state` (eos appended to
    every document)."""
    tok = _WORKER_STATE["tok"]
    where = dataclasses.replace(chunk, payload=None)
    try:
        parsed = parse_chunk(chunk, _WORKER_STATE["keys"], _WORKER_STATE["skip"], _WORKER_STATE["max_line_bytes"])
    except ValueError as e:  # the file could not be read
        return EncodedChunk(where, [], [], Counter(), 0, 0, BadRecord(-1, str(e)))
    out_tokens, out_lengths = [], []
    if parsed.error is None:
        for key_texts in parsed.texts:
            ids = tok.encode_batch(key_texts, add_eos=True) if key_texts else []
            lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
            # ids < vocab size, which fits the dtype (checked when the shard dtype was chosen)
            packed = (
                np.concatenate(ids, dtype=_WORKER_STATE["dtype"], casting="unsafe")
                if ids
                else np.empty(0, _WORKER_STATE["dtype"])
            )
            out_tokens.append(packed)
            out_lengths.append(lengths)
    return EncodedChunk(
        where, out_tokens, out_lengths, parsed.skipped, parsed.num_records, parsed.text_bytes, parsed.error
    )


class EncodePool:
    """Runs :func:`encode_chunk` over chunks, ``workers`` processes (1: in this process).

    Use as a context manager; :meth:`imap` yields results in input order and reads the chunk
    iterator only as results are consumed.
    """

    def __init__(
        self,
        workers: int,
        tokenizer,
        keys: tuple[str, ...],
        skip_bad_lines: bool,
        dtype: np.dtype,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    ):
        self.workers = workers
        self.state = worker_state(tokenizer, keys, skip_bad_lines, dtype, max_line_bytes)
        self.pool: Optional[ProcessPoolExecutor] = None

    def __enter__(self) -> "EncodePool":
        _WORKER_STATE.clear()
        _WORKER_STATE.update(self.state)
        if self.workers > 1:
            fork = "fork" in mp.get_all_start_methods()
            ctx = mp.get_context("fork") if fork else mp.get_context()
            tok = self.state["tok"]
            init = (
                None
                if fork
                else {
                    "tokenizer_bytes": tok.serialized(),
                    "tokenizer_class": type(tok),
                    "keys": self.state["keys"],
                    "skip_bad_lines": self.state["skip"],
                    "dtype": self.state["dtype"].str,
                    "max_line_bytes": self.state["max_line_bytes"],
                }
            )
            self.pool = _start_pool(self.workers, ctx, init)
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
        finally:
            _WORKER_STATE.clear()  # the tokenizer, shared with forked workers

    def imap(self, chunks: Iterable[Chunk]) -> Iterator[EncodedChunk]:
        if self.pool is None:
            return map(encode_chunk, chunks)
        return _ordered_map(self.pool, encode_chunk, chunks, 2 * self.workers)


def _ordered_map(pool: ProcessPoolExecutor, fn, items: Iterable, max_in_flight: int) -> Iterator:
    """Like ``Pool.imap(fn, items)`` (ordered) but reads ``items`` only as results are consumed."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= max_in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _noop() -> None:
    pass


def _start_pool(workers: int, ctx, init_state: Optional[dict]) -> ProcessPoolExecutor:
    """Starts every worker with SIGINT/SIGTERM blocked, so that an interruption can never land
    half-way through the executor's start-up (it would leave workers nobody shuts down)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STARTUP_BLOCKED)
    try:
        # ProcessPoolExecutor rather than Pool: a worker that dies (OOM killer, signal) raises
        # BrokenProcessPool instead of leaving its task unanswered forever.
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


def _init_worker(state: Optional[dict[str, Any]]) -> None:
    """Worker start: ``state`` is None under fork, where the parent's ``_WORKER_STATE`` (tokenizer already
    loaded) is inherited; otherwise the bytes-based state to rebuild it from."""
    # Forked workers inherit the parent's Python signal handlers; a worker must die on SIGTERM
    # (pool shutdown) and leave Ctrl-C to the parent, which cleans up.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STARTUP_BLOCKED)  # blocked by the parent around the fork
    _die_with_parent()
    # One thread per worker: the Rust tokenizers library would otherwise start a thread per core
    # in every worker (read at each call, so setting it here is enough).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if state is not None:
        tok = state["tokenizer_class"].from_serialized(state["tokenizer_bytes"])
        _WORKER_STATE.update(
            worker_state(tok, state["keys"], state["skip_bad_lines"], np.dtype(state["dtype"]), state["max_line_bytes"])
        )
