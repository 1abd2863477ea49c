"""Which global sample ids each data-parallel rank reads (docs/design.md "Data -> training").

The global sample stream is 0, 1, 2, ... A global step of batch G = mb * dp * accumulation
consumes the next G ids; inside it, micro-batch m of rank r reads
``consumed + m * (mb * dp) + r * mb + [0, mb)``. Since successive global steps continue
the same formula, the sampler needs only the count of samples consumed so far: resuming
from a checkpoint, with the same or another data-parallel size, continues the same
stream.
"""

from __future__ import annotations

from typing import Iterator


class MicroBatchSampler:
    """Yields this rank's micro-batches of sample ids (lists of ``micro_batch_size`` ints).

    Usable as ``torch.utils.data.DataLoader(dataset, batch_sampler=sampler, ...)``. Stops
    before the first micro-batch window (mb * dp ids) that would pass ``total_samples``.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size ({micro_batch_size}) must be >= 1")
        if data_parallel_size < 1:
            raise ValueError(f"data_parallel_size ({data_parallel_size}) must be >= 1")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank ({data_parallel_rank}) must be in [0, data_parallel_size={data_parallel_size})"
            )
        if total_samples < 0:
            raise ValueError(f"total_samples ({total_samples}) must be >= 0")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(f"consumed_samples ({consumed_samples}) must be in [0, total_samples={total_samples}]")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size

    def __len__(self) -> int:
        """Number of micro-batches this rank will yield."""
        window = self.micro_batch_size * self.data_parallel_size
        return (self.total_samples - self.consumed_samples) // window

    def __iter__(self) -> Iterator[list[int]]:
        window = self.micro_batch_size * self.data_parallel_size
        first = self.consumed_samples + self.data_parallel_rank * self.micro_batch_size
        for m in range(len(self)):
            start = first + m * window
            yield list(range(start, start + self.micro_batch_size))
