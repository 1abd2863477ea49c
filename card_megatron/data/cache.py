"""A build-once cache of NumPy arrays on disk, shared by every process that needs them.

An entry is a directory ``{cache_dir}/{name}_{key}/`` of ``.npy`` files, where ``key``
hashes a JSON description of everything the arrays depend on (:func:`cache_key`). A build
writes to a temporary directory and renames it into place; its ``description.json``
(written last) records every array's shape and dtype, and an entry whose files disagree
(truncated, rewritten) is rebuilt with a warning naming the file. An exclusive lock on
``{name}_{key}.lock`` (:class:`card_megatron.lock.ExclusiveLock`) makes one process build
while the others wait; then every process memory-maps the same files. A cache directory
that cannot be written is a ValueError suggesting ``data.cache_dir``.

The sample index (``data/index.py``, ``data/dataset.py``) and the per-shard token checks
use it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Callable, Iterator, Optional

import numpy as np

from card_megatron.fileio import atomic_write, temp_path
from card_megatron.lock import ExclusiveLock, LockHeldError

logger = logging.getLogger(__name__)


def cache_key(description: dict) -> str:
    """A stable hash (32 hex digits) of a JSON-serialisable description."""
    text = json.dumps(description, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@contextlib.contextmanager
def exclusive_lock(path: str, timeout_s: float) -> Iterator[None]:
    """Holds an exclusive lock on ``path`` (:class:`card_megatron.lock.ExclusiveLock`).

    Raises TimeoutError, naming the lock file and its holder, after ``timeout_s`` seconds.
    """
    lock = ExclusiveLock(
        path,
        timeout_s,
        "It is building the sample index. Wait for it, build the index "
        "ahead with tools/build_index.py, or raise the lock timeout.",
    )
    try:
        lock.acquire()
    except LockHeldError as e:
        raise TimeoutError(str(e)) from None
    try:
        yield
    finally:
        lock.release()


class BrokenCacheEntry(ValueError):
    """A cache entry whose files do not match its description (truncated, missing, rewritten)."""


def _check_npy(path: str, expected: Optional[list]) -> None:
    """Raises BrokenCacheEntry naming ``path`` unless it is a whole .npy file of the expected
    [shape, dtype] (from the entry's description.json; None for entries that predate it)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(f)
            offset = f.tell()
    except (OSError, ValueError) as e:
        raise BrokenCacheEntry(f"sample-index cache file {path} is unreadable ({e})") from None
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size != need:
        raise BrokenCacheEntry(
            f"sample-index cache file {path} holds {size} bytes, its header promises {need} (truncated or overwritten)"
        )
    if expected is not None and [list(shape), dtype.str] != [list(expected[0]), expected[1]]:
        raise BrokenCacheEntry(
            f"sample-index cache file {path} holds {dtype.str} {list(shape)}, its entry "
            f"describes {expected[1]} {list(expected[0])}"
        )


def load_entry(directory: str) -> dict[str, np.ndarray]:
    """Memory-maps a complete cache entry; raises BrokenCacheEntry naming the broken file."""
    try:
        with open(os.path.join(directory, "description.json")) as f:
            record = json.load(f)
        names = record["arrays"]
    except (OSError, ValueError, KeyError) as e:
        raise BrokenCacheEntry(f"sample-index cache entry {directory}: unreadable description.json ({e})") from None
    shapes = record.get("shapes", {})
    for name in names:
        _check_npy(os.path.join(directory, f"{name}.npy"), shapes.get(name))
    return {name: np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r") for name in names}


def load_or_build(
    cache_dir: str,
    name: str,
    description: dict,
    build: Callable[[], dict[str, np.ndarray]],
    lock_timeout_s: float = 3600.0,
) -> tuple[dict[str, np.ndarray], str]:
    """Memory-maps the cached arrays of ``description``, building them first if absent.

    ``name`` prefixes the cache entry (``{name}_{key}``). One process builds (under the
    lock); the others wait, then load the same files. An entry whose files do not match its
    description is rebuilt, with a warning naming the broken file. Returns (arrays, entry
    directory). Raises ValueError suggesting data.cache_dir when the cache cannot be written.
    """
    key = cache_key(description)
    final = os.path.join(cache_dir, f"{name}_{key}")
    done = os.path.join(final, "description.json")
    if os.path.exists(done):  # hit: no lock needed, the entry is complete once it exists
        arrays = _load_or_warn(final, "")
        if arrays is not None:
            return arrays, final
    try:
        return _build_entry(cache_dir, name, key, final, build, description, lock_timeout_s)
    except TimeoutError:
        raise
    except OSError as e:
        why = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
        raise ValueError(
            f"cannot write the sample-index cache {cache_dir} ({why}: {e.filename or final}). Set data.cache_dir to "
            "a writable directory with free space (by default the cache lives beside the data, which may be "
            "read-only), or build the index ahead with tools/build_index.py where it is writable"
        ) from None


def _load_or_warn(final: str, note: str) -> Optional[dict[str, np.ndarray]]:
    """The arrays of a complete cache entry, or None (with a warning naming it) when it is broken."""
    try:
        arrays = load_entry(final)
    except BrokenCacheEntry as e:
        logger.warning("%s: rebuilding the entry", e)
        return None
    logger.info("loaded sample index %s%s", final, note)
    return arrays


def _build_entry(
    cache_dir: str,
    name: str,
    key: str,
    final: str,
    build: Callable[[], dict[str, np.ndarray]],
    description: dict,
    lock_timeout_s: float,
) -> tuple[dict[str, np.ndarray], str]:
    done = os.path.join(final, "description.json")
    os.makedirs(cache_dir, exist_ok=True)
    with exclusive_lock(f"{final}.lock", lock_timeout_s):
        if os.path.exists(done):  # another process built (or rebuilt) it while we waited
            arrays = _load_or_warn(final, " (built by another process)")
            if arrays is not None:
                return arrays, final
        # We hold the lock: any temporary or partial entry for this key is dead (``{entry}.<pid>.tmp``,
        # or ``{entry}.tmp-<host>-<pid>`` from before the one temporary-name scheme).
        for entry in os.listdir(cache_dir):
            if entry.startswith(f"{name}_{key}.") and (entry.endswith(".tmp") or entry.startswith(f"{name}_{key}.tmp")):
                shutil.rmtree(os.path.join(cache_dir, entry), ignore_errors=True)
        if os.path.isdir(final):
            shutil.rmtree(final)
        start = time.monotonic()
        arrays = build()
        seconds = time.monotonic() - start
        tmp = temp_path(final)
        os.makedirs(tmp)
        for array_name, array in arrays.items():
            np.save(os.path.join(tmp, f"{array_name}.npy"), array)
        shapes = {n: [list(a.shape), a.dtype.str] for n, a in arrays.items()}
        record = dict(description, arrays=sorted(arrays), shapes=shapes, build_seconds=round(seconds, 3))
        atomic_write(os.path.join(tmp, "description.json"), json.dumps(record, indent=1, sort_keys=True))
        os.rename(tmp, final)
        num_bytes = sum(a.nbytes for a in arrays.values())
        logger.info("built sample index %s in %.2f s (%.1f MB)", final, seconds, num_bytes / 1e6)
    return load_entry(final), final


def default_cache_dir(first_prefix: str, cache_dir: Optional[str]) -> str:
    """``data.cache_dir``, or ``{first data prefix}_index_cache`` when it is None."""
    return cache_dir if cache_dir else f"{first_prefix}_index_cache"
