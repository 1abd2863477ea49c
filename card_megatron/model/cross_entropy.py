"""Per-token cross entropy from vocab-sharded logits, in row chunks, without full-size copies.

Megatron-core's ``vocab_parallel_cross_entropy`` casts the whole logits tensor to float32
(a copy of [S, B, V/TP] for bf16 logits), keeps that copy as the softmax for backward, returns
a float32 gradient that autograd casts back (another copy), and runs three all-reduces even
without tensor parallelism. :func:`chunked_vocab_parallel_nll` computes the same numbers
chunk by chunk of rows:

* forward: each chunk is upcast to float32 on its own; only per-row values (the maximum, the
  sum of exponentials, the target's logit) are kept, of shape [S * B];
* backward: the softmax is recomputed chunk by chunk from the saved logits and those, and the
  gradient is written **in place into the logits** (in their dtype), as
  Megatron does with its float32 copy. The logits are unchanged until then, so anything may
  read them after the loss (diagnostics); nothing may read them after backward;
* the collectives (max and sums over the tensor-parallel group) run only when the group has
  more than one rank, on [S * B] vectors; then the logits are read twice (the sum of
  exponentials needs the global maximum), once otherwise.

Peak memory of the loss is thus the logits in their own dtype plus one float32 chunk, instead
of the logits plus two full float32 tensors (bf16), ``tools/benchmark_loss.py`` measures it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

CHUNK_BYTES = 8 * 2**20
"""Float32 bytes of one chunk of rows ([rows, V/TP]); the loss's working memory beyond the logits."""


def _rows_per_chunk(vocab: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (4 * vocab))


class _ChunkedNLL(torch.autograd.Function):
    """Megatron-core's arithmetic (global row max M, sum of exp(x - M), nll = log(sum) - (x_target - M),
    softmax = exp(x - M) / sum), so one and several tensor-parallel ranks round alike, row chunk by
    row chunk."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, suppress_local, tp_group, rows):
        # logits [N, V/TP] (any float dtype), targets [N] global ids -> nll [N] float32
        n, vocab = logits.shape
        sharded = tp_group is not None and dist.get_world_size(tp_group) > 1
        local = targets - vocab_start
        in_shard = (local >= 0) & (local < vocab)
        local = torch.where(in_shard, local, torch.zeros_like(local))
        top = torch.empty(n, dtype=torch.float32, device=logits.device)
        sum_exp = torch.empty(n, dtype=torch.float32, device=logits.device)
        picked = torch.empty(n, dtype=torch.float32, device=logits.device)

        def chunk(r):
            x = logits[r : r + rows].float()
            return x.index_fill(1, suppress_local, float("-inf")) if suppress_local is not None else x

        for r in range(0, n, rows):
            x = chunk(r)
            top[r : r + rows] = x.amax(dim=-1)
            picked[r : r + rows] = x.gather(1, local[r : r + rows, None]).squeeze(1)
            if not sharded:  # the max is final: sum in the same pass
                sum_exp[r : r + rows] = torch.exp(x - top[r : r + rows, None]).sum(dim=-1)
        picked = torch.where(in_shard, picked, torch.zeros_like(picked))
        if sharded:
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=tp_group)
            for r in range(0, n, rows):
                sum_exp[r : r + rows] = torch.exp(chunk(r) - top[r : r + rows, None]).sum(dim=-1)
            dist.all_reduce(sum_exp, group=tp_group)
            dist.all_reduce(picked, group=tp_group)
        ctx.save_for_backward(logits, top, sum_exp, local, in_shard, suppress_local)
        ctx.rows = rows
        ctx.used = False
        return torch.log(sum_exp) - (picked - top)

    @staticmethod
    def backward(ctx, grad_nll):
        if ctx.used:
            raise RuntimeError("chunked_vocab_parallel_nll: backward overwrites the logits and runs once")
        ctx.used = True
        logits, top, sum_exp, local, in_shard, suppress_local = ctx.saved_tensors
        rows = ctx.rows
        grad_nll = grad_nll.float()
        onehot = in_shard.to(torch.float32)
        for r in range(0, logits.shape[0], rows):
            x = logits[r : r + rows]
            g = x.float()  # float32 logits: x itself (the softmax is computed in place)
            g.sub_(top[r : r + rows, None]).exp_().div_(sum_exp[r : r + rows, None])  # softmax of the chunk
            if suppress_local is not None:
                g.index_fill_(1, suppress_local, 0.0)
            g.scatter_add_(1, local[r : r + rows, None], -onehot[r : r + rows, None])
            g.mul_(grad_nll[r : r + rows, None])
            if g.data_ptr() != x.data_ptr():
                x.copy_(g)
        return logits, None, None, None, None, None


def chunked_vocab_parallel_nll(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int = 0,
    suppress_id: Optional[int] = None,
    tp_group=None,
    chunk_bytes: int = CHUNK_BYTES,
) -> torch.Tensor:
    """Per-token negative log-likelihood from vocab-sharded logits, chunk by chunk of rows.

    logits: [..., V/TP] (any float dtype; this rank's vocabulary ids [vocab_start, vocab_start +
    V/TP)); targets: int64 of the leading shape (global ids); ``suppress_id``: a token whose logit
    counts as -inf (SUBS); ``tp_group``: the group the vocabulary is sharded over (None or size 1:
    not sharded). Returns float32 of the leading shape. Backward writes the gradient into
    ``logits`` (see the module docstring) and may run once.
    """
    shape = logits.shape[:-1]
    if targets.shape != shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} != logits shape without the vocabulary {tuple(shape)}")
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    suppress_local = None
    if suppress_id is not None and 0 <= suppress_id - vocab_start < vocab:
        suppress_local = torch.tensor([suppress_id - vocab_start], device=logits.device)
    nll = _ChunkedNLL.apply(
        flat, targets.reshape(-1), vocab_start, suppress_local, tp_group, _rows_per_chunk(vocab, chunk_bytes)
    )
    return nll.view(shape)
