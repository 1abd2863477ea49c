"""Progress of a preprocessing run: documents, tokens, throughput, fraction done and ETA.

On a terminal it is a ``tqdm`` bar over the input's bytes on disk (compressed bytes for
``.gz``/``.zst``, row-group bytes for Parquet), with the ETA tqdm computes and documents and
tokens per second beside it. When stderr is not a terminal (SLURM logs, pipes, tests) a bar
would fill the log with carriage returns, so it is one log line every ``interval`` seconds
with the same numbers and ETA. ``tqdm`` is used rather than a bar of our own because it
already handles terminal width, rate smoothing and ``\\r`` redraws, and is a dependency of
DeepSpeed anyway.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional

logger = logging.getLogger(__name__)


class Progress:
    """Call :meth:`update` once per finished chunk; :meth:`close` at the end."""

    def __init__(self, total_bytes: Optional[int], interval: float, bar: Optional[bool] = None) -> None:
        self.total = total_bytes
        self.interval = interval
        self.start = time.monotonic()
        self.last = self.start
        self.docs = self.tokens = self.text_bytes = self.disk_done = 0
        if bar is None:
            bar = sys.stderr.isatty() and interval < 1e8
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                desc="preprocess",
                mininterval=min(interval, 1.0),
                dynamic_ncols=True,
            )

    def update(self, docs: int, tokens: int, text_bytes: int, disk_pos: int) -> None:
        """Adds one chunk's counts; ``disk_pos``: input bytes on disk consumed so far (all inputs)."""
        self.docs += docs
        self.tokens += tokens
        self.text_bytes += text_bytes
        now = time.monotonic()
        dt = max(now - self.start, 1e-9)
        if self.bar is not None:
            if disk_pos > self.disk_done:
                self.bar.update(disk_pos - self.disk_done)
                self.disk_done = disk_pos
            self.bar.set_postfix_str(f"{self.docs:,} docs, {self.tokens / dt:,.0f} tokens/s", refresh=False)
            return
        if now - self.last < self.interval:
            return
        self.last = now
        msg = (
            f"{self.docs:,} docs ({self.docs / dt:,.0f} docs/s), "
            f"{self.tokens:,} tokens ({self.tokens / dt:,.0f} tokens/s), "
            f"{self.text_bytes / 1e6 / dt:.2f} MB/s"
        )
        if self.total and disk_pos:
            frac = min(disk_pos / self.total, 1.0)
            eta = dt * (1 - frac) / max(frac, 1e-9)
            msg += f", {100 * frac:.1f}% done, ETA {eta:,.0f} s"
        logger.info(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
