"""Perplexity of a checkpoint on held-out token shards, one row per dataset (the paper's
perplexity table).

Each shard's token stream (documents in order, each ending with eos, as preprocessing wrote
them) is cut into consecutive windows of ``seq_length + 1`` tokens, the training sample shape;
the tail that does not fill a window is left out (``num_tokens`` says how many were scored).
Each window goes through the checkpoint's own objective's evaluation passes
(:meth:`~card_megatron.objectives.base.Objective.eval_passes`), the same computation as the
validation perplexity logged in training: exact for the causal models (ARM, CARD: every
target token is predicted from its clean prefix), an upper bound (the ELBO, with
``objective.eval_t_samples`` noise levels per window, seeded by the window index) for MDLM
and BD3LM. Rows say which (``kind``: ``exact`` or ``bound``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from card_megatron.fileio import atomic_write, check_writable


@dataclass
class PerplexityRow:
    """One dataset's result: mean NLL per scored token (nats) and its exponential."""

    dataset: str
    prefix: str
    num_windows: int
    num_tokens: int  # target tokens scored
    nll: float
    ppl: float
    kind: str  # "exact" | "bound"


def num_windows(prefix: str, seq_length: int, max_windows: Optional[int]) -> int:
    """How many windows of ``seq_length + 1`` tokens the shard's stream gives (at most ``max_windows``);
    ValueError naming the shard when it is missing or shorter than one window."""
    from card_megatron.data.dataset import open_shard

    num_tokens = open_shard(prefix).num_tokens
    n = (num_tokens - 1) // seq_length
    if max_windows is not None:
        n = min(n, max_windows)
    if n <= 0:
        raise ValueError(f"{prefix}: {num_tokens} tokens, fewer than one window of seq_length + 1 = {seq_length + 1}")
    return n


def window_batches(tokens: np.ndarray, seq_length: int, n: int, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first window index, ``[B, seq_length + 1]`` int64 windows) for windows ``0..n-1`` of ``tokens``
    (window w starts at token ``w * seq_length``; consecutive windows share one token). Streamed:
    only one batch is ever converted to int64, never the whole shard (4x its size as uint16)."""
    offsets = np.arange(seq_length + 1)
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))[:, None] * seq_length
        yield start, np.asarray(tokens[rows + offsets], dtype=np.int64)


MISSING_SIDECAR_FLAG = "--allow-missing-sidecar"


def check_shard_tokenizer(prefix: str, tokenizer, allow_missing_sidecar: bool = False) -> None:
    """ValueError when the shard's sidecar names another tokenizer than the checkpoint's, when it has no
    sidecar (unless ``allow_missing_sidecar``), or when the shard holds ids outside its vocabulary."""
    from card_megatron.data.dataset import check_same_tokenizer, open_shard

    check_same_tokenizer(prefix, tokenizer, allow_missing_sidecar, MISSING_SIDECAR_FLAG)
    tokens = open_shard(prefix).tokens
    top = int(tokens.max()) if len(tokens) else -1
    if top >= tokenizer.vocab_size:
        raise ValueError(
            f"{prefix}.bin holds token id {top}, outside the checkpoint's vocabulary "
            f"({tokenizer.vocab_size} ids): it was made with another tokenizer"
        )


@torch.no_grad()
def shard_perplexity(
    loaded,
    prefix: str,
    batch_size: int = 8,
    max_windows: Optional[int] = None,
    name: Optional[str] = None,
    allow_missing_sidecar: bool = False,
) -> PerplexityRow:
    """Perplexity of ``loaded`` (a :class:`~card_megatron.inference.loading.LoadedModel`) on shard ``prefix``."""
    from card_megatron.data.dataset import open_shard
    from card_megatron.model.gpt import per_token_nll
    from card_megatron.objectives import build_objective

    cfg, tok = loaded.config, loaded.tokenizer
    check_shard_tokenizer(prefix, tok, allow_missing_sidecar)
    objective = build_objective(cfg.objective, cfg.model.seq_length, tok.mask_id, tok.vocab_size)
    n = num_windows(prefix, cfg.model.seq_length, max_windows)
    total, count = 0.0, 0.0
    for start, batch in window_batches(open_shard(prefix).tokens, cfg.model.seq_length, n, batch_size):
        tokens = torch.from_numpy(batch).to(loaded.device)
        ids = torch.arange(start, start + len(tokens), dtype=torch.int64, device=loaded.device)
        for mi, li in objective.eval_passes(tokens, ids, ids):
            mask = mi.attention_mask.to(loaded.device) if mi.attention_mask is not None else None
            logits = loaded.model(mi.input_ids.to(loaded.device), mi.position_ids.to(loaded.device), mask)
            suppress = tok.mask_id if li.suppress_mask_logit else None
            s, c = objective.nll_terms(per_token_nll(logits, li.targets.to(loaded.device), suppress), li)
            total += float(s)
            count += float(c)
    nll = total / count
    return PerplexityRow(
        dataset=name or os.path.basename(prefix),
        prefix=os.path.abspath(prefix),
        num_windows=n,
        num_tokens=n * cfg.model.seq_length,
        nll=nll,
        ppl=math.exp(min(nll, 700.0)),
        kind="bound" if objective.is_bound else "exact",
    )


def evaluate_checkpoint(
    checkpoint: str,
    prefixes: Sequence[str],
    names: Optional[Sequence[str]] = None,
    batch_size: int = 8,
    max_windows: Optional[int] = None,
    device: Optional[str] = None,
    ema: bool = False,
    allow_missing_sidecar: bool = False,
) -> dict:
    """Loads ``checkpoint`` and scores every shard; returns the JSON record (see :func:`markdown_table`).
    The arguments and every shard (present, readable) are checked before the checkpoint is loaded."""
    from card_megatron.data.dataset import open_shard, require_sidecar
    from card_megatron.inference.loading import load_model

    if names is not None and len(names) != len(prefixes):
        raise ValueError(f"--names gives {len(names)} names for {len(prefixes)} --data prefixes")
    for p in prefixes:
        open_shard(p)
        require_sidecar(p, allow_missing_sidecar, MISSING_SIDECAR_FLAG, "the checkpoint's tokenizer")
    loaded = load_model(checkpoint, device=device, ema=ema)
    rows = [
        shard_perplexity(loaded, p, batch_size, max_windows, names[i] if names else None, allow_missing_sidecar)
        for i, p in enumerate(prefixes)
    ]
    return {
        "checkpoint": os.path.abspath(loaded.path),
        "step": loaded.step,
        "objective": loaded.config.objective.name,
        "seq_length": loaded.config.model.seq_length,
        "ema": ema,
        "rows": [asdict(r) for r in rows],
    }


def markdown_table(result: dict) -> str:
    """The rows as a markdown table; bounds are marked with <=."""
    lines = [
        f"Perplexity of {result['checkpoint']} (step {result['step']}, {result['objective']}; <= marks an upper bound)",
        "",
        "| dataset | tokens | NLL (nats/token) | perplexity |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        mark = "<= " if r["kind"] == "bound" else ""
        lines.append(f"| {r['dataset']} | {r['num_tokens']:,} | {mark}{r['nll']:.4f} | {mark}{r['ppl']:.2f} |")
    return "\n".join(lines) + "\n"


def check_outputs(json_path: Optional[str], markdown_path: Optional[str]) -> None:
    """ValueError naming an output that :func:`write_results` could not write (a directory, under a
    file, ...) or the two being one file: called before anything is loaded or evaluated."""
    if json_path and markdown_path and os.path.abspath(json_path) == os.path.abspath(markdown_path):
        raise ValueError(f"--output-json and --output-markdown are the same file ({json_path})")
    for path in (json_path, markdown_path):
        if path:
            check_writable(path)


def write_results(result: dict, json_path: Optional[str], markdown_path: Optional[str]) -> None:
    """Writes the JSON record and the markdown table, each atomically (parent directories created)."""
    for path in (json_path, markdown_path):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if json_path:
        atomic_write(json_path, json.dumps(result, indent=2) + "\n")
    if markdown_path:
        atomic_write(markdown_path, markdown_table(result))
