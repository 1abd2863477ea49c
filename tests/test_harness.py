"""The lm-eval-harness adapter on small local tasks (YAML over JSONL files the test writes)."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.distributed import REPO
from tests.test_export_hf import single_process, write_export  # noqa: F401 (fixture)

lm_eval = pytest.importorskip("lm_eval")

MC = [
    {"question": "The default value of", "choices": ["None", "zero", "the argument"], "label": 0},
    {"question": "Return the", "choices": ["value", "list of items"], "label": 1},
    {"question": "", "choices": ["import", "class"], "label": 1},
]
DOCS = [{"text": "The module defines functions that return values. " * 6}, {"text": "Short text."}]
GEN = [{"question": "def main", "answer": "()"}, {"question": "The value", "answer": " is"}]


def write_tasks(root):
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC))
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (root / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in GEN))
    common = "dataset_path: json\ntest_split: test\n"
    (root / "mc.yaml").write_text(
        f"task: card_local_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n'
    )
    (root / "ppl.yaml").write_text(
        f"task: card_local_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'docs.jsonl'}\n"
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    (root / "gen.yaml").write_text(
        f"task: card_local_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\nmetric_list:\n  - metric: exact_match\n'
    )


def logprob(loaded, context_ids, cont_ids):
    """log p(cont | context) token by token, each from its own forward pass of the whole prefix."""
    total = 0.0
    for i, t in enumerate(cont_ids):
        seq = torch.tensor([context_ids + cont_ids[:i]])
        with torch.no_grad():
            logits = loaded.model(seq, torch.arange(seq.shape[1])[None])[-1, 0].double()
        total += float(torch.log_softmax(logits, -1)[t])
    return total


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    import itertools

    from card_megatron.data.corpus import builtin_documents
    from card_megatron.tokenizers import train_tokenizer

    docs = list(itertools.islice(builtin_documents(), 150))
    return train_tokenizer(docs, str(tmp_path_factory.mktemp("tok") / "tok.model"), vocab_size=500)


@pytest.mark.slow
def test_local_tasks_through_simple_evaluate(single_process, tmp_path, sp_tokenizer, monkeypatch):  # noqa: F811
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from card_megatron.eval.harness import CardMegatronLM
    from card_megatron.inference.causal import CausalDecodeConfig
    from card_megatron.inference.generate import GenerationConfig, generate
    from card_megatron.inference.sampling import SamplingConfig

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_tasks(tmp_path)
    ckpt = write_export(tmp_path / "ckpt", sp_tokenizer, "card", seed=5, seq_length=24)
    lm = CardMegatronLM(checkpoint=ckpt, batch_size=2, threshold=0.5, window=3)
    out = simple_evaluate(
        model=lm,
        tasks=["card_local_mc", "card_local_ppl", "card_local_gen"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
        limit=None,
    )
    tok, loaded = lm.tok, lm.loaded
    eos = tok.eos_id
    # multiple choice: each choice's log-likelihood equals a token-by-token reference
    samples = out["samples"]["card_local_mc"]
    assert len(samples) == len(MC)
    for s in samples:
        doc = s["doc"]
        for choice, (ll, _greedy) in zip(doc["choices"], s["filtered_resps"]):
            choice = " " + choice  # lm-eval's target delimiter
            ctx = [eos] + tok.encode(doc["question"]) if doc["question"] else [eos]
            whole = tok.encode(doc["question"] + choice)
            cont = whole[len(ctx) - 1 :] if doc["question"] else tok.encode(choice)
            # abs 1e-4: one batched fp32 forward against token-by-token forwards (measured up to 6e-7, on
            # log-likelihoods of 8-66 nats); a token scored in the wrong context is off by nats, not 1e-4
            assert float(ll) == pytest.approx(logprob(loaded, ctx, cont), abs=1e-4)
    assert 0.0 <= out["results"]["card_local_mc"]["acc,none"] <= 1.0
    # rolling: the long document spans several windows of seq_length = 24
    ppl = out["samples"]["card_local_ppl"]
    long_doc = DOCS[0]["text"]
    ids = tok.encode(long_doc)
    assert len(ids) > 2 * 24
    # lm-eval's windows: eos then the first 24 tokens; then each next (up to) 24 tokens, read by a
    # 24-token window that ends just before the last of them
    reference = logprob(loaded, [eos], ids[:24])
    pos = 24
    while pos < len(ids):
        n = min(24, len(ids) - pos)
        reference += logprob(loaded, ids[pos + n - 25 : pos], ids[pos : pos + n])
        pos += n
    got = [float(s["filtered_resps"][0]) for s in ppl if s["doc"]["text"] == long_doc][0]
    # abs 1e-4: the same fp32 rounding summed over the windows (measured 5.2e-6 on -1105 nats); a
    # token scored in the wrong window is off by nats (the last-L-tokens check of the long-continuation test: > 1)
    assert got == pytest.approx(reference, abs=1e-4)
    assert out["results"]["card_local_ppl"]["word_perplexity,none"] > 1
    # generation: CARD's parallel decoder, greedy, cut at the first newline
    gen = out["samples"]["card_local_gen"]
    gens, _ = generate(
        loaded,
        [g["question"] for g in GEN],
        GenerationConfig(
            max_new_tokens=6,
            sampling=SamplingConfig(greedy=True),
            causal=CausalDecodeConfig(threshold=0.5, window=3),
        ),
    )
    by_question = {s["doc"]["question"]: s["filtered_resps"][0] for s in gen}
    for g in gens:
        assert by_question[g.prompt] == g.text.split("\n")[0]
    assert "exact_match,none" in out["results"]["card_local_gen"]


def test_mdlm_conditional_bound_and_bd3lm_refusal(single_process, tmp_path, sp_tokenizer):  # noqa: F811
    """MDLM: for a one-token continuation the conditional ELBO's expectation is exactly
    log p(x | context, [MASK]); the Monte-Carlo estimate over 4000 noise levels comes close.
    Longer continuations: a lower bound, deterministic for a seed. BD3LM: refused."""
    from lm_eval.api.instance import Instance

    from card_megatron.eval.harness import CardMegatronLM

    lm = CardMegatronLM(
        checkpoint=write_export(tmp_path / "mdlm", sp_tokenizer, "mdlm", seed=2), mc_samples=4000, batch_size=500
    )
    tok = lm.tok
    context = [tok.eos_id] + tok.encode("The default value of")
    x = torch.tensor([context + [tok.mask_id]])
    with torch.no_grad():
        logits = lm.loaded.model(x, torch.arange(x.shape[1])[None])[-1, 0].double()
    logits[tok.mask_id] = float("-inf")
    for target in (int(logits.argmax()), 100):  # the most likely token, and another
        exact = float(torch.log_softmax(logits, -1)[target])
        bound, greedy = lm._loglikelihood_tokens([(None, context, [target])])[0]
        # rel 0.1: a Monte-Carlo mean over 4000 noise levels, deterministic for the seed (measured 4.1 %
        # off for both targets); a missing 1/t weight or a wrong mask count is off by a factor, not by 10 %
        assert bound == pytest.approx(exact, rel=0.1), (bound, exact)
        assert greedy == (int(logits.argmax()) == target)
    lm.mc_samples = 64
    two = lm.loglikelihood(
        [Instance(request_type="loglikelihood", doc={}, arguments=("The default", " value of"), idx=0)]
    )
    assert two == lm.loglikelihood(
        [Instance(request_type="loglikelihood", doc={}, arguments=("The default", " value of"), idx=0)]
    )
    assert two[0][0] < 0
    bd3 = CardMegatronLM(checkpoint=write_export(tmp_path / "bd3lm", sp_tokenizer, "bd3lm"))
    req = Instance(request_type="loglikelihood", doc={}, arguments=("a", " b"), idx=0)
    with pytest.raises(NotImplementedError, match="bd3lm checkpoint has block-wise attention"):
        bd3.loglikelihood([req])


def test_model_args_checked_one_line_each(single_process, tmp_path, sp_tokenizer):  # noqa: F811
    """Misspelled keys are refused with the valid ones (issue 21: treshold=0.5,decodng=ar ran with the
    defaults); bad values and a missing checkpoint give one line each, before anything is loaded."""
    from card_megatron.eval.harness import (
        MODEL_ARGS,
        CardMegatronLM,
        ModelArgsError,
        check_model_arg_dict,
        check_model_args,
    )

    with pytest.raises(ModelArgsError) as e:
        CardMegatronLM(checkpoint=str(tmp_path / "nope"), treshold=0.5, decodng="ar", window=-1, batch_size="2")
    lines = str(e.value).splitlines()
    assert lines == [
        f"unknown model arg decodng=ar (did you mean decoding?); valid ones: {', '.join(MODEL_ARGS)}",
        f"unknown model arg treshold=0.5 (did you mean threshold?); valid ones: {', '.join(MODEL_ARGS)}",
        "model arg window=-1 must be an integer >= 1",
    ]
    with pytest.raises(ModelArgsError) as e:
        check_model_args(decoding="fast", threshold="abc", window=2.5, mc_samples=0, seed="x", ema="maybe")
    assert str(e.value).splitlines() == [
        "model arg decoding=fast is not one of card, ar, mdlm, bd3lm",
        "model arg threshold=abc must be a number > 0 (tau; > 1 means one token per step)",
        "model arg window=2.5 must be an integer >= 1",
        "model arg mc_samples=0 must be an integer >= 1",
        "model arg seed=x must be an integer >= 0",
        "model arg ema=maybe must be true or false",
    ]
    parsed = check_model_args(threshold="0.5", window="3", batch_size="auto", ema="true")
    assert (parsed["threshold"], parsed["window"], parsed["batch_size"], parsed["ema"]) == (0.5, 3, 8, True)
    with pytest.raises(ModelArgsError, match=rf"^model arg checkpoint={tmp_path / 'nope'}: checkpoint not found"):
        CardMegatronLM(checkpoint=str(tmp_path / "nope"), max_batch_size=64)  # lm-eval's own keys are fine
    with pytest.raises(ModelArgsError) as e:  # what tools/run_lm_eval.py checks before lm-eval loads its tasks
        check_model_arg_dict({"window": 0, "batch_size": 4})
    assert str(e.value).splitlines() == [
        "model arg window=0 must be an integer >= 1",
        "model arg checkpoint is missing (checkpoint=a run directory, a checkpoint or an export)",
    ]
    ckpt = write_export(tmp_path / "arm", sp_tokenizer, "arm", seed=1)
    check_model_arg_dict({"checkpoint": ckpt, "decoding": "ar", "threshold": 0.5})
    with pytest.raises(ModelArgsError, match=r"^model arg decoding=card: --decoding card does not fit this arm"):
        CardMegatronLM(checkpoint=ckpt, decoding="card")
    lm = CardMegatronLM(checkpoint=ckpt, decoding="ar", threshold=0.7, window=2, batch_size=3)
    assert (lm.causal.threshold, lm.causal.window, lm.batch_size) == (0.7, 2, 3)


@pytest.mark.slow
def test_cli_refuses_bad_model_args_without_traceback(tmp_path):
    """The real command line: refused before lm-eval indexes its tasks, one line per problem, rc 1."""
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "run_lm_eval.py"),
            "--model",
            "card_megatron",
            "--model_args",
            f"checkpoint={tmp_path / 'nope'},treshold=0.5,threshold=abc",
            "--tasks",
            "card_local_mc",
            "--include_path",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "error: unknown model arg treshold=0.5 (did you mean threshold?)" in r.stderr
    assert "error: model arg threshold=abc must be a number > 0" in r.stderr
    assert f"error: model arg checkpoint={tmp_path / 'nope'}: checkpoint not found" in r.stderr


@pytest.mark.slow
def test_cli_runs_a_local_task(single_process, tmp_path, sp_tokenizer):  # noqa: F811
    """`tools/run_lm_eval.py --model card_megatron` is lm-eval's own command line with our model registered."""
    write_tasks(tmp_path)
    ckpt = write_export(tmp_path / "ckpt", sp_tokenizer, "arm", seed=6, seq_length=24)
    env = {**os.environ, "PYTHONPATH": REPO, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "run_lm_eval.py"),
            "--model",
            "card_megatron",
            "--model_args",
            f"checkpoint={ckpt}",
            "--batch_size",
            "2",
            "--tasks",
            "card_local_mc",
            "--include_path",
            str(tmp_path),
            "--output_path",
            str(tmp_path / "results"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "card_local_mc" in r.stdout and "acc" in r.stdout
    found = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "results") for f in fs if f.endswith(".json")]
    assert found and json.load(open(found[0]))["results"]["card_local_mc"]["acc,none"] >= 0


def test_generate_until_keeps_a_long_prompt_at_seq_length_128(
    single_process,  # noqa: F811
    tmp_path,
    sp_tokenizer,
    monkeypatch,
    caplog,
):
    """At L = 128 and the default max_gen_toks (256) the decoder used to get an empty prompt. Now a
    prompt longer than L/2 keeps its last tokens (at least L/2 of them), the generation is shortened
    to what fits, both are warned about, and what reaches the decoder passes its length check."""
    from lm_eval.api.instance import Instance

    import card_megatron.inference.generate as gen_mod
    from card_megatron.eval.harness import CardMegatronLM
    from card_megatron.inference.generate import check_lengths, encode_prompts

    lm = CardMegatronLM(checkpoint=write_export(tmp_path / "card", sp_tokenizer, "card", seq_length=128))
    tok = lm.tok
    prompt = " ".join(f"value{i} = compute(x{i})" for i in range(12))
    ids = tok.encode(prompt)
    assert len(ids) > 100  # longer than L / 2 = 64
    seen = {}

    def fake_generate(loaded, prompts, cfg):
        seen["prompts"], seen["max_new"] = list(prompts), cfg.max_new_tokens
        return [gen_mod.Generation(0, p, [], [], "out", "length", 1, 0.0) for p in prompts], {}

    monkeypatch.setattr(gen_mod, "generate", fake_generate)
    req = Instance(request_type="generate_until", doc={}, arguments=(prompt, {"until": ["\n"]}), idx=0)
    with caplog.at_level("WARNING", logger="card_megatron.eval.harness"):
        assert lm.generate_until([req]) == ["out"]
    assert seen["max_new"] == 128 - 1 - 64
    kept = tok.encode(seen["prompts"][0])
    # the prompt's end, up to L/2 tokens (re-encoding the cut text may take a token more: one fewer is kept)
    assert 60 <= len(kept) <= 64 and prompt.endswith(seen["prompts"][0].lstrip())
    check_lengths(encode_prompts(tok, seen["prompts"]), seen["max_new"], 128)  # fits: no ValueError
    text = caplog.text
    assert "max_gen_toks 256 shortened to 63" in text
    assert re.search(rf"a {len(ids)}-token prompt was cut from the left to its last 6[0-4] tokens", text)
    # a short prompt is kept whole and silent, with every requested new token that fits
    caplog.clear()
    short = Instance(request_type="generate_until", doc={}, arguments=("def main", {"max_gen_toks": 20}), idx=1)
    with caplog.at_level("WARNING", logger="card_megatron.eval.harness"):
        lm.generate_until([short])
    assert seen["prompts"] == ["def main"] and seen["max_new"] == 20 and "generate_until" not in caplog.text


def test_loglikelihood_of_a_continuation_longer_than_seq_length(single_process, tmp_path, sp_tokenizer):  # noqa: F811
    """A continuation longer than L is scored whole with rolling windows (each chunk of L tokens read
    by the L inputs ending before its last token), not cut to its last L tokens; MDLM refuses it."""
    from card_megatron.eval.harness import CardMegatronLM

    L = 24
    lm = CardMegatronLM(checkpoint=write_export(tmp_path / "arm", sp_tokenizer, "arm", seed=3, seq_length=L))
    tok = lm.tok
    context = [tok.eos_id] + tok.encode("The module defines")
    cont = tok.encode(" functions that return values and classes that hold them. " * 3)
    assert len(cont) > 2 * L
    whole = context + cont
    reference, a = 0.0, len(context)
    while a < len(whole):
        b = min(a + L, len(whole))
        reference += logprob(lm.loaded, whole[max(0, b - 1 - L) : a], whole[a:b])
        a = b
    got, _ = lm._loglikelihood_tokens([(None, context, cont)])[0]
    assert got == pytest.approx(reference, abs=1e-4)  # fp32 batched vs token by token: measured 4.5e-6 on -557 nats
    last_only = logprob(lm.loaded, whole[-L - 1 : -L], cont[-L:])
    assert abs(got - last_only) > 1.0  # the old behaviour scored only the last L tokens
    mdlm = CardMegatronLM(checkpoint=write_export(tmp_path / "mdlm", sp_tokenizer, "mdlm", seq_length=L))
    with pytest.raises(ValueError, match=r"continuation is \d+ tokens, longer than this MDLM checkpoint's"):
        mdlm._loglikelihood_tokens([(None, context, cont)])
