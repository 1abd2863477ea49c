"""Training speed (issue 23): no host synchronisation on steps that log nothing, the chunked
cross entropy against Megatron-core's, the compiled layers against eager.

Tolerances: the chunked cross entropy against Megatron-core's on the same logits measured gaps of 0 (the
same arithmetic by construction), so rtol 1e-6 and 1e-5 only leave room for another chunking order; the
compiled layers against eager (rtol 1e-5 on the loss, 1e-4 on gradients) allow inductor's fused kernels to
round differently in one fp32 pass.
"""

import os
import sys

import pytest
import torch

from tests.training_runs import REPO, overrides

SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


OPTIM_DIR = os.path.dirname(torch.optim.__file__)


class SyncCounter:
    """Counts the calls of torch.Tensor methods that read a tensor's value to the host.

    Calls from ``torch/optim`` are left out: unfused AdamW (the CPU's) reads its step counter,
    which lives on the CPU whatever the device; on GPUs the trainer uses the fused AdamW, which
    keeps it on the device.
    """

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in SYNCS:
            real = getattr(torch.Tensor, name)

            def counted(t, *a, _real=real, _name=name, **k):
                if not sys._getframe(1).f_code.co_filename.startswith(OPTIM_DIR):
                    self.calls.append(_name)
                return _real(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("check", [True, False], ids=["nonfinite_check", "no_check"])
def test_steps_that_log_nothing_do_not_read_the_device(check, tiny_corpus, tmp_path, monkeypatch):
    """Between log intervals a step reads nothing but the non-finite flag of each micro-batch (one
    all-reduced read each, which also carries the stop request); with the check off, nothing.
    A logged step reads its loss, metrics and gradient norm."""
    from card_megatron.config import load_config
    from card_megatron.training.trainer import Trainer

    extra = ["train.log_interval=3"] + ([] if check else ["train.max_nonfinite_steps=0"])
    cfg = load_config(os.path.join(REPO, "configs", "tiny-cpu.yaml"), overrides(tiny_corpus, str(tmp_path), 6, *extra))
    trainer = Trainer(cfg)
    counter = SyncCounter(monkeypatch)
    for step in (1, 2):
        counter.calls.clear()
        metrics = trainer.train_step()
        assert metrics["loss"] is None and metrics["grad_norm"] is None
        assert counter.calls == (["tolist"] * trainer.accumulation if check else []), step
    counter.calls.clear()
    metrics = trainer.train_step()  # step 3 is logged
    assert counter.calls, "a logged step reads its scalars"
    assert metrics["loss"] > 0 and metrics["grad_norm"] > 0
    monkeypatch.undo()
    trainer.close()


@pytest.fixture(scope="module")
def single_process():
    from card_megatron.parallel.state import init_single_process

    init_single_process()


def megatron_nll(logits, targets, suppress_id=None):
    """The loss before issue 23: Megatron-core's vocab-parallel cross entropy on a float32 copy."""
    from megatron.core import tensor_parallel

    x = logits.float()
    if suppress_id is not None:
        x = x.clone()
        x[..., suppress_id] = float("-inf")
    return tensor_parallel.vocab_parallel_cross_entropy(x.contiguous(), targets.contiguous())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("suppress_id", [None, 5])
@pytest.mark.parametrize("chunk_bytes", [2**30, 4 * 96 * 7])  # one chunk; chunks of 7 rows (the last one short)
def test_chunked_nll_equals_megatrons_cross_entropy(dtype, suppress_id, chunk_bytes, single_process):
    from card_megatron.model.cross_entropy import chunked_vocab_parallel_nll

    g = torch.Generator().manual_seed(0)
    S, B, V = 11, 3, 96
    base = (torch.randn(S, B, V, generator=g) * 3).to(dtype)
    targets = torch.randint(0, V, (S, B), generator=g)
    targets[targets == suppress_id] = 0
    weights = torch.rand(S, B, generator=g)
    results = []
    for nll_of in (
        megatron_nll,
        lambda x, t, s: chunked_vocab_parallel_nll(x, t, suppress_id=s, chunk_bytes=chunk_bytes),
    ):
        logits = base.clone().requires_grad_(True)
        nll = nll_of(logits * 1.0, targets, suppress_id)  # through a product, as the head's output
        (nll * weights).sum().backward()
        results.append((nll.detach(), logits.grad))
    (nll_a, grad_a), (nll_b, grad_b) = results
    assert nll_b.dtype == torch.float32 and nll_b.shape == (S, B)
    torch.testing.assert_close(nll_b, nll_a, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)
    if suppress_id is not None:
        assert torch.all(grad_b[..., suppress_id] == 0)


def test_chunked_nll_leaves_the_logits_until_backward_and_refuses_a_second_backward(single_process):
    from card_megatron.model.cross_entropy import chunked_vocab_parallel_nll

    logits = torch.randn(4, 2, 16, requires_grad=True)
    out = logits * 2.0
    before = out.detach().clone()
    nll = chunked_vocab_parallel_nll(out, torch.zeros(4, 2, dtype=torch.long))
    assert torch.equal(out.detach(), before)  # diagnostics may read the logits after the loss
    nll.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        nll.sum().backward()
    with pytest.raises(ValueError, match="targets shape"):
        chunked_vocab_parallel_nll(out, torch.zeros(4, dtype=torch.long))


def test_card_loss_and_gradients_equal_megatrons_cross_entropy(single_process):
    """A tiny CARD model, CARD's corruption and context-aware weights: the same loss and parameter
    gradients through per_token_nll (chunked) as through Megatron-core's cross entropy."""
    from card_megatron.config import ModelConfig, ObjectiveConfig
    from card_megatron.model.gpt import CardGPT, per_token_nll
    from card_megatron.objectives import build_objective

    L, V = 16, 64
    objective = build_objective(ObjectiveConfig(name="card"), L, V - 1, V)
    model = CardGPT(ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=L), "causal", V)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V - 1, (3, L + 1), generator=g)
    mi, li = objective.prepare(tokens, torch.tensor([1, 2, 3]), torch.arange(3))
    assert li.weights.min() < li.weights.max()  # the weights are not uniform
    results = []
    for nll_of in (lambda x: megatron_nll(x, li.targets.t()).t(), lambda x: per_token_nll(x, li.targets)):
        model.zero_grad(set_to_none=True)
        loss, _ = objective.loss(nll_of(model(mi.input_ids, mi.position_ids, mi.attention_mask)), li)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)


def tiny_model(**overrides):
    from card_megatron.config import ModelConfig
    from card_megatron.model.gpt import CardGPT

    cfg = ModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, seq_length=8, **overrides
    )
    return CardGPT(cfg, "causal", 64, seed=3)


def test_a_transformer_layer_compiles_into_one_graph(single_process):
    """torch._dynamo.explain of one layer: one graph, no break (Megatron-core's row-parallel linear
    broke it twice before model/compile.RowParallelLinear)."""
    layer = tiny_model().layers[0]
    hidden = torch.randn(8, 2, 32, requires_grad=True)
    position_ids = torch.arange(8).expand(2, 8)
    explained = torch._dynamo.explain(layer.layer)(
        hidden_states=hidden, attention_mask=None, rotary_pos_emb=layer.rotary_for(position_ids)
    )
    assert [b.reason for b in explained.break_reasons] == []
    assert explained.graph_count == 1


def test_compile_layers_setting(single_process):
    from card_megatron.config import ConfigError, load_config
    from card_megatron.model.compile import compile_layers, use_compiled_layers

    assert use_compiled_layers(None, cuda=True) and not use_compiled_layers(None, cuda=False)
    assert use_compiled_layers(True, cuda=False) and not use_compiled_layers(False, cuda=True)
    with pytest.raises(ConfigError, match="compile_layers"):
        load_config(os.path.join(REPO, "configs", "tiny-cpu.yaml"), ["model.compile_layers=sometimes"])
    model = tiny_model()
    names = list(model.state_dict())
    assert compile_layers(model) == 2
    assert list(model.state_dict()) == names  # checkpoints do not change


@pytest.mark.slow
def test_compiled_layers_give_the_loss_and_gradients_of_eager(single_process):
    from card_megatron.model.compile import compile_layers
    from card_megatron.model.gpt import per_token_nll

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 9), generator=g)
    position_ids = torch.arange(8).expand(2, 8)
    results = []
    for compiled in (False, True):
        model = tiny_model()
        if compiled:
            compile_layers(model)
        loss = per_token_nll(model(ids[:, :-1], position_ids), ids[:, 1:]).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (eager_loss, eager), (compiled_loss, compiled) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=0)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gpu_checks_script_fits_8_minutes_skips_done_steps_and_cleans_up(tmp_path):
    """tools/gpu_checks.sh, dry run: every step listed with its command, a step done in an earlier
    call skipped, its own temporary directory removed at the end, no fixed /tmp path; the steps'
    timeouts (with the optional decoding table) add up to under 8 minutes."""
    import re
    import subprocess

    script = os.path.join(REPO, "tools", "gpu_checks.sh")
    (tmp_path / "tmp").mkdir()
    (tmp_path / "out" / "done").mkdir(parents=True)
    (tmp_path / "out" / "done" / "gpu_tests").touch()
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DRY_RUN": "1", "TMPDIR": str(tmp_path / "tmp")}
    env["GEN_ARGS"] = "--checkpoint runs/demo"
    proc = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "== gpu_tests: done in an earlier call, skipped" in proc.stdout
    assert "== anchor_350m (at most 150 s):" in proc.stdout and "configs/gpt-350m.yaml --seq-length 1024" in proc.stdout
    assert "== anchor_card1b (at most 150 s):" in proc.stdout and "configs/card-1b.yaml --seq-length 128" in proc.stdout
    assert "--batch-size 64 --checkpoint runs/demo" in proc.stdout
    assert os.listdir(tmp_path / "tmp") == []
    text = open(script).read()
    assert "/tmp/" not in text.replace("${TMPDIR:-/tmp}", "")
    limits = [int(s) for s in re.findall(r"\(at most (\d+) s\)", proc.stdout)]
    assert len(limits) == 5 and sum(limits) + 100 < 8 * 60  # + the skipped gpu_tests step's 100 s
