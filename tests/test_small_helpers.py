"""The small pure helpers, each against a reference written elsewhere or worked out by hand:
the learning-rate schedule (training/schedule.py) against Megatron-core's OptimizerParamScheduler,
the DeepSpeed config (parallel/deepspeed_glue.py) as DeepSpeed's own parser reads it, the MFU
numerator (training/metrics.py) against torch's FLOP counter and the peaks against NVIDIA's data
sheets, and the padded vocabulary (model/gpt.py) against published sizes."""

import math

import pytest
import torch

from card_megatron.config import Config, OptimConfig
from card_megatron.model.gpt import padded_vocab_size
from card_megatron.parallel.deepspeed_glue import deepspeed_config
from card_megatron.training.metrics import model_flops_per_token, peak_flops
from card_megatron.training.schedule import learning_rate

# ----------------------------------------------------------------------------- learning-rate schedule


def test_schedule_hand_computed_values():
    """Warmup reaches lr at its last step; cosine passes the midpoint at half way; min_lr at the end.

    ``pytest.approx`` (relative 1e-6) where the expected value is another float64 formula for the same
    number, which may round differently in the last bits (measured: 0 on every value); a wrong step or
    formula is off by at least 1e-2 relative. Exact comparisons where both sides are exact binary fractions."""
    cfg = OptimConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=4, lr_decay_style="cosine", lr_decay_iters=12)
    assert [learning_rate(s, cfg, 100) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(4, cfg, 100) == 1.0  # decay starts at the top
    assert learning_rate(6, cfg, 100) == pytest.approx(0.1 + 0.9 * (2 + math.sqrt(2)) / 4)  # cos(pi/4)
    assert learning_rate(8, cfg, 100) == pytest.approx(0.55)  # half way: (1 + 0.1) / 2
    assert learning_rate(12, cfg, 100) == pytest.approx(0.1)
    assert learning_rate(50, cfg, 100) == pytest.approx(0.1)  # held at min_lr after lr_decay_iters

    linear = OptimConfig(lr=2.0, min_lr=0.0, lr_warmup_iters=0, lr_decay_style="linear", lr_decay_iters=None)
    assert [learning_rate(s, linear, 8) for s in (0, 2, 4, 6, 8)] == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0])

    constant = OptimConfig(lr=3e-4, min_lr=0.0, lr_warmup_iters=2, lr_decay_style="constant")
    assert [learning_rate(s, constant, 10) for s in (0, 1, 2, 9, 20)] == pytest.approx([1.5e-4, 3e-4, 3e-4, 3e-4, 3e-4])


def _megatron_lrs(style, lr, min_lr, warmup, decay_iters, steps):
    """Megatron-core's learning rate after ``num_steps`` scheduler steps, for num_steps in ``steps``."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=lr,
        min_lr=min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay_iters,
        lr_decay_style=style,
        start_wd=0.0,
        end_wd=0.0,
        wd_incr_steps=1,
        wd_incr_style="constant",
    )
    out = {}
    for n in range(max(steps) + 1):
        if n in steps:
            out[n] = sched.get_lr(optimizer.param_groups[0])
        sched.step(1)
    return out


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 5])
def test_schedule_matches_megatron(style, warmup):
    """Megatron's scheduler gives init_lr (0) to the first step; ours gives lr/warmup, so our warmup
    step s is Megatron's step s+1. From the end of warmup on, our step s is Megatron's step s."""
    lr, min_lr, decay, train_iters = 6e-4, 6e-5, 40, 50
    cfg = OptimConfig(lr=lr, min_lr=min_lr, lr_warmup_iters=warmup, lr_decay_style=style, lr_decay_iters=decay)
    steps = range(train_iters)
    ref = _megatron_lrs(style, lr, min_lr, warmup, decay, set(steps) | {s + 1 for s in steps})
    for s in steps:
        expected = ref[s + 1] if s < warmup else ref[s]
        # rel 1e-12: Megatron evaluates the same float64 closed forms (measured: identical on all 300
        # values); a few ulps of reordering stay far inside it, an off-by-one step does not (>= 1e-3)
        assert learning_rate(s, cfg, train_iters) == pytest.approx(expected, rel=1e-12), s


# ----------------------------------------------------------------------------- DeepSpeed config


class _MPU:
    def __init__(self, dp):
        self.dp = dp

    def get_data_parallel_world_size(self):
        return self.dp


def _parsed_by_deepspeed(ds: dict, dp: int, monkeypatch):
    """The dict as DeepSpeed reads it (its validation, its derived batch sizes) for ``dp`` data ranks."""
    from deepspeed.runtime import config as ds_config

    # DeepSpeedConfig asks torch.distributed for the rank first; no process group runs here.
    monkeypatch.setattr(ds_config.dist, "get_rank", lambda *a, **k: 0)
    return ds_config.DeepSpeedConfig(ds, mpu=_MPU(dp))


@pytest.mark.parametrize("global_batch,micro,dp,accumulation", [(32, 4, 2, 4), (32, 8, 4, 1), (12, 1, 3, 4)])
def test_deepspeed_batch_sizes(global_batch, micro, dp, accumulation, monkeypatch):
    cfg = Config()
    cfg.train.global_batch_size, cfg.train.micro_batch_size = global_batch, micro
    ds = deepspeed_config(cfg.train, cfg.optim, cfg.parallel.zero_stage, data_parallel_size=dp, cuda=False)
    parsed = _parsed_by_deepspeed(ds, dp, monkeypatch)  # asserts global == micro * accumulation * dp
    assert parsed.train_batch_size == global_batch
    assert parsed.train_micro_batch_size_per_gpu == micro
    assert parsed.gradient_accumulation_steps == accumulation


@pytest.mark.parametrize(
    "precision,cuda,bf16,fp16",
    [
        ("auto", False, False, False),
        ("auto", True, True, False),
        ("fp16", True, False, True),
        ("fp32", True, False, False),
    ],
)
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_deepspeed_precision_zero_and_clipping(precision, cuda, bf16, fp16, zero, monkeypatch):
    cfg = Config()
    cfg.train.precision, cfg.parallel.zero_stage, cfg.optim.clip_grad = precision, zero, 0.5
    parsed = _parsed_by_deepspeed(
        deepspeed_config(cfg.train, cfg.optim, cfg.parallel.zero_stage, data_parallel_size=1, cuda=cuda), 1, monkeypatch
    )
    assert (parsed.bfloat16_config.enabled, parsed.float16_config.enabled) == (bf16, fp16)
    assert parsed.zero_optimization_stage == zero
    assert parsed.gradient_clipping == 0.5
    # ZeRO-3 gathers the partitioned weights when saving, so exports need no ZeRO tooling.
    assert parsed.zero_config.gather_16bit_weights_on_model_save == (zero == 3)


# ----------------------------------------------------------------------------- MFU


class _Block(torch.nn.Module):
    """A pre-norm-free transformer block with the matmuls of ours: QKV, attention, output, 4h MLP."""

    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(hidden, 3 * hidden, bias=False)
        self.out = torch.nn.Linear(hidden, hidden, bias=False)
        self.up = torch.nn.Linear(hidden, 4 * hidden, bias=False)
        self.down = torch.nn.Linear(4 * hidden, hidden, bias=False)

    def forward(self, x):  # x: [T, hidden]
        T, h = x.shape
        q, k, v = (t.reshape(T, self.heads, h // self.heads).transpose(0, 1) for t in self.qkv(x).chunk(3, dim=-1))
        probs = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)  # full T x T scores, as PaLM counts them
        x = x + self.out(torch.bmm(probs, v).transpose(0, 1).reshape(T, h))
        return x + self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("layers,hidden,heads,seq", [(1, 16, 2, 8), (3, 32, 4, 24)])
def test_model_flops_per_token_counts_what_torch_counts(layers, hidden, heads, seq):
    """6N for the weights plus 12 * layers * hidden * seq for attention: torch's FLOP counter over one
    forward and backward pass of a transformer's matmuls (no embedding) counts the same per token."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[_Block(hidden, heads) for _ in range(layers)])
    num_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(seq, hidden, requires_grad=True)  # as if an embedding came first: every input gradient
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    assert counter.get_total_flops() / seq == model_flops_per_token(num_params, layers, hidden, seq)


@pytest.mark.parametrize(
    "name,tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989),  # H100 SXM data sheet: 1,979 TFLOPS BF16 with sparsity, half dense
        ("NVIDIA H100 PCIe", 756),  # 1,513 with sparsity
        ("NVIDIA H200", 989),
        ("NVIDIA A100-SXM4-80GB", 312),  # 624 with sparsity
        ("NVIDIA A100-PCIE-40GB", 312),
        ("NVIDIA L40S", 362),  # 733 with sparsity
        ("NVIDIA A10", 125),  # 250 with sparsity
    ],
)
def test_peak_flops_from_data_sheets(name, tflops):
    assert peak_flops(name) == tflops * 1e12  # whole TFLOPS x 1e12 is an integer below 2**53: exact in float64


def test_peak_flops_unknown_device_gives_no_mfu():
    assert peak_flops("NVIDIA GeForce GTX 1080") is None
    assert peak_flops("cpu") is None


# ----------------------------------------------------------------------------- padded vocabulary


@pytest.mark.parametrize(
    "vocab,divisible_by,tp,padded",
    [
        (50257, 128, 1, 50304),  # GPT-2's 50,257 tokens as Megatron-LM and nanoGPT pad them
        (50257, 128, 2, 50432),  # each of 2 shards a multiple of 128: 197 * 256
        (32000, 128, 8, 32768),  # 32 * 1024
        (1024, 128, 1, 1024),  # already a multiple: unchanged
        (1025, 128, 1, 1152),
        (1, 1, 1, 1),
    ],
)
def test_padded_vocab_size(vocab, divisible_by, tp, padded):
    got = padded_vocab_size(vocab, divisible_by, tp)
    assert got == padded
    assert got >= vocab and got % (divisible_by * tp) == 0 and got - vocab < divisible_by * tp
