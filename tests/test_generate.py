"""Generation: decoder invariants on tiny random-weight models, then the CLI on tiny trained checkpoints."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from card_megatron.config import ModelConfig
from card_megatron.inference import sampling
from card_megatron.inference.causal import CausalDecodeConfig, SpecialTokenIds, decode_causal
from card_megatron.inference.diffusion import decode_bd3lm, decode_mdlm
from tests import training_runs

V = 96
SPECIAL = SpecialTokenIds(eos=3, mask=4, pad=0)
GREEDY = sampling.SamplingConfig(greedy=True)
PROMPTS = [[3, 17, 40, 8, 9, 55], [3], [3, 60, 61]]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def single_process():
    from card_megatron.parallel.state import init_single_process

    init_single_process()


def _model(kind="causal", seed=11, sharpen=30.0):
    """A random 2-layer model; the output weights are scaled so that predictions are peaked
    (confidences spread over (0, 1), so thresholds commit some window positions and not others)."""
    from card_megatron.model.gpt import CardGPT

    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=64)
    model = CardGPT(cfg, kind, vocab_size=V, seed=seed).eval()
    with torch.no_grad():
        model.output.output_layer.weight.mul_(sharpen)
    return model


def _banned():
    banned = torch.zeros(V, dtype=torch.bool)
    banned[[SPECIAL.mask, SPECIAL.pad, 2]] = True
    banned[90:] = True  # padded vocabulary
    return banned


def _causal(model, prompts, max_new=12, cfg=CausalDecodeConfig(), samp=GREEDY, seq_ids=None, special=SPECIAL):
    seeds = sampling.sequence_seeds(0, torch.tensor(seq_ids or list(range(len(prompts)))))
    with torch.no_grad():
        return decode_causal(model, prompts, max_new, special, _banned(), samp, seeds, cfg)[0]


def _naive_greedy(model, prompt, max_new):
    """Greedy AR without any cache: the full sequence recomputed every step."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(torch.tensor([seq]), torch.arange(len(seq))[None])[-1, 0].double()
            seq.append(int(logits.masked_fill(_banned(), float("-inf")).argmax()))
    return seq[len(prompt) :]


def test_ar_with_cache_equals_naive_greedy(single_process):
    model = _model()
    outs = _causal(model, PROMPTS, cfg=CausalDecodeConfig(window=1))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == _naive_greedy(model, prompt, 12)
        assert out.num_forward_passes == 12 and out.stopped == "length"


@pytest.mark.parametrize("window,policy", [(2, "prefix"), (5, "prefix"), (5, "any")])
def test_card_one_token_per_step_equals_ar(single_process, window, policy):
    model = _model()
    ar = _causal(model, PROMPTS, cfg=CausalDecodeConfig(window=1))
    card = _causal(model, PROMPTS, cfg=CausalDecodeConfig(window=window, threshold=1.5, commit_policy=policy))
    assert [o.token_ids for o in card] == [o.token_ids for o in ar]
    assert all(o.num_forward_passes == 12 for o in card)


def test_card_one_token_per_step_equals_ar_when_sampling(single_process):
    """The draws are keyed by (seed, sequence, position), so sampled tokens agree too."""
    model = _model()
    samp = sampling.SamplingConfig(temperature=1.3, top_k=20, top_p=0.9, seed=0)
    ar = _causal(model, PROMPTS, cfg=CausalDecodeConfig(window=1), samp=samp)
    card = _causal(model, PROMPTS, cfg=CausalDecodeConfig(window=4, threshold=2.0), samp=samp)
    assert [o.token_ids for o in card] == [o.token_ids for o in ar]
    assert [o.token_ids for o in ar] != [o.token_ids for o in _causal(model, PROMPTS, cfg=CausalDecodeConfig(window=1))]


@pytest.mark.parametrize("policy", ["prefix", "any"])
def test_parallel_commits_batch_equals_one_by_one(single_process, policy):
    model = _model()
    cfg = CausalDecodeConfig(window=4, threshold=0.65, commit_policy=policy)
    batch = _causal(model, PROMPTS, max_new=16, cfg=cfg)
    alone = [_causal(model, [p], max_new=16, cfg=cfg, seq_ids=[i])[0] for i, p in enumerate(PROMPTS)]
    assert [o.token_ids for o in batch] == [o.token_ids for o in alone]
    assert [o.num_forward_passes for o in batch] == [o.num_forward_passes for o in alone]
    # the threshold really committed several tokens per pass, and not always the whole window
    total = sum(len(o.token_ids) for o in batch)
    passes = sum(o.num_forward_passes for o in batch)
    assert passes < total < 4 * passes
    assert all(4 not in o.token_ids and 0 not in o.token_ids for o in batch)


def test_tiny_threshold_commits_whole_windows(single_process):
    model = _model()
    outs = _causal(model, PROMPTS, max_new=12, cfg=CausalDecodeConfig(window=4, threshold=1e-9))
    assert all(len(o.token_ids) == 12 and o.num_forward_passes == 3 for o in outs)


def test_eos_and_length_stopping(single_process):
    """Changing which id is eos changes nothing but where each sequence stops (eos kept, rest dropped)."""
    model = _model()
    for cfg in (
        CausalDecodeConfig(window=1),
        CausalDecodeConfig(window=4, threshold=1e-9),
        CausalDecodeConfig(window=3, threshold=0.65, commit_policy="any"),
    ):
        free = _causal(model, PROMPTS, max_new=10, cfg=cfg)
        assert all(o.stopped == "length" and len(o.token_ids) == 10 for o in free)
        eos = free[0].token_ids[3]  # the 4th token of sequence 0 becomes the end-of-sequence id
        outs = _causal(model, PROMPTS, max_new=10, cfg=cfg, special=SpecialTokenIds(eos=eos, mask=SPECIAL.mask, pad=0))
        for o, f in zip(outs, free):
            if eos in f.token_ids:
                cut = f.token_ids.index(eos) + 1
                assert o.stopped == "eos" and o.token_ids == f.token_ids[:cut]
                assert o.num_forward_passes <= f.num_forward_passes
            else:
                assert o.stopped == "length" and o.token_ids == f.token_ids
        assert len(outs[0].token_ids) <= 4


def test_max_steps_forces_the_rest(single_process):
    model = _model()
    outs = _causal(model, PROMPTS, max_new=11, cfg=CausalDecodeConfig(window=2, threshold=2.0, max_steps=3))
    assert all(o.num_forward_passes == 3 and len(o.token_ids) == 11 for o in outs)
    ar = _causal(model, PROMPTS, max_new=11, cfg=CausalDecodeConfig(window=1))
    assert all(o.token_ids[:2] == a.token_ids[:2] for o, a in zip(outs, ar))  # steps 1-2: one token each


def _reference_card(model, prompt, max_new, window, threshold, policy, special=SPECIAL, max_steps=None):
    """CARD's dynamic parallel decoding, greedy, written from CARD.md section 4 without a KV cache:
    every step is one plain causal forward over the whole sequence. Returns (new tokens, forward passes).

    The text is the committed tokens x_0 .. x_{n-1}; the window is positions n .. n+K-1. The
    forward reads x_0 .. x_{n-1} and then, for positions n .. n+K-2, [MASK] (or the token a
    previous step already committed there). The output at input position j predicts position
    j+1, so window position n+k is predicted by the output at n-1+k. Position n is always
    committed, the others when their top-1 probability exceeds the threshold (``prefix``: only
    while every position to their left in the window commits too). Committed tokens stay. The
    leftmost run of committed positions joins the text; decoding stops when that brings an eos
    (kept, the rest dropped) or max_new tokens. The max_steps-th forward commits all it reads.
    """
    banned = _banned()
    text = list(prompt)
    ahead = {}  # position -> token committed beyond the text (policy "any")
    limit = len(prompt) + max_new
    passes = 0
    while True:
        n = len(text)
        forced = max_steps is not None and passes + 1 == max_steps
        width = limit - n if forced else min(window, limit - n)
        inputs = text + [ahead.get(p, special.mask) for p in range(n, n + width - 1)]
        with torch.no_grad():
            logits = model(torch.tensor([inputs]), torch.arange(len(inputs))[None])[:, 0].double()
        passes += 1
        probs = torch.softmax(logits[n - 1 : n - 1 + width].masked_fill(banned, float("-inf")), dim=-1)
        for k in range(width):
            if n + k in ahead:
                continue
            if k == 0 or forced or float(probs[k].max()) > threshold:
                ahead[n + k] = int(probs[k].argmax())
            elif policy == "prefix":
                break
        while len(text) in ahead:
            text.append(ahead.pop(len(text)))
        new = text[len(prompt) :]
        if special.eos in text[n:]:
            return new[: new.index(special.eos) + 1], passes
        if len(text) >= limit:
            return new, passes


@pytest.mark.parametrize("window", [4, 8])
@pytest.mark.parametrize("policy", ["prefix", "any"])
def test_card_parallel_decoding_equals_no_cache_reference(single_process, window, policy):
    """The cached decoder commits the same tokens in the same number of forward passes as the
    no-cache reference, for thresholds below 1, on a ragged batch. The output layer is scaled
    so that confidences exceed tau often: a random model's confidence hardly depends on the
    position, so each scale puts the threshold rule to work for some tau and not others."""
    prompts = PROMPTS + [[3, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
    max_new = 16
    partial = set()  # thresholds at which some sequence committed several tokens in a pass, but not always K
    num_forced = 0  # sequences that max_steps cut short
    for sharpen in (20, 25, 60):
        model = _model(sharpen=sharpen)
        cases = [(tau, SPECIAL, None) for tau in (0.05, 0.3, 0.5, 0.9)]
        free = _causal(
            model, prompts, max_new=max_new, cfg=CausalDecodeConfig(window=window, threshold=0.5, commit_policy=policy)
        )
        eos = SpecialTokenIds(eos=free[0].token_ids[4], mask=SPECIAL.mask, pad=SPECIAL.pad)  # sequence 0 stops early
        cases += [(0.5, eos, None), (0.5, SPECIAL, 3)]
        for tau, special, max_steps in cases:
            cfg = CausalDecodeConfig(window=window, threshold=tau, commit_policy=policy, max_steps=max_steps)
            outs = _causal(model, prompts, max_new=max_new, cfg=cfg, special=special)
            for prompt, out in zip(prompts, outs):
                ref = _reference_card(model, prompt, max_new, window, tau, policy, special, max_steps)
                assert (out.token_ids, out.num_forward_passes) == ref, (sharpen, tau, special, max_steps, prompt)
                assert out.stopped == ("eos" if special.eos in out.token_ids else "length")
                if max_steps is None and len(out.token_ids) > out.num_forward_passes > -(-max_new // window):
                    partial.add(tau)
            if special is eos:
                assert outs[0].stopped == "eos" and len(outs[0].token_ids) <= 5
            if max_steps is not None:
                assert all(
                    o.num_forward_passes <= 3 and (o.stopped == "eos" or len(o.token_ids) == max_new) for o in outs
                )
                num_forced += sum(f.num_forward_passes > 3 for f in free)
            if tau == 0.05:  # almost every position is confident: whole windows
                assert all(o.num_forward_passes == -(-max_new // window) for o in outs)
    assert partial == {0.3, 0.5, 0.9} and num_forced > 0


def test_mdlm_batch_equals_alone_and_caching_is_exact(single_process, monkeypatch):
    from card_megatron.inference import diffusion

    model = _model("full")
    seeds = sampling.sequence_seeds(0, torch.arange(3))
    samp = sampling.SamplingConfig(seed=0)
    with torch.no_grad():
        batch, _ = decode_mdlm(model, PROMPTS, 10, SPECIAL, _banned(), samp, seeds, steps=25)
        alone = [
            decode_mdlm(model, [p], 10, SPECIAL, _banned(), samp, seeds[i : i + 1], steps=25)[0][0]
            for i, p in enumerate(PROMPTS)
        ]
    assert [o.token_ids for o in batch] == [o.token_ids for o in alone]
    assert all(len(o.token_ids) == 10 and SPECIAL.mask not in o.token_ids for o in batch)
    assert all(o.num_forward_passes < 25 for o in batch)  # steps that unmask nothing reuse the last pass
    # without the skip (every step runs the model) the samples are identical
    real = diffusion.ModelCache.forward
    calls = []
    monkeypatch.setattr(diffusion.ModelCache, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    with torch.no_grad():
        out = decode_mdlm(model, PROMPTS[:1], 10, SPECIAL, _banned(), samp, seeds[:1], steps=25)[0][0]
    assert out.token_ids == batch[0].token_ids and len(calls) == out.num_forward_passes


def test_bd3lm_batch_equals_alone(single_process):
    model = _model("block")
    seeds = sampling.sequence_seeds(0, torch.arange(3))
    samp = sampling.SamplingConfig(seed=1, temperature=0.8)
    with torch.no_grad():
        batch, _ = decode_bd3lm(model, PROMPTS, 13, SPECIAL, _banned(), samp, seeds, block_size=4, steps=4)
        alone = [
            decode_bd3lm(model, [p], 13, SPECIAL, _banned(), samp, seeds[i : i + 1], block_size=4, steps=4)[0][0]
            for i, p in enumerate(PROMPTS)
        ]
    assert [o.token_ids for o in batch] == [o.token_ids for o in alone]
    assert [o.num_forward_passes for o in batch] == [o.num_forward_passes for o in alone]
    for prompt, o in zip(PROMPTS, batch):
        assert len(o.token_ids) == 13 and SPECIAL.mask not in o.token_ids
        blocks = -(-(len(prompt) + 13) // 4) - len(prompt) // 4
        assert blocks <= o.num_forward_passes <= 4 * blocks


def test_judge_nll_matches_token_by_token_cache(single_process):
    from card_megatron.inference.cache import ModelCache
    from card_megatron.inference.quality import judge_nll, repetition_rate, unigram_entropy

    model = _model()
    ctx, cont = [[3, 9, 10], [3]], [[20, 21, 22, 23], [30, 31]]
    got = judge_nll(model, ctx, cont, vocab_size=90)
    for (total, count), c, x in zip(got, ctx, cont):
        seq = c + x
        with torch.no_grad(), ModelCache(model, 1, 16) as cache:
            nll = 0.0
            for i in range(len(seq) - 1):
                logits = cache.forward(torch.tensor([[seq[i]]]))[0, 0, :90].double()
                cache.advance(torch.tensor([1]))
                if i >= len(c) - 1:
                    nll -= float(torch.log_softmax(logits, -1)[seq[i + 1]])
        assert count == len(x) and abs(total - nll) < 1e-6 * max(1.0, abs(nll))
    assert repetition_rate([1, 2, 3, 4, 1, 2, 3, 4, 5]) == pytest.approx(1 / 6)
    assert unigram_entropy([7, 7, 8, 8]) == pytest.approx(0.6931471805599453)


# ----------------------------------------------------------------------------- trained checkpoints


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory):
    """A tiny CARD run trained with TP=2 on 2 ranks and the same run with 1 rank (4 steps each)."""
    root = tmp_path_factory.mktemp("gen_runs")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        for key in _DIST_ENV:  # this process's single-rank rendezvous must not leak into the children
            mp.delenv(key, raising=False)
        procs = {}
        for name, nproc, extra in (("tp1", 1, []), ("tp2", 2, ["parallel.tensor_model_parallel_size=2"])):
            out[name] = str(root / name)
            args = training_runs.overrides(
                tiny_corpus, out[name], 4, "train.save_interval=4", "train.eval_interval=100", *extra
            )
            procs[name] = subprocess.Popen(
                training_runs.command(nproc, args),
                cwd=REPO,
                env=training_runs.env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        for name, proc in procs.items():  # both trainings run at once: their start-up costs overlap
            log, _ = proc.communicate(timeout=240)
            assert proc.returncode == 0, f"training {name} failed:\n{log[-5000:]}"
    return out


_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def _child_env():
    return {k: v for k, v in training_runs.env().items() if k not in _DIST_ENV}


def _greedy_ids(loaded, prompts, max_new):
    from card_megatron.inference.generate import GenerationConfig, generate

    gens, _ = generate(loaded, prompts, GenerationConfig(decoding="ar", max_new_tokens=max_new, sampling=GREEDY))
    return [g.prompt_ids for g in gens], [g.token_ids for g in gens]


def test_tp2_checkpoint_generates_like_tp1(single_process, runs):
    """Both layouts train to the same weights (up to float32 noise); greedy tokens agree unless a
    divergence is a near-tie smaller than the numerical difference between the two models."""
    from card_megatron.inference.loading import load_model

    a, b = load_model(runs["tp1"], device="cpu"), load_model(runs["tp2"], device="cpu")
    assert a.config.parallel.tensor_model_parallel_size == 1 and b.config.parallel.tensor_model_parallel_size == 2
    prompts = ["The default value of", "Return the", ""]
    prompt_ids, ta = _greedy_ids(a, prompts, 16)
    _, tb = _greedy_ids(b, prompts, 16)
    banned = sampling.banned_token_mask(a.vocab_size, a.tokenizer)
    for p, x, y in zip(prompt_ids, ta, tb):
        seq = [a.tokenizer.eos_id] + p + x
        with torch.no_grad():
            la = a.model(torch.tensor([seq]), torch.arange(len(seq))[None])[:, 0].double()
            lb = b.model(torch.tensor([seq]), torch.arange(len(seq))[None])[:, 0].double()
        delta = float((la - lb).abs().max())
        assert delta < 1e-3, f"TP=1 and TP=2 checkpoints disagree by {delta}"
        if x != y:
            i = next(k for k in range(len(x)) if x[k] != y[k])
            row = la[len(p) + i].masked_fill(banned, float("-inf"))
            margin = float(row[x[i]] - row[y[i]])
            assert abs(margin) <= 2 * delta, f"greedy tokens differ at {i} with margin {margin} > 2 * {delta}"


def _cli():
    from card_megatron.tools import generate  # what tools/generate.py runs

    return generate


def test_cli_end_to_end(runs, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The default value of"}\n{"text": "Return"}\n')
    out = tmp_path / "out.jsonl"
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "generate.py"),
        "--checkpoint",
        runs["tp2"],
        "--input-file",
        str(prompts),
        "--prompt",
        "A",
        "--max-new-tokens",
        "6",
        "--batch-size",
        "2",
        "--threshold",
        "0.5",
        "--window",
        "3",
        "--judge",
        runs["tp1"],
        "--seed",
        "3",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in lines] == ["A", "The default value of", "Return"]
    for r in lines:
        assert 1 <= len(r["token_ids"]) <= 6 and r["num_forward_passes"] >= 1 and r["judge_nll"] > 0
        # the record rounds tokens_per_forward to 4 decimals: at most 5e-5 from the ratio
        assert r["tokens_per_forward"] == pytest.approx(len(r["token_ids"]) / r["num_forward_passes"], abs=5e-5)
        assert {"text", "seconds", "entropy", "repetition_4gram", "stopped"} <= set(r)
    assert "tokens/s" in proc.stderr and "tokens per forward" in proc.stderr and "judge perplexity" in proc.stderr
    # --output writes the same records (atomically, nothing on stdout); in-process to save a start-up
    assert _cli().main(cmd[2:] + ["--output", str(out)]) == 0
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["token_ids"] for r in again] == [r["token_ids"] for r in lines]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_cli_bad_input(runs, tmp_path, capsys):
    from card_megatron.tokenizers import train_tokenizer

    tool = _cli()
    ckpt = runs["tp1"]

    def fails(*argv, match):
        assert tool.main([*argv, "--max-new-tokens", "4"] if "--max-new-tokens" not in argv else list(argv)) == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err, err

    fails("--checkpoint", str(tmp_path / "missing"), match="checkpoint not found")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(_export(ckpt), corrupt)
    shard = corrupt / "model-tp00-pp000.safetensors"
    shard.write_bytes(b"not a checkpoint".ljust(shard.stat().st_size, b"!"))  # the size the index records
    fails("--checkpoint", str(corrupt), match=f"{shard} is not a card_megatron export shard")
    legacy = tmp_path / "legacy"  # an export of earlier versions: model.pt
    shutil.copytree(_export(ckpt), legacy, ignore=shutil.ignore_patterns("*.safetensors", "model.index.json"))
    (legacy / "model.pt").write_bytes(b"not a checkpoint")
    fails("--checkpoint", str(legacy), match="model.pt is not a card_megatron export")
    fails("--checkpoint", ckpt, "--threshold", "0", match="--threshold")
    fails("--checkpoint", ckpt, "--decoding", "mdlm", match="does not fit this card checkpoint")
    fails("--checkpoint", ckpt, "--prompt", "word " * 40, "--max-new-tokens", "8", match="--max-context")
    fails("--checkpoint", ckpt, "--input-file", str(tmp_path / "nope.txt"), match="does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{oops\n')
    fails("--checkpoint", ckpt, "--input-file", str(bad), match="bad.jsonl:2")
    # a judge with another tokenizer: refused, or re-tokenized on request
    other = tmp_path / "other_tok"
    shutil.copytree(_export(ckpt), other)
    train_tokenizer(["a different tiny corpus of words and more words"] * 50, str(other / "tokenizer.model"), 300)
    fails("--checkpoint", ckpt, "--judge", str(other), match="tokenizer mismatch")
    assert tool.main(["--checkpoint", ckpt, "--judge", str(other), "--judge-retokenize", "--max-new-tokens", "3"]) == 0
    assert "judge perplexity" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        tool.main(["--checkpoint", ckpt, "--decoding", "beam"])
    assert e.value.code == 2


def _export(run_dir):
    from card_megatron.rundir import resolve_export_dir

    return resolve_export_dir(run_dir)


def test_cli_output_is_checked_before_loading(tmp_path, capsys):
    """A directory or an uncreatable --output fails at once, not after loading and generating."""
    tool = _cli()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for output, match in ((tmp_path, "is a directory"), (blocker / "out.jsonl", "cannot be written")):
        # the checkpoint does not exist: the output is reported first, so nothing was loaded
        assert tool.main(["--checkpoint", str(tmp_path / "missing"), "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert f"output {output} {match}" in err and "checkpoint not found" not in err, err
