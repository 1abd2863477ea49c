"""Worker: one forward/backward of a tiny CardGPT under the launcher's layout; saves loss and grads.

Usage: torchrun --nproc-per-node N tests/workers/model_parity.py OUT.pt [--load STATE.pt]
Tensor-parallel size = world size. Rank 0 writes {loss, nll, grads, loaded, state}: canonical
gradients, the weights right after loading (if --load) and after one SGD step.
"""

import os
import sys

import torch

from card_megatron.config import ModelConfig, ParallelConfig
from card_megatron.parallel.state import init_distributed


def main():
    out = sys.argv[1]
    load = sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--load" else None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = init_distributed(ParallelConfig(tensor_model_parallel_size=world))
    from card_megatron.model.export import gather_canonical_state, load_canonical_state
    from card_megatron.model.gpt import CardGPT, per_token_nll

    tp_group = info.tp_group
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, seq_length=16)
    model = CardGPT(cfg, "causal", vocab_size=256, tp_size=world, seed=7)
    loaded = None
    if load:
        load_canonical_state(model, torch.load(load)["state"], cfg.num_layers, info.tp_rank, info.tp_size)
        loaded = gather_canonical_state(model, cfg.num_layers, tp_group, world)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 250, (3, 17), generator=g)
    pos = torch.arange(16).expand(3, 16)
    weights = torch.rand(3, 16, generator=g)
    vocab_start = info.tp_rank * (256 // world)
    nll = per_token_nll(model(ids[:, :-1], pos), ids[:, 1:], suppress_id=255, vocab_start=vocab_start)
    loss = (nll * weights).sum() / weights.sum()
    loss.backward()
    grads = gather_canonical_state(model, cfg.num_layers, tp_group, world, grads=True)
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    state = gather_canonical_state(model, cfg.num_layers, tp_group, world)
    if info.rank == 0:
        torch.save({"loss": loss.detach(), "nll": nll.detach(), "grads": grads, "loaded": loaded, "state": state}, out)


if __name__ == "__main__":
    main()
