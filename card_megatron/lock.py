"""Exclusive ``fcntl.flock`` locks with the holder written into the lock file.

One helper for every lock of the project: the sample-index cache (build once, the others
wait), a training run directory and a preprocessing output prefix (one run at a time: the
second is refused at once). The kernel drops a lock when its holder exits, so a leftover
lock file never blocks; the text in it (host, pid, start time) only names the holder.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from typing import Optional

log = logging.getLogger(__name__)


class LockHeldError(RuntimeError):
    """Raised when another process holds a lock (the message names the file and the holder)."""


class ExclusiveLock:
    """Holds an exclusive lock on ``path`` (created if needed) from :meth:`acquire` to :meth:`release`.

    ``timeout_s`` 0 refuses at once when another process holds it; otherwise it waits that
    long. Either way it raises :class:`LockHeldError` naming the lock file, the holder and
    ``hint`` (what the holder is doing, what to do). Usable as a context manager.
    """

    def __init__(self, path: str, timeout_s: float = 0.0, hint: str = "") -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.hint = hint
        self._fd: Optional[int] = None

    def acquire(self) -> "ExclusiveLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        start, delay, announced = time.monotonic(), 0.01, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = read_holder(self.path)
                waited = time.monotonic() - start
                if waited >= self.timeout_s:
                    os.close(fd)
                    after = f" after waiting {waited:.0f} s" if self.timeout_s else ""
                    raise LockHeldError(f"{self.path} is locked by {holder}{after}. {self.hint}".rstrip()) from None
                if not announced:
                    log.info("waiting for %s (held by %s)", self.path, holder)
                    announced = True
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        os.write(fd, f"host {socket.gethostname()} pid {os.getpid()} since {stamp}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Releases the lock (the file stays: removing it would race with the next holder)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "ExclusiveLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_holder(path: str) -> str:
    """The holder text of a lock file ("host H pid P since T"), or "an unknown process"."""
    try:
        with open(path) as f:
            return f.read().strip() or "an unknown process"
    except OSError:
        return "an unknown process"
