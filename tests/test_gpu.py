"""GPU path (NCCL, bf16, fused SDPA): skipped without CUDA. Run on a GPU machine with `pytest -m gpu`."""

import dataclasses
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


def test_cuda_graphs_decode_like_the_dynamic_path(monkeypatch):
    """--cuda-graphs on CUDA: each decode captures its step shape once and replays it, and commits the
    tokens of the dynamic path in the same passes (AR, threshold CARD, verify; ragged batch, greedy)."""
    from card_megatron.config import ModelConfig
    from card_megatron.inference import graphs, sampling
    from card_megatron.inference.causal import CausalDecodeConfig, SpecialTokenIds, decode_causal
    from card_megatron.model.gpt import CardGPT
    from card_megatron.parallel.state import init_single_process

    init_single_process()
    runners = []

    class Recording(graphs.CudaGraphForward):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            runners.append(self)

    monkeypatch.setattr(graphs, "CudaGraphForward", Recording)
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, seq_length=64)
    model = CardGPT(cfg, "causal", 96, seed=11).cuda().eval()
    with torch.no_grad():
        model.output.output_layer.weight.mul_(30.0)
    special = SpecialTokenIds(eos=3, mask=4, pad=0)
    banned = torch.zeros(96, dtype=torch.bool, device="cuda")
    banned[[4, 0, 2]] = True
    prompts = [[3, 17, 40, 8, 9, 55], [3], [3, 60, 61], [3] + list(range(10, 30))]
    greedy = sampling.SamplingConfig(greedy=True)
    seeds = sampling.sequence_seeds(0, torch.arange(len(prompts)))
    for causal in (
        CausalDecodeConfig(window=1),
        CausalDecodeConfig(window=4, threshold=0.6),
        CausalDecodeConfig(window=6, commit_policy="verify"),
    ):
        with torch.inference_mode():
            ref = decode_causal(model, prompts, 24, special, banned, greedy, seeds, causal)[0]
            runners.clear()
            graphed = dataclasses.replace(causal, cuda_graphs=True)
            got = decode_causal(model, prompts, 24, special, banned, greedy, seeds, graphed)[0]
        assert [(o.token_ids, o.num_forward_passes) for o in got] == [(o.token_ids, o.num_forward_passes) for o in ref]
        (runner,) = runners
        assert runner.use_graphs and runner.counts["captured"] >= 1 and runner.counts["replayed"] >= 10, runner.counts
