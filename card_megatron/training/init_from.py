"""``train.init_from``: a new run that starts from the weights of an export (``tools/import_hf.py``,
a checkpoint's ``export/``, a run directory) instead of random ones.

Step 0, a fresh optimizer and learning-rate schedule, any TP/PP/ZeRO layout: the canonical
weights are loaded into each rank's shard of the model before DeepSpeed builds its optimizer
state from them. What must agree, checked before anything is built (every difference listed):

* the architecture (``config.INIT_FROM_MODEL_KEYS``; ``load_config`` takes them from the
  checkpoint unless the YAML file or the command line sets them);
* the tokenizer (``data.tokenizer_model`` must be the checkpoint's file, byte for byte: the
  shards' ids mean its tokens);
* the vocabulary: the run uses the checkpoint's rows (the import pads them for tensor
  parallelism); they must divide by the tensor-parallel size.

A restart of the same run directory resumes from its own checkpoints; ``init_from`` is then
not read again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import yaml

from card_megatron.config import INIT_FROM_MODEL_KEYS, Config, ConfigError, config_from_dict
from card_megatron.fileio import file_sha256

EMBEDDING = "embedding.embedding.word_embeddings.weight"


@dataclass
class InitWeights:
    """The canonical weights a run starts from, and where they came from."""

    path: str  # the export directory
    step: int  # the step of the run that wrote them (0 for an import)
    state: dict[str, torch.Tensor]  # whole canonical weights, read only when the rows must grow ({} until then)
    rows: int  # vocabulary rows of the embedding

    def load_into(self, module: torch.nn.Module, num_layers: int, tp_rank: int, tp_size: int) -> None:
        """Copies the weights into this rank's shard of ``module`` (any TP/PP layout): from ``state`` when
        it was read (rows grown), else straight from the export, which reads only this rank's slices
        (a sharded export: only the shards that hold them)."""
        from card_megatron.model.export import load_canonical_state
        from card_megatron.model.sharded_export import open_export

        if self.state:
            load_canonical_state(module, self.state, num_layers, tp_rank, tp_size)
            return
        with open_export(self.path) as weights:
            weights.load_into(module, num_layers, tp_rank, tp_size)

    def vocab_rows(self, tokenizer, vocab_size: Optional[int], tp_size: int) -> int:
        """The run's vocabulary: the checkpoint's rows, or the next multiple of ``tp_size`` when the
        tensor-parallel size does not divide them (the extra rows, like the import's padding, are the
        mean of the tokenizer's rows). ConfigError when the checkpoint cannot serve this run."""
        p = []
        if self.rows < tokenizer.vocab_size:
            p.append(f"the tokenizer has {tokenizer.vocab_size} ids, {self.path} only {self.rows} embedding rows")
        if vocab_size is not None and vocab_size > self.rows:
            p.append(f"model.vocab_size ({vocab_size}) exceeds the {self.rows} rows of {self.path}; leave it unset")
        if p:
            raise ConfigError("train.init_from cannot start this run:\n  - " + "\n  - ".join(p))
        if self.rows % tp_size:
            from card_megatron.model.export import extend_vocab_rows
            from card_megatron.model.sharded_export import open_export

            rows = -(-self.rows // tp_size) * tp_size
            with open_export(self.path) as weights:
                state = {k: v.float() for k, v in weights.state_dict().items()}
            self.state = extend_vocab_rows(state, rows, tokenizer.num_pieces, [])
            self.rows = rows
        return self.rows


def freeze_first_layers(model: torch.nn.Module, num_layers: int, count: int) -> int:
    """Turns off ``requires_grad`` of the parameters of transformer layers ``0 .. count-1`` (a CardGPT or
    a pipeline stage set; names mapped by ``model.export.canonical_name``). Returns the number of this
    rank's parameters that still train."""
    from card_megatron.model.export import canonical_name

    frozen = {f"layers.{i}." for i in range(count)}
    trainable = 0
    for name, p in model.named_parameters():
        key = canonical_name(name, num_layers)
        if any(key.startswith(f) for f in frozen):
            p.requires_grad_(False)
        else:
            trainable += p.numel()
    return trainable


def architecture_differences(saved: Config, cfg: Config) -> list[str]:
    """Every architecture key that differs, as "model.key: checkpoint X, this run Y"; [] when none."""
    return [
        f"model.{k}: checkpoint {getattr(saved.model, k)!r}, this run {getattr(cfg.model, k)!r}"
        for k in INIT_FROM_MODEL_KEYS
        if getattr(saved.model, k) != getattr(cfg.model, k)
    ]


def read_init_weights(cfg: Config) -> InitWeights:
    """Checks ``cfg`` against ``cfg.train.init_from`` and reads its weights (CPU, float32).
    ConfigError listing every difference; FileNotFoundError / ValueError naming a missing or
    unreadable file."""
    from card_megatron.rundir import export_files

    export, cfg_path, weights_path, tok_path = export_files(cfg.train.init_from, "train.init_from")
    with open(cfg_path) as f:
        saved = config_from_dict(yaml.safe_load(f) or {})
    problems = architecture_differences(saved, cfg)
    if cfg.data.tokenizer_model and os.path.isfile(cfg.data.tokenizer_model):
        if file_sha256(cfg.data.tokenizer_model) != file_sha256(tok_path):
            problems.append(
                f"data.tokenizer_model {cfg.data.tokenizer_model} is not the checkpoint's tokenizer {tok_path} "
                "(tokenize the corpus with the checkpoint's tokenizer.json)"
            )
    if problems:
        raise ConfigError(
            f"train.init_from={cfg.train.init_from} does not fit this config:\n  - "
            + "\n  - ".join(problems)
            + "\nRemove these keys from the YAML file and the command line (they default to the checkpoint's)."
        )
    from card_megatron.model.sharded_export import open_export

    try:
        with open_export(export) as weights:  # the index only (or an older model.pt): the weights load later
            if EMBEDDING not in weights.names():
                raise ValueError(f"{weights_path} is not a card_megatron export (no embedding weights)")
            rows = weights.shape(EMBEDDING)[0]
            step = weights.step
    except ValueError as e:
        raise ValueError(f"train.init_from: {e}") from None
    return InitWeights(path=export, step=step, state={}, rows=rows)
