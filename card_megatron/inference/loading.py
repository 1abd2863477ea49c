"""Loading a trained model into one process (CPU or one GPU), whatever layout trained it.

``PATH`` may be a run directory (its newest checkpoint with an export is used), a checkpoint
directory (``.../checkpoints/step_00000100``), or an export (``.../export``, or its
``model.index.json``; an older export's ``model.pt``). The export holds canonical
(single-process) weights as safetensors shards (``model/sharded_export.py``: the one process
reads every shard, slice by slice), the resolved config and the tokenizer, so no DeepSpeed or
ZeRO tooling is needed. Runs trained with ``optim.ema_decay > 0`` also export the EMA weights,
which ``load_model(..., ema=True)`` loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import yaml

from card_megatron.config import Config, config_from_dict
from card_megatron.rundir import export_files

EMBEDDING = "embedding.embedding.word_embeddings.weight"


@dataclass
class LoadedModel:
    model: torch.nn.Module  # CardGPT, eval mode
    config: Config
    tokenizer: object  # card_megatron.tokenizers.Tokenizer
    vocab_size: int  # padded model vocabulary
    device: torch.device
    step: int
    path: str
    ema: bool = False  # the model holds the EMA weights


def load_model(
    path: str, device: Optional[str] = None, dtype: torch.dtype = torch.float32, ema: bool = False
) -> LoadedModel:
    """Loads weights, config and tokenizer; initialises a single-process parallel state if needed.

    With ``ema`` it loads the EMA weights instead of the trained ones, and raises ValueError
    when the checkpoint has none.
    """
    from card_megatron.model.gpt import CardGPT
    from card_megatron.model.sharded_export import open_export
    from card_megatron.objectives import objective_traits
    from card_megatron.parallel.state import init_single_process
    from card_megatron.tokenizers import load_tokenizer

    export, cfg_path, weights_path, tok_path = export_files(path)
    with open(cfg_path) as f:
        cfg = config_from_dict(yaml.safe_load(f))
    tokenizer = load_tokenizer(tok_path)
    init_single_process()
    with open_export(export) as weights:
        names = weights.names(ema)
        if EMBEDDING not in names:
            raise ValueError(f"{weights_path}: no embedding weights; not a card_megatron export")
        vocab_size = weights.shape(EMBEDDING, ema)[0]
        if vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"tokenizer mismatch: {tok_path} has {tokenizer.vocab_size} tokens but the model only {vocab_size}"
            )
        model = CardGPT(
            cfg.model, objective_traits(cfg.objective.name).mask_kind, vocab_size, tp_size=1, seed=cfg.train.seed
        )
        weights.load_into(model, cfg.model.num_layers, ema=ema)
        step = weights.step
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device=dev, dtype=dtype).eval()
    return LoadedModel(
        model=model,
        config=cfg,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        device=dev,
        step=step,
        path=export,
        ema=ema,
    )
