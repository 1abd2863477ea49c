"""Atomic file writes: one temporary-name scheme for the whole package.

Every output is written to ``{path}.{pid}.tmp`` beside its final name, flushed to disk
(``fsync``) and renamed over ``path`` (``os.replace``), so a reader sees the old file or
the whole new one, never a part, and a killed writer leaves only a ``*.<pid>.tmp`` file
(``data/preprocess.py`` removes those it finds beside its outputs).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
from typing import IO, Iterator


def temp_path(path: str) -> str:
    """The temporary name under which ``path`` is written before the rename: ``{path}.{pid}.tmp``."""
    return f"{path}.{os.getpid()}.tmp"


def final_name(path: str) -> str:
    """The output that a temporary file stands for: ``path`` without its ``.{pid}.tmp`` suffix (and
    without the C++ shard writer's ``.lengths``/``.docends`` side-file suffix after it)."""
    return re.sub(r"(\.\d+\.tmp)+(\.lengths|\.docends)?$", "", path)


def write_error_message(e: OSError, default_path: str) -> str:
    """One line for an OSError met while writing outputs: ``cannot write FILE: REASON`` with the
    output's final name (``default_path`` when the error names no file) and, for a full disk,
    "No space left on device (the disk is full)"."""
    path = final_name(os.fsdecode(e.filename)) if e.filename else default_path
    reason = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        reason += " (the disk is full)"
    return f"cannot write {path}: {reason}"


def fsync_path(path: str) -> None:
    """Flushes a file that another writer (e.g. the C++ shard writer) has closed to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", encoding: str | None = None) -> Iterator[IO]:
    """Yields a file open on :func:`temp_path` (``mode`` "w" or "wb"); on a normal exit it is flushed,
    fsync'ed and renamed to ``path``; on an exception it is removed and ``path`` is left untouched.
    An OSError of the write itself (a full disk) is raised with ``path`` as its file name (a
    failed ``write``/``flush`` names none)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    tmp = temp_path(path)
    try:
        with open(tmp, mode, encoding=encoding if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, path) from e
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yields a fresh temporary directory beside ``path`` to fill; when the block ends without error it is
    renamed to ``path`` (FileExistsError if ``path`` appeared meanwhile), otherwise removed."""
    tmp = temp_path(os.path.abspath(path))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.lexists(path):  # appeared meanwhile
            raise FileExistsError(f"--output {path} already exists: choose a new directory (nothing was written)")
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sha256(path: str) -> str:
    """The SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: str, data: str | bytes) -> None:
    """Writes text (UTF-8) or bytes to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w", encoding="utf-8") as f:
        f.write(data)


def check_writable(path: str) -> None:
    """Raises ValueError naming ``path`` unless an atomic write (:func:`atomic_open`, after creating
    the parent directories) can write it: call it before the work whose results go there (a
    directory, a path under a file or an unwritable place is refused). Creates missing parent
    directories, as the writers that use it do."""
    if os.path.isdir(path):
        raise ValueError(f"output {path} is a directory: give a file name")
    probe = temp_path(path)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"output {path} cannot be written ({e.strerror or e})") from None
