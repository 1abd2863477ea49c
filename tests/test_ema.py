"""EMA of the weights: the update rule, swapping, exact resume, layout independence, export and loading.

Multi-process runs use torchrun on gloo (2 ranks) with timeouts, like tests/test_training.py.
"""

import io
import json
import logging
import math
import os
import shutil

import pytest
import torch

from card_megatron.training.ema import EMA
from tests.training_runs import LOSS_REL_TOL, REPO, assert_same_weights, losses, overrides, read_export, records, train

ITERS = 6
DECAY = 0.9
# hidden_size 128: under ZeRO-3 the embedding and output layer (vocab x 128 elements, above DeepSpeed's
# 1e5-element persistence threshold) are partitioned while the small parameters stay gathered
# ("persistent"), so both kinds of ZeRO-3 parameter are swapped and exported. A checkpoint (with its
# export) at every step keeps each run's whole weight trajectory, which the EMA is checked against.
EMA_ARGS = [
    f"optim.ema_decay={DECAY}",
    "train.eval_ema=true",
    "model.hidden_size=128",
    "train.save_interval=1",
    f"train.keep_last_checkpoints={ITERS}",
]
LAYOUTS = {
    "single": (1, []),
    "tp2": (2, ["parallel.tensor_model_parallel_size=2"]),
    "dp2_zero3": (2, ["parallel.zero_stage=3"]),  # each rank's EMA covers only its partition
}


def _params(*shapes, dtype=torch.float32):
    return [(f"p{i}", torch.nn.Parameter(torch.randn(*s).to(dtype))) for i, s in enumerate(shapes)]


def _reference_decays(decay: float, num_updates: int, warmup: bool) -> list[float]:
    """The decay of updates 1..num_updates, written from MDLM's rule: min(decay, (1 + n) / (10 + n))."""
    return [min(decay, (1 + n) / (10 + n)) if warmup else decay for n in range(1, num_updates + 1)]


@pytest.mark.parametrize("warmup", [True, False])
def test_update_matches_the_formula(warmup):
    torch.manual_seed(0)
    named = _params((5, 3), (7,))
    ema = EMA(named, decay=0.9, warmup=warmup)
    expected = [p.detach().double().clone() for _, p in named]
    for d in _reference_decays(0.9, 30, warmup):
        with torch.no_grad():
            for _, p in named:
                p.add_(torch.randn_like(p))
        assert ema.next_decay() == d
        ema.update()
        expected = [d * e + (1 - d) * p.detach().double() for e, (_, p) in zip(expected, named)]
    assert ema.num_updates == 30
    for s, e in zip(ema.shadow, expected):
        assert s.dtype == torch.float32
        # fp32 shadow against a float64 recurrence: 30 updates of weights of ~1-5 leave ~30 fp32 roundings
        torch.testing.assert_close(s.double(), e, rtol=1e-6, atol=1e-6)


def test_warmup_forgets_the_initial_weights():
    """A weight that jumps from 0 to 1 at the first step: after N updates the shadow's share of the initial
    weight is the product of the decays, (N+1)! 10! / (N+10)! with warm-up (2.5e-20 at N = 800) and
    decay**N without (0.9999**800 = 0.923, the issue's "92% initial weights after 800 steps")."""
    n = 800
    for warmup, initial_share in [
        (True, math.exp(math.lgamma(n + 2) + math.lgamma(11) - math.lgamma(n + 11))),
        (False, 0.9999**n),
    ]:
        weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        ema = EMA([("w", weight)], decay=0.9999, warmup=warmup)
        with torch.no_grad():
            weight.fill_(1.0)
        for _ in range(n):
            ema.update()
        # the fp32 shadow: 800 roundings of ~6e-8 each
        assert math.isclose(1.0 - float(ema.shadow[0]), initial_share, rel_tol=1e-3, abs_tol=1e-4), warmup
    assert initial_share > 0.92


def test_swapped_puts_the_ema_in_and_restores_the_weights_bit_for_bit():
    torch.manual_seed(1)
    named = _params((4, 4), (3,), dtype=torch.bfloat16)  # the shadow is fp32 whatever the weights are
    ema = EMA(named, decay=0.5)
    with torch.no_grad():
        for _, p in named:
            p.mul_(3.0)
    ema.update()
    trained = [p.detach().clone() for _, p in named]
    with ema.swapped():
        for s, (_, p) in zip(ema.shadow, named):
            assert torch.equal(p, s.to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="inside"):
        with ema.swapped():
            raise RuntimeError("inside")
    for t, (_, p) in zip(trained, named):
        assert torch.equal(p, t)


def test_state_dict_round_trip_and_mismatch():
    torch.manual_seed(2)
    ema = EMA(_params((4, 2), (2,)), decay=0.99)
    ema.update()
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    other = EMA(_params((4, 2), (2,)), decay=0.99)
    other.load_state_dict(saved)
    assert other.num_updates == 1
    for a, b in zip(ema.shadow, other.shadow):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"ckpt/ema\.pt: EMA of p0 has shape \(4, 2\), this rank holds \(2, 4\)"):
        EMA(_params((2, 4), (2,)), decay=0.99).load_state_dict(saved, "ckpt/ema.pt")


def test_ema_switched_on_and_off_between_runs(tiny_corpus, tmp_path, caplog):
    """EMA turned on when resuming starts from the resumed weights; turned off, it is dropped; a checkpoint
    of another layout is refused; load_model(ema=True) refuses a checkpoint without EMA."""
    from card_megatron.config import load_config
    from card_megatron.inference.loading import load_model
    from card_megatron.training.trainer import Trainer

    run = str(tmp_path / "switch")

    def trainer(*extra):
        return Trainer(
            load_config(os.path.join(REPO, "configs", "tiny-cpu.yaml"), overrides(tiny_corpus, run, 10, *extra))
        )

    caplog.set_level(logging.INFO, logger="card_megatron")
    plain = trainer()
    assert plain.ema is None
    with plain.ema_weights():  # a no-op without EMA
        pass
    plain.train_step()
    plain.save()
    plain.close()  # a Trainer holds the run directory until then
    with pytest.raises(ValueError, match=r"step_00000001/export/model\.index\.json has no EMA weights"):
        load_model(run, device="cpu", ema=True)

    with_ema = trainer("optim.ema_decay=0.5")
    assert "has no EMA: the EMA (decay 0.5) starts from the weights of step 1" in caplog.text
    before = [p.detach().clone() for p in with_ema.model.parameters()]
    for s, p in zip(with_ema.ema.shadow, before):
        assert torch.equal(s, p)
    with_ema.train_step()
    d = min(0.5, 2 / 11)  # the first update of an EMA started on resume, with the default warm-up
    for s, b, p in zip(with_ema.ema.shadow, before, with_ema.model.parameters()):
        torch.testing.assert_close(s, d * b + (1 - d) * p.detach())
    with with_ema.ema_weights():
        for s, p in zip(with_ema.ema.shadow, with_ema.model.parameters()):
            assert torch.equal(p, s)
    with_ema.save()
    with_ema.close()
    checkpoint = os.path.join(run, "checkpoints", "step_00000002")
    assert "ema_state_dict" in read_export(checkpoint)

    # optim.ema_decay=0 would drop the trained EMA: refused unless train.drop_ema says so (issue 21).
    from card_megatron.config import ConfigError

    with pytest.raises(ConfigError, match="the checkpoint holds an EMA .* or train.drop_ema=true to drop it"):
        trainer()
    caplog.clear()
    dropped = trainer("train.drop_ema=true")
    assert dropped.ema is None
    dropped.close()
    assert "holds an EMA, but optim.ema_decay is 0 and train.drop_ema is true: the EMA is dropped" in caplog.text

    # An EMA saved with TP=2 (two files) cannot resume on one process: refused, with the reason.
    shutil.copyfile(
        os.path.join(checkpoint, "ema_tp00_pp000_dp00000.pt"), os.path.join(checkpoint, "ema_tp01_pp000_dp00000.pt")
    )
    with pytest.raises(ValueError, match="holds the EMA of another parallel layout"):
        trainer("optim.ema_decay=0.5")


# ----------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def ema_run(tiny_corpus, tmp_path_factory):
    """layout -> the run directory of an ITERS-step run with EMA (each trained once, on first use)."""
    done = {}

    def get(layout: str) -> str:
        if layout not in done:
            nproc, extra = LAYOUTS[layout]
            run = str(tmp_path_factory.mktemp(layout))
            train(nproc, overrides(tiny_corpus, run, ITERS, *EMA_ARGS, *extra))
            done[layout] = run
        return done[layout]

    return get


def _export(run: str, step: int = ITERS) -> dict:
    return read_export(os.path.join(run, "checkpoints", f"step_{step:08d}"))


def _trajectory(run: str) -> list[dict]:
    """The exports of steps 1..ITERS."""
    return [_export(run, step) for step in range(1, ITERS + 1)]


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ema_follows_its_own_weights(layout, ema_run):
    """Each layout's exported EMA is the EMA recomputed from the same run's exported weights, step by step.

    No tolerance between layouts is involved: the recomputation repeats the trainer's fp32 operations on
    the same numbers (the export holds the parameters bit for bit). It allows 2 ulps (rtol 2.4e-7), since a
    vectorised kernel may fuse the multiply-add where its scalar tail does not, and ZeRO-3 and TP put an
    element at another place relative to the vector width."""
    steps = _trajectory(ema_run(layout))
    shadow = {name: t.clone() for name, t in steps[0]["ema_state_dict"].items()}
    for step, blob in enumerate(steps[1:], start=2):
        d = _reference_decays(DECAY, step, warmup=True)[-1]
        for name, s in shadow.items():
            s.mul_(d).add_(blob["state_dict"][name], alpha=1.0 - d)
            got = blob["ema_state_dict"][name]
            torch.testing.assert_close(got, s, rtol=2.4e-7, atol=0.0, msg=f"step {step} {name}")
    name = "output.output_layer.weight"
    assert not torch.allclose(shadow[name], steps[-1]["state_dict"][name])  # the EMA is not the weights


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "dp2_zero3"])
def test_ema_matches_single_process(layout, ema_run):
    """The exported EMA (canonical names, full shapes) and the EMA validation do not depend on the layout.

    The EMA is a convex combination of the initial weights (the same under every layout) and the weights
    after each step, so elementwise it cannot be further from the single-process EMA than the furthest of
    the weights along the way: that bound is the tolerance, plus the EMA's own roundings (two per update,
    each at most an ulp of the largest term it combines), and the weights themselves meet the layouts'
    weight tolerance (tests/training_runs.py)."""
    single, run = _trajectory(ema_run("single")), _trajectory(ema_run(layout))
    for a, b in zip(single, run):
        assert_same_weights(a["state_dict"], b["state_dict"], layout)
    a, b = single[-1], run[-1]
    assert a["ema_state_dict"].keys() == a["state_dict"].keys() == b["ema_state_dict"].keys()
    for name, want in a["ema_state_dict"].items():
        furthest = torch.stack([(y["state_dict"][name] - x["state_dict"][name]).abs() for x, y in zip(single, run)])
        largest = torch.stack([x[k][name].abs() for x in single for k in ("state_dict", "ema_state_dict")])
        bound = furthest.amax(0) + 2 * ITERS * torch.finfo(torch.float32).eps * largest.amax(0)
        gap = (b["ema_state_dict"][name] - want).abs()
        assert (gap <= bound).all(), f"{name}: EMA gap {float((gap - bound).max()):.2e} over the weights' bound"
    name = "output.output_layer.weight"
    assert not torch.allclose(a["ema_state_dict"][name], a["state_dict"][name])  # the EMA is not the weights
    e0, e1 = records(ema_run("single"), "eval.jsonl"), records(ema_run(layout), "eval.jsonl")
    assert e0[0]["ema_val_nll"] == e0[0]["val_nll"]  # the EMA starts from the initial weights
    assert e0[-1]["ema_val_nll"] != e0[-1]["val_nll"]
    assert math.isclose(e1[-1]["ema_val_nll"], e0[-1]["ema_val_nll"], rel_tol=LOSS_REL_TOL)


@pytest.mark.slow
def test_exact_resume_keeps_the_ema(ema_run, tiny_corpus, tmp_path):
    """ZeRO-3 on 2 ranks, stopped by exit_interval and resumed: bit-identical losses, EMA validation
    and exported EMA, as if never interrupted."""
    full = ema_run("dp2_zero3")
    stopped = str(tmp_path / "stopped")
    args = overrides(tiny_corpus, stopped, ITERS, *EMA_ARGS, *LAYOUTS["dp2_zero3"][1])
    train(2, [*args, "train.exit_interval=3"])
    files = sorted(f for f in os.listdir(os.path.join(stopped, "checkpoints", "step_00000003")) if f.startswith("ema_"))
    assert files == ["ema_tp00_pp000_dp00000.pt", "ema_tp00_pp000_dp00001.pt"]  # one partition per rank
    train(2, args)
    assert losses(stopped) == losses(full)
    assert records(stopped, "eval.jsonl")[-1] == records(full, "eval.jsonl")[-1]
    a, b = _export(full), _export(stopped)
    for name in a["ema_state_dict"]:
        assert torch.equal(b["ema_state_dict"][name], a["ema_state_dict"][name]), name


def _generate_tool():
    from card_megatron.tools import generate  # what tools/generate.py runs

    return generate


@pytest.mark.slow
def test_load_model_and_generate_with_ema(ema_run, tmp_path, capsys):
    from card_megatron.inference.loading import load_model

    run = ema_run("single")
    blob = _export(run)
    plain, ema = load_model(run, device="cpu"), load_model(run, device="cpu", ema=True)
    assert ema.ema and not plain.ema
    for name, p in ema.model.named_parameters():
        assert torch.equal(p, blob["ema_state_dict"][name]), name
    for name, p in plain.model.named_parameters():
        assert torch.equal(p, blob["state_dict"][name]), name

    tool = _generate_tool()
    assert tool.main(["--checkpoint", run, "--ema", "--max-new-tokens", "3", "--greedy"]) == 0
    assert "EMA weights" in capsys.readouterr().err
    no_ema = tmp_path / "no_ema"
    shutil.copytree(os.path.join(run, "checkpoints", f"step_{ITERS:08d}", "export"), no_ema)
    index = json.loads((no_ema / "model.index.json").read_text())  # the export as a run without EMA writes it
    del index["ema"]
    for name in [f for f in index["files"] if f.startswith("ema-")]:
        del index["files"][name]
        os.remove(no_ema / name)
    (no_ema / "model.index.json").write_text(json.dumps(index))
    assert tool.main(["--checkpoint", str(no_ema), "--ema", "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert f"{no_ema / 'model.index.json'} has no EMA weights" in err and "Traceback" not in err
