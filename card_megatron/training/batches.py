"""The data streams of a run: its datasets and each rank's micro-batches of a split, from any global
sample on (so a resumed run continues the same global sample stream on any data-parallel size)."""

from __future__ import annotations

import itertools
from typing import Iterator, Optional

import torch

from card_megatron.config import Config
from card_megatron.data import MicroBatchSampler, build_datasets, collate
from card_megatron.parallel.state import ParallelInfo


class Batches:
    """The train, valid and test datasets of ``cfg`` and this rank's micro-batches of them, on its device."""

    def __init__(self, cfg: Config, info: ParallelInfo, tokenizer):
        self.cfg, self.info = cfg, info
        t = cfg.train
        # eval_iters global batches, whatever the layout: the same validation set for every run.
        self.valid_samples = t.eval_iters * t.global_batch_size
        self.datasets = build_datasets(
            cfg.data,
            cfg.model.seq_length,
            t.seed,
            {"train": t.train_iters * t.global_batch_size, "valid": self.valid_samples, "test": 0},
            tokenizer=tokenizer,
            valid_seed=cfg.data.valid_seed,
        )
        self._train_stream: Optional[Iterator[dict]] = None  # opened on first use

    def micro_batches(self, split: str, start: int, count: Optional[int] = None) -> Iterator[dict]:
        """This rank's micro-batches of ``split`` from global sample ``start`` (``count`` of them,
        or until the split ends): {tokens [B, L+1], noise_seeds [B], sample_ids [B]}."""
        t, info = self.cfg.train, self.info
        dataset = self.datasets[split]
        sampler = MicroBatchSampler(len(dataset), start, t.micro_batch_size, info.dp_rank, info.dp_size)
        if self.cfg.data.num_workers > 0:
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=sampler, collate_fn=collate, num_workers=self.cfg.data.num_workers
            )
            it = iter(loader)
        else:
            it = (collate([dataset[i] for i in ids]) for ids in sampler)
        for batch in itertools.islice(it, count):
            yield {k: v.to(info.device) for k, v in batch.items()}

    def next_train(self, consumed_samples: int, count: int) -> Iterator[dict]:
        """The next ``count`` training micro-batches; one stream (and one DataLoader) for the whole run,
        opened at global sample ``consumed_samples`` on first use."""
        if self._train_stream is None:
            self._train_stream = self.micro_batches("train", consumed_samples)
        return itertools.islice(self._train_stream, count)
