"""Worker: an export loaded into CardGPT under tensor parallelism (TP = world size); saves the logits.

Usage: torchrun --nproc-per-node N tests/workers/import_logits.py EXPORT_DIR IDS.pt OUT.pt
Rank 0 writes the full-vocabulary logits [B, S, V] (the TP shards gathered) for ids [B, S].
"""

import os
import sys

import torch
import torch.distributed as dist
import yaml

from card_megatron.config import ParallelConfig, config_from_dict
from card_megatron.parallel.state import init_distributed


def main():
    export, ids_path, out = sys.argv[1:4]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = init_distributed(ParallelConfig(tensor_model_parallel_size=world))
    from card_megatron.model.export import load_canonical_state
    from card_megatron.model.gpt import CardGPT

    with open(os.path.join(export, "config.yaml")) as f:
        cfg = config_from_dict(yaml.safe_load(f))
    state = torch.load(os.path.join(export, "model.pt"), weights_only=True)["state_dict"]
    rows = state["embedding.embedding.word_embeddings.weight"].shape[0]
    model = CardGPT(cfg.model, "causal", rows, tp_size=world, seed=0, tp_group=info.tp_group)
    load_canonical_state(model, state, cfg.model.num_layers, info.tp_rank, info.tp_size)
    ids = torch.load(ids_path)
    with torch.no_grad():
        local = model(ids, torch.arange(ids.shape[1]).expand_as(ids)).contiguous()  # [S, B, V/TP]
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=info.tp_group)
    if info.rank == 0:
        torch.save(torch.cat(parts, dim=-1).transpose(0, 1).contiguous(), out)


if __name__ == "__main__":
    main()
