"""GPU path (NCCL, bf16, fused SDPA): skipped without CUDA. Run on a GPU machine with `pytest -m gpu`."""

import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_cpu_adapter_is_inert_with_cuda():
    from card_megatron.parallel.cpu_adapter import apply_cpu_adapter

    assert apply_cpu_adapter() is False
    assert isinstance(torch.cuda.current_device(), int)


def test_bf16_model_matches_fp32_on_gpu():
    from card_megatron.config import ModelConfig, ParallelConfig
    from card_megatron.model.gpt import CardGPT, per_token_nll
    from card_megatron.parallel.state import init_distributed

    init_distributed(ParallelConfig())
    cfg = ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=4, seq_length=64)
    fp32 = CardGPT(cfg, "causal", 512, seed=1).cuda()
    bf16 = CardGPT(cfg, "causal", 512, seed=1).cuda().to(torch.bfloat16)
    ids = torch.randint(0, 500, (4, 65), device="cuda")
    pos = torch.arange(64, device="cuda").expand(4, 64)
    a = per_token_nll(fp32(ids[:, :-1], pos), ids[:, 1:]).mean()
    b = per_token_nll(bf16(ids[:, :-1], pos), ids[:, 1:]).mean()
    assert abs(a.item() - b.item()) < 0.02 * abs(a.item())
    b.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in bf16.parameters())


def test_training_on_gpu_with_nccl_and_bf16(tiny_corpus, tmp_path):
    from tests.training_runs import losses, overrides, records, train

    run = str(tmp_path / "gpu")
    proc = train(1, overrides(tiny_corpus, run, 8, "train.precision=auto"))
    steps = losses(run)
    assert all(math.isfinite(v) for v in steps.values()) and steps[8] < steps[1]
    assert "mfu" in records(run)[-1]
    startup = proc.stdout + proc.stderr
    assert "backend nccl" in startup and "precision bf16" in startup, startup[-2000:]
