"""tools/export_hf.py: causal checkpoints as transformers Llama models, checked against our model.

Logits are compared with atol 1e-4 on values of about 5: one fp32 forward pass through two implementations
of the same function. Measured gap: 0 (the same kernels on the same shapes); 1e-4 leaves room for other
kernels (SDPA against eager attention) while a wrong permutation of Q/K rows or a missing norm moves logits
by more than 1e-1.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from card_megatron.config import Config, ModelConfig, ObjectiveConfig, save_config
from card_megatron.tokenizers import train_tokenizer
from tests.distributed import REPO

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def single_process():
    from card_megatron.parallel.state import init_single_process

    init_single_process()


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    import itertools

    from card_megatron.data.corpus import builtin_documents

    docs = list(itertools.islice(builtin_documents(), 150))
    return train_tokenizer(docs, str(tmp_path_factory.mktemp("tok") / "tok.model"), vocab_size=500)


def write_export(root, tokenizer, objective="card", seed=0, **model_kw):
    """A consolidated export (what training writes: config.yaml, model.pt, tokenizer.model) of a
    randomly initialised model, with weights scaled up so that logits are far from uniform."""
    from card_megatron.model.gpt import CardGPT, padded_vocab_size
    from card_megatron.objectives import build_objective

    mcfg = ModelConfig(
        **{
            **dict(
                num_layers=2,
                hidden_size=64,
                num_attention_heads=4,
                ffn_hidden_size=96,
                seq_length=48,
                make_vocab_size_divisible_by=64,
            ),
            **model_kw,
        }
    )
    cfg = Config(model=mcfg, objective=ObjectiveConfig(name=objective))
    kind = build_objective(cfg.objective, mcfg.seq_length, tokenizer.mask_id, tokenizer.vocab_size).mask_kind
    model = CardGPT(mcfg, kind, padded_vocab_size(tokenizer.vocab_size, 64, 1), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
            else:  # norm weights: not all ones, so a swapped norm would show
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
    os.makedirs(root)
    save_config(cfg, str(root / "config.yaml"))
    torch.save({"state_dict": dict(model.state_dict()), "step": 7}, root / "model.pt")
    with open(tokenizer.source, "rb") as src, open(root / "tokenizer.model", "wb") as dst:
        dst.write(src.read())
    return str(root)


def batch_logits(loaded, seqs):
    """Our logits [B, S, V] for equal-length sequences (positions from 0)."""
    ids = torch.tensor(seqs)
    with torch.no_grad():
        return loaded.model(ids, torch.arange(ids.shape[1]).expand_as(ids)).transpose(0, 1).double()


def check_tokenizer(hf_dir, tokenizer):
    """The exported tokenizer, loaded by AutoTokenizer, encodes like ours and knows the reserved ids."""
    import itertools

    from transformers import AutoTokenizer

    from card_megatron.data.corpus import builtin_documents

    auto = AutoTokenizer.from_pretrained(str(hf_dir))
    texts = [d[:400] for d in itertools.islice(builtin_documents(), 300, 320)]
    assert [auto.encode(t, add_special_tokens=False) for t in texts] == [tokenizer.encode(t) for t in texts]
    assert (auto.eos_token_id, auto.pad_token_id, auto.mask_token_id) == (
        tokenizer.eos_id,
        tokenizer.pad_id,
        tokenizer.mask_id,
    )


def export(ckpt, out):
    from card_megatron.interop.hf_export import export_llama

    return export_llama(ckpt, str(out))


@pytest.mark.parametrize(
    "objective,model_kw",
    [
        ("card", {}),
        ("arm", {"num_query_groups": 2}),  # grouped-query attention
        ("card", {"untie_embeddings_and_output_weights": False, "num_layers": 3}),  # tied output layer
    ],
)
def test_exported_logits_and_greedy_decoding_match(single_process, tmp_path, sp_tokenizer, objective, model_kw):
    from transformers import AutoModelForCausalLM

    from card_megatron.inference.generate import GenerationConfig, generate
    from card_megatron.inference.loading import load_model
    from card_megatron.inference.sampling import SamplingConfig

    ckpt = write_export(tmp_path / "ckpt", sp_tokenizer, objective, **model_kw)
    record = export(ckpt, tmp_path / "hf")
    assert record["objective"] == objective and record["step"] == 7
    written = set(os.listdir(tmp_path / "hf"))
    assert {"config.json", "model.safetensors", "card_megatron.json", "tokenizer.model"} <= written
    ours = load_model(ckpt, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    gen = torch.Generator().manual_seed(1)
    seqs = torch.randint(0, sp_tokenizer.vocab_size, (3, 40), generator=gen)
    seqs[:, 0] = sp_tokenizer.eos_id
    with torch.no_grad():
        theirs = hf(input_ids=seqs).logits.double()
    mine = batch_logits(ours, seqs.tolist())
    assert theirs.shape == mine.shape and mine.std() > 0.5  # logits far from uniform: the check has teeth
    assert torch.allclose(theirs, mine, atol=1e-4, rtol=0), float((theirs - mine).abs().max())
    check_tokenizer(tmp_path / "hf", ours.tokenizer)
    # greedy generation in transformers == our AR decoding, from our prompt_token_ids (eos first)
    prompts = ["def main", "The default value of", ""]
    gens, _ = generate(
        ours, prompts, GenerationConfig(decoding="ar", max_new_tokens=12, sampling=SamplingConfig(temperature=0.0))
    )
    banned = [
        ours.tokenizer.mask_id,
        ours.tokenizer.pad_id,
        ours.tokenizer.bos_id,
        *range(ours.tokenizer.vocab_size, ours.vocab_size),
    ]
    for g in gens:
        assert g.prompt_token_ids[0] == sp_tokenizer.eos_id and g.prompt_token_ids[1:] == g.prompt_ids
        out = hf.generate(
            torch.tensor([g.prompt_token_ids]),
            attention_mask=torch.ones(1, len(g.prompt_token_ids), dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=sp_tokenizer.eos_id,
            pad_token_id=sp_tokenizer.pad_id,
            suppress_tokens=banned,
        )
        new = out[0, len(g.prompt_token_ids) :].tolist()
        assert new == g.token_ids, (g.prompt, new, g.token_ids)


@pytest.mark.slow
def test_anchor_generate_on_a_ragged_batch_equals_ours(single_process, tmp_path, sp_tokenizer):
    """The benchmark's anchor (interop/anchor.py): transformers' generate on the export, left padded
    in one batch, gives our AR tokens, and verify mode gives them too; random_export loads back."""
    from card_megatron.inference.causal import CausalDecodeConfig
    from card_megatron.inference.generate import GenerationConfig, generate
    from card_megatron.inference.loading import load_model
    from card_megatron.inference.sampling import SamplingConfig
    from card_megatron.interop.anchor import hf_generate, hf_model, random_export

    ckpt = write_export(tmp_path / "ckpt", sp_tokenizer, num_query_groups=2)
    ours = load_model(ckpt, device="cpu")
    hf = hf_model(ckpt, str(tmp_path / "hf"), torch.device("cpu"), torch.float32)
    tok = ours.tokenizer
    banned = [tok.mask_id, tok.pad_id, tok.bos_id, *range(tok.vocab_size, ours.vocab_size)]
    prompts = ["def main", "The default value of the argument", ""]
    greedy = SamplingConfig(greedy=True)
    for causal in (CausalDecodeConfig(window=1), CausalDecodeConfig(window=5, commit_policy="verify")):
        gens, _ = generate(
            ours, prompts, GenerationConfig(decoding="card", max_new_tokens=10, sampling=greedy, causal=causal)
        )
        theirs, seconds = hf_generate(
            hf, [g.prompt_token_ids for g in gens], 10, 3, tok.eos_id, tok.pad_id, suppress=banned
        )
        assert theirs == [g.token_ids for g in gens] and seconds > 0
    rand = load_model(random_export(ckpt, str(tmp_path / "rand"), {"hidden_size": 32}, 640), device="cpu")
    assert rand.config.model.hidden_size == 32 and rand.vocab_size == 640


def test_refusals_and_nothing_left_behind(single_process, tmp_path, sp_tokenizer):
    from card_megatron.interop.hf_export import export_llama

    for objective in ("mdlm", "bd3lm"):
        ckpt = write_export(tmp_path / objective, sp_tokenizer, objective)
        with pytest.raises(ValueError, match=f"objective '{objective}', whose attention is bidirectional"):
            export_llama(ckpt, str(tmp_path / f"hf_{objective}"))
    card = write_export(tmp_path / "card", sp_tokenizer, "card")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken already exists"):
        export_llama(card, str(tmp_path / "taken"))
    assert os.listdir(tmp_path / "taken") == []
    # the CLI: clear errors, no traceback, no partial directory
    tool = [sys.executable, os.path.join(REPO, "tools", "export_hf.py")]
    env = {**os.environ, "PYTHONPATH": REPO}
    for args, message in (
        ([tmp_path / "mdlm", tmp_path / "x"], "bidirectional"),
        ([card, tmp_path / "taken"], "already exists"),
        ([tmp_path / "missing", tmp_path / "y"], "checkpoint not found"),
    ):
        r = subprocess.run(
            [*tool, "--checkpoint", str(args[0]), "--output", str(args[1])],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["bd3lm", "card", "mdlm", "taken"]


@pytest.mark.slow
def test_tokenizer_json_end_to_end(single_process, tmp_path):
    """A BPE tokenizer.json trained by the tokenizers library: preprocess with it, train CARD on
    2 ranks with tensor parallelism, generate with tools/generate.py, export to transformers
    and replay a generated record's prompt_token_ids there."""
    import itertools

    from transformers import AutoModelForCausalLM

    from card_megatron.data.corpus import builtin_documents
    from card_megatron.inference.loading import load_model
    from tests import training_runs
    from tests.test_hf_tokenizer import train_bpe

    bpe = train_bpe(list(itertools.islice(builtin_documents(), 300)), tmp_path / "tokenizer.json", vocab_size=800)
    env = {**os.environ, "PYTHONPATH": REPO}
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "preprocess_data.py"),
            "--input",
            "builtin:python-docs",
            "--tokenizer-type",
            "HuggingFaceTokenizer",
            "--tokenizer-model",
            bpe,
            "--output-prefix",
            str(tmp_path / "docs"),
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    run_dir = str(tmp_path / "run")
    args = training_runs.overrides(
        (str(tmp_path / "docs_text_document"), bpe),
        run_dir,
        4,
        "train.save_interval=4",
        "train.eval_interval=100",
        "parallel.tensor_model_parallel_size=2",
    )
    with pytest.MonkeyPatch.context() as mp:
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            mp.delenv(key, raising=False)
        training_runs.train(2, args, timeout=300)
        gen = subprocess.run(
            [
                sys.executable,
                os.path.join(REPO, "tools", "generate.py"),
                "--checkpoint",
                run_dir,
                "--prompt",
                "The default value of",
                "--decoding",
                "ar",
                "--greedy",
                "--max-new-tokens",
                "8",
            ],
            capture_output=True,
            text=True,
            env=training_runs.env(),
            timeout=180,
        )
    assert gen.returncode == 0, gen.stderr[-3000:]
    record = json.loads(gen.stdout.splitlines()[0])
    loaded = load_model(run_dir, device="cpu")
    tok = loaded.tokenizer
    assert (
        type(tok).__name__ == "HuggingFaceTokenizer"
        and tok.sha256 == __import__("hashlib").sha256(open(bpe, "rb").read()).hexdigest()
    )
    assert record["prompt_token_ids"] == [tok.eos_id] + tok.encode("The default value of")
    assert record["text"] == tok.decode(record["token_ids"])
    export(run_dir, tmp_path / "hf")
    check_tokenizer(tmp_path / "hf", tok)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    seq = record["prompt_token_ids"] + record["token_ids"]
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor([seq])).logits.double()
    assert torch.allclose(theirs, batch_logits(loaded, [seq]), atol=1e-4, rtol=0)
    banned = [tok.mask_id, tok.pad_id, tok.bos_id, *range(tok.vocab_size, loaded.vocab_size)]
    out = hf.generate(
        torch.tensor([record["prompt_token_ids"]]),
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        suppress_tokens=banned,
        attention_mask=torch.ones(1, len(record["prompt_token_ids"]), dtype=torch.long),
    )
    assert out[0, len(record["prompt_token_ids"]) :].tolist() == record["token_ids"]
