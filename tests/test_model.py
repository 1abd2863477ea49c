"""The transformer: mask kinds really applied, TP=2 parity with TP=1, layout-independent weights.

Tolerances: one forward and backward pass in fp32, no optimizer, so elementwise comparisons hold. Measured
(TP=2 against TP=1): losses equal, per-token NLL within 4.8e-7 of values about 6, gradients within 2.8e-8 of
values up to 0.12; the tolerances below are 35x to 100x those gaps. Recomputation and the fused kernels gave
identical losses and gradients within 1.2e-9.
"""

import pytest
import torch

from card_megatron.config import ModelConfig, ParallelConfig
from tests.distributed import run_torchrun


@pytest.fixture(scope="module")
def single_process():
    from card_megatron.parallel.state import init_distributed

    return init_distributed(ParallelConfig())


def _model(kind, layers=1, seed=3):
    from card_megatron.model.gpt import CardGPT

    cfg = ModelConfig(num_layers=layers, hidden_size=32, num_attention_heads=4, seq_length=8)
    return CardGPT(cfg, kind, vocab_size=128, seed=seed).eval()


def _influence(model, mask=None, S=8):
    """changed[i, j]: does output position i change when input token j changes? (one layer)"""
    ids = torch.randint(0, 100, (1, S), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(S)[None]
    base = model(ids, pos, mask)
    changed = torch.zeros(S, S, dtype=torch.bool)
    for j in range(S):
        other = ids.clone()
        other[0, j] = (other[0, j] + 7) % 100
        changed[:, j] = (model(other, pos, mask) - base).abs().amax(dim=(1, 2)) > 1e-6
    return changed


def test_causal_mask_sees_only_the_past(single_process):
    changed = _influence(_model("causal"))
    assert torch.equal(changed, torch.ones(8, 8, dtype=torch.bool).tril())


def test_full_mask_sees_everything(single_process):
    changed = _influence(_model("full"))
    assert changed.all()


def test_block_mask_is_what_the_model_applies(single_process):
    from card_megatron.objectives.bd3lm import block_diffusion_attention_mask

    mask = block_diffusion_attention_mask(4, 2)  # [8, 8] over concat(xt, x0)
    changed = _influence(_model("block"), mask)
    assert torch.equal(changed, mask | torch.eye(8, dtype=torch.bool))


def test_rope_positions_matter(single_process):
    """BD3LM gives both halves positions 0..L-1: the model must use the given position ids."""
    model = _model("full", layers=2)
    ids = torch.randint(0, 100, (1, 8))
    a = model(ids, torch.arange(8)[None])
    b = model(ids, torch.cat([torch.arange(4), torch.arange(4)])[None])
    assert (a - b).abs().max() > 1e-4


@pytest.mark.slow  # torchrun, 1 and 2 ranks
def test_tensor_parallel_2_matches_1(tmp_path):
    """Same seed, same batch: TP=2 gives TP=1's loss and gradients, and its weights load under TP=1."""
    one, two, reload = (str(tmp_path / f) for f in ("tp1.pt", "tp2.pt", "tp1_from_tp2.pt"))
    worker = "tests/workers/model_parity.py"
    run_torchrun([worker, one], nproc=1)
    run_torchrun([worker, two], nproc=2)
    a, b = torch.load(one), torch.load(two)
    torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b["nll"], a["nll"], rtol=1e-5, atol=1e-5)
    assert a["grads"].keys() == b["grads"].keys()
    for name in a["grads"]:
        torch.testing.assert_close(b["grads"][name], a["grads"][name], rtol=1e-4, atol=1e-6, msg=name)
    # Weights stepped under TP=2 load exactly under TP=1 and TP=2, and both compute the same loss.
    from_tp2 = {}
    for n in (1, 2):
        path = str(tmp_path / f"load_tp{n}.pt")
        run_torchrun([worker, path, "--load", two], nproc=n)
        from_tp2[n] = torch.load(path)
        for name, w in b["state"].items():
            assert torch.equal(from_tp2[n]["loaded"][name], w), name
    assert not torch.allclose(from_tp2[1]["loss"], a["loss"])  # the step changed the weights
    torch.testing.assert_close(from_tp2[1]["loss"], from_tp2[2]["loss"], rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_gives_the_same_gradients(single_process):
    from card_megatron.model.gpt import CardGPT, per_token_nll

    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=8)
    grads = []
    for recompute in (False, True):
        cfg.recompute_activations = recompute
        model = CardGPT(cfg, "causal", vocab_size=128, seed=5).train()
        ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
        per_token_nll(model(ids[:, :-1], torch.arange(8).expand(2, 8)), ids[:, 1:]).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_megatron_fused_kernels_compute_the_same_function(single_process):
    """model.fused_kernels (Megatron's compiled SwiGLU and bias-dropout-add; default on GPUs) changes nothing."""
    from card_megatron.model.gpt import CardGPT, per_token_nll

    results = []
    for fused in (False, True):
        cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16, fused_kernels=fused)
        model = CardGPT(cfg, "causal", vocab_size=128, seed=3).train()
        ids = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(0))
        loss = per_token_nll(model(ids[:, :-1], torch.arange(16).expand(2, 16)), ids[:, 1:]).mean()
        loss.backward()
        results.append((loss.detach(), model.layers[0].layer.mlp.linear_fc1.weight.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-7)
