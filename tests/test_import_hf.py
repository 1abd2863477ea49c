"""tools/import_hf.py: Hugging Face Llama checkpoints (safetensors, GGUF) as card_megatron exports,
checked against transformers running the same checkpoint.

Tolerances: logits within atol 1e-4 on values of about 5, as in tests/test_export_hf.py (one fp32 pass
through two implementations; measured gap 0 at TP=1). The mean-row check (atol 1e-6 on rows of about
0.02) measured 0.
"""

import itertools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.distributed import REPO, run_torchrun

pytest.importorskip("transformers")
pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def single_process():
    from card_megatron.parallel.state import init_single_process

    init_single_process()


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    from card_megatron.data.corpus import builtin_documents
    from tests.test_hf_tokenizer import train_bpe

    docs = list(itertools.islice(builtin_documents(), 150))
    return train_bpe(docs, tmp_path_factory.mktemp("tok") / "tokenizer.json", vocab_size=300)


def llama_dir(root, tokenizer_json, seed=0, extra_vocab=0, **kw):
    """A randomly initialised LlamaForCausalLM saved with save_pretrained (weights scaled so that
    logits are far from uniform, norms not all ones), with ``tokenizer_json`` beside it."""
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = RustTokenizer.from_file(tokenizer_json).get_vocab_size(with_added_tokens=True) + extra_vocab
    config = LlamaConfig(
        **{
            **dict(
                vocab_size=vocab,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
                rms_norm_eps=1e-6,
                rope_theta=50000.0,
                tie_word_embeddings=True,
            ),
            **kw,
        }
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
            else:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(root), safe_serialization=True)
    shutil.copy(tokenizer_json, os.path.join(root, "tokenizer.json"))
    return str(root), model


def our_logits(model, ids):
    """[B, S, V] logits of a single-process CardGPT for ids [B, S] (positions from 0)."""
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).expand_as(ids)).transpose(0, 1).double()


VARIANTS = [
    pytest.param(dict(num_key_value_heads=2, tie_word_embeddings=True), id="gqa-tied"),
    pytest.param(
        dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=123457.0, rms_norm_eps=3e-5),
        id="mha-untied",
    ),
]


@pytest.mark.parametrize("kw", VARIANTS)
def test_imported_logits_and_greedy_decoding_equal_transformers(single_process, tmp_path, bpe, kw):
    from card_megatron.inference.generate import GenerationConfig, generate
    from card_megatron.inference.loading import load_model
    from card_megatron.inference.sampling import SamplingConfig
    from card_megatron.interop.hf_import import import_hf

    src, hf = llama_dir(tmp_path / "hf", bpe, **kw)
    record = import_hf(src, str(tmp_path / "imported"))
    assert sorted(os.listdir(tmp_path)) == ["hf", "imported"]  # no temporary directory left
    loaded = load_model(str(tmp_path / "imported"), device="cpu")
    tok = loaded.tokenizer
    m = loaded.config.model
    assert (m.rotary_base, m.norm_epsilon) == (int(hf.config.rope_parameters["rope_theta"]), hf.config.rms_norm_eps)
    assert m.untie_embeddings_and_output_weights == (not kw["tie_word_embeddings"])
    assert loaded.vocab_size % 128 == 0 and loaded.vocab_size == record["vocab_rows"]
    assert record["sha256"]["model.safetensors"] and record["dequantization"] is None
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (3, 40), generator=gen)
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits.double()
    mine = our_logits(loaded.model, ids)
    V = hf.config.vocab_size
    assert theirs.std() > 0.5  # far from uniform: the comparison has teeth
    assert torch.allclose(mine[..., :V], theirs, atol=1e-4, rtol=0), float((mine[..., :V] - theirs).abs().max())
    # the new rows (mask, bos, pad, padding) are the mean of the tokenizer's rows
    emb = loaded.model.embedding.embedding.word_embeddings.weight
    mean = hf.model.embed_tokens.weight[: tok.num_pieces].mean(0)
    assert torch.allclose(emb[tok.mask_id], mean, atol=1e-6) and torch.allclose(emb[-1], mean, atol=1e-6)
    # greedy AR decoding equals transformers' generate, token for token
    gens, _ = generate(
        loaded,
        ["def main(", "import os", ""],
        GenerationConfig(decoding="ar", max_new_tokens=10, sampling=SamplingConfig(temperature=0.0)),
    )
    for g in gens:
        out = hf.generate(
            torch.tensor([g.prompt_token_ids]),
            attention_mask=torch.ones(1, len(g.prompt_token_ids), dtype=torch.long),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.eos_id,
        )
        assert out[0, len(g.prompt_token_ids) :].tolist() == g.token_ids, g.prompt


@pytest.mark.slow
def test_tensor_parallel_logits_equal_transformers(tmp_path, bpe):
    """The imported weights loaded under TP=2 (vocabulary and heads sharded) give transformers' logits."""
    src, hf = llama_dir(tmp_path / "hf", bpe, seed=3, num_key_value_heads=2)
    from card_megatron.interop.hf_import import import_hf

    import_hf(src, str(tmp_path / "imported"))
    ids = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    torch.save(ids, tmp_path / "ids.pt")
    out = tmp_path / "logits.pt"
    worker = os.path.join(REPO, "tests", "workers", "import_logits.py")
    run_torchrun([worker, str(tmp_path / "imported"), str(tmp_path / "ids.pt"), str(out)], nproc=2, timeout=240)
    mine = torch.load(out)
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits.double()
    V = hf.config.vocab_size
    assert torch.allclose(mine[..., :V].double(), theirs, atol=1e-4, rtol=0)


def test_round_trip_through_export_reproduces_weights_and_tokenizer(single_process, tmp_path, bpe):
    """export_hf(import_hf(x)) holds every weight of x exactly (the appended rows aside) and
    tokenizes like x's tokenizer.json; a sharded bf16 checkpoint imports the same as its fp32 source."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from card_megatron.interop.hf_export import export_llama
    from card_megatron.interop.hf_import import import_hf

    src, hf = llama_dir(tmp_path / "hf", bpe, seed=5, tie_word_embeddings=False, extra_vocab=9)
    import_hf(src, str(tmp_path / "imported"))
    export_llama(str(tmp_path / "imported"), str(tmp_path / "back"))
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    orig = {k: v for k, v in hf.state_dict().items()}
    assert set(back) == set(orig)
    V = hf.config.vocab_size
    from tokenizers import Tokenizer as RustTokenizer

    n = RustTokenizer.from_file(bpe).get_vocab_size(with_added_tokens=True)
    for k, v in orig.items():
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            # rows of the source vocabulary; the appended reserved ids (n, n+1, n+2 lie in the 9
            # unused rows of this checkpoint) are the mean rows
            keep = [i for i in range(V) if not n <= i < n + 3]
            assert torch.equal(back[k][keep], v[keep]), k
        else:
            assert torch.equal(back[k], v), k
    text = "def main(argv):\n    return os.path.join(argv[0], 'x')  # a comment\n"
    theirs = PreTrainedTokenizerFast(tokenizer_file=bpe).encode(text, add_special_tokens=False)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "back")).encode(text, add_special_tokens=False) == theirs
    # sharded safetensors (an index and two files) in bf16: the same import as the bf16-rounded model
    hf.to(torch.bfloat16).save_pretrained(str(tmp_path / "sharded"), max_shard_size="60KB")
    shutil.copy(bpe, tmp_path / "sharded" / "tokenizer.json")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    record = import_hf(str(tmp_path / "sharded"), str(tmp_path / "imported-bf16"))
    assert len([f for f in record["sha256"] if f.endswith(".safetensors")]) >= 2
    a = torch.load(tmp_path / "imported-bf16" / "model.pt")["state_dict"]
    b = torch.load(tmp_path / "imported" / "model.pt")["state_dict"]
    for k in a:  # bf16 values widened exactly; the new rows are means of the bf16 rows, compared above
        rows = slice(0, n) if k.endswith("word_embeddings.weight") or k.endswith("output_layer.weight") else slice(None)
        assert a[k].dtype == torch.float32 and torch.equal(a[k][rows], b[k][rows].to(torch.bfloat16).float()), k


def test_preprocessing_with_the_imported_tokenizer_gives_the_models_ids(tmp_path, bpe):
    from card_megatron.data.dataset import open_shard
    from card_megatron.interop.hf_import import import_hf
    from card_megatron.tokenizers import load_tokenizer

    src, _ = llama_dir(tmp_path / "hf", bpe)
    import_hf(src, str(tmp_path / "imported"))
    docs = tmp_path / "docs.jsonl"
    texts = ["def f(x):\n    return x + 1\n", "import sys\nprint(sys.argv)\n"]
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "preprocess_data.py"),
            "--input",
            str(docs),
            "--tokenizer-model",
            str(tmp_path / "imported" / "tokenizer.json"),
            "--output-prefix",
            str(tmp_path / "d"),
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    from tokenizers import Tokenizer as RustTokenizer

    rust = RustTokenizer.from_file(bpe)
    eos = load_tokenizer(str(tmp_path / "imported" / "tokenizer.model")).eos_id
    expected = [i for t in texts for i in rust.encode(t, add_special_tokens=False).ids + [eos]]
    assert open_shard(str(tmp_path / "d_text_document")).tokens[:].tolist() == expected


def write_gguf(path, hf, tokenizer_json, quantize=()):
    """``hf`` (a LlamaForCausalLM) as a llama.cpp GGUF file written with the gguf package: Q and K
    permuted as llama.cpp's converter does, the tensors named in ``quantize`` stored as Q8_0, the
    byte-level BPE tokenizer as tokens, types and merges."""
    import gguf
    import numpy as np

    cfg = hf.config
    tj = json.load(open(tokenizer_json))
    added = {t["content"]: t["id"] for t in tj["added_tokens"]}
    tokens = [None] * cfg.vocab_size
    for text, i in {**tj["model"]["vocab"], **added}.items():
        tokens[i] = text
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in added else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_eos_token_id(added["<|endoftext|>"])
    w.add_bos_token_id(added["<|endoftext|>"])

    def permute(x, heads):  # llama.cpp's convert_hf_to_gguf.py (interleaved RoPE pairs)
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    names = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        names["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        names[b + "attn_q.weight"] = permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads)
        names[b + "attn_k.weight"] = permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads)
        for ours, theirs in (
            ("attn_v", "self_attn.v_proj"),
            ("attn_output", "self_attn.o_proj"),
            ("attn_norm", "input_layernorm"),
            ("ffn_norm", "post_attention_layernorm"),
            ("ffn_gate", "mlp.gate_proj"),
            ("ffn_up", "mlp.up_proj"),
            ("ffn_down", "mlp.down_proj"),
        ):
            names[f"{b}{ours}.weight"] = sd[f"{p}{theirs}.weight"]
    for name, array in names.items():
        if name in quantize:
            q = gguf.quants.quantize(np.ascontiguousarray(array), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_gguf_import_equals_transformers_on_the_same_file(single_process, tmp_path, bpe):
    """A GGUF file written here (Q/K permuted as llama.cpp does, two tensors in Q8_0): our logits equal
    transformers' on the same file, the unquantized tensors equal the source model's, and the
    tokenizer transformers reconstructs from the file encodes like the original tokenizer.json."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import AutoModelForCausalLM

    from card_megatron.inference.loading import load_model
    from card_megatron.interop.hf_import import import_hf

    _, hf = llama_dir(tmp_path / "hf", bpe, seed=6, num_key_value_heads=2, tie_word_embeddings=False)
    gguf_dir = tmp_path / "g"
    gguf_dir.mkdir()
    quantized = ("blk.0.ffn_up.weight", "blk.1.attn_q.weight")
    path = write_gguf(gguf_dir / "tiny.gguf", hf, bpe, quantize=quantized)
    record = import_hf(path, str(tmp_path / "imported"))
    assert record["format"] == "gguf" and record["dequantization"]["tensor_types"] == {"F32": 19, "Q8_0": 2}
    assert record["architectures"] == ["LlamaForCausalLM"] and list(record["sha256"]) == ["tiny.gguf"]
    loaded = load_model(str(tmp_path / "imported"), device="cpu")
    theirs_model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file="tiny.gguf", dtype=torch.float32)
    ids = torch.randint(0, hf.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = theirs_model(input_ids=ids).logits.double()
    mine = our_logits(loaded.model, ids)[..., : hf.config.vocab_size]
    assert theirs.std() > 0.5 and torch.allclose(mine, theirs, atol=1e-4, rtol=0), float((mine - theirs).abs().max())
    state = torch.load(tmp_path / "imported" / "model.pt")["state_dict"]
    q = hf.model.layers[0].self_attn.q_proj.weight  # unquantized, un-permuted back: equal to the source
    assert torch.equal(
        state["layers.0.layer.self_attention.linear_qkv.weight"][: q.shape[0] // 2], q[: q.shape[0] // 2]
    )
    fc1 = state["layers.1.layer.mlp.linear_fc1.weight"]
    assert torch.equal(fc1, torch.cat([hf.model.layers[1].mlp.gate_proj.weight, hf.model.layers[1].mlp.up_proj.weight]))
    text = "def main(argv):\n    return os.path.join(argv[0], 'x')\n"
    assert loaded.tokenizer.encode(text) == RustTokenizer.from_file(bpe).encode(text, add_special_tokens=False).ids


REFUSALS = [
    (dict(attention_bias=True), "attention_bias = true"),
    (dict(mlp_bias=True), "mlp_bias = true"),
    (dict(hidden_act="gelu"), 'hidden_act = "gelu"'),
    (dict(head_dim=32), "head_dim = 32"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), 'rope_parameters = {"rope_type": "linear"'),
    (dict(rope_parameters=None, rope_scaling={"type": "yarn", "factor": 4.0}), 'rope_scaling = {"type": "yarn"'),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.5}), "rope_parameters.rope_theta = 10000.5"),
    (dict(rope_parameters=None, rope_theta=10000.5), "rope_theta = 10000.5"),
    (dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=4096), "sliding_window = 4096"),
    (dict(architectures=["MixtralForCausalLM"], num_local_experts=8), "num_local_experts = 8"),
    (dict(architectures=["Qwen2ForCausalLM"]), 'architectures = ["Qwen2ForCausalLM"]'),
    (dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
]


def test_refusals_name_the_key_and_write_nothing(tmp_path, bpe):
    from card_megatron.interop.hf_import import import_hf

    src, _ = llama_dir(tmp_path / "hf", bpe)
    with open(os.path.join(src, "config.json")) as f:
        good = json.load(f)
    for i, (change, message) in enumerate(REFUSALS):
        with open(os.path.join(src, "config.json"), "w") as f:
            json.dump({**good, **change}, f)
        with pytest.raises(ValueError, match="cannot import") as e:
            import_hf(src, str(tmp_path / f"out{i}"))
        assert message in str(e.value) and "config.json" in str(e.value), (change, str(e.value))
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(good, f)
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    # weights that do not fit the config, a bias the config does not mention
    from safetensors.torch import load_file, save_file

    weights = load_file(os.path.join(src, "model.safetensors"))
    bad = dict(weights)
    bad["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    bad["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(bad, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        import_hf(src, str(tmp_path / "shapes"))
    assert "unexpected tensor model.layers.0.self_attn.q_proj.bias" in str(e.value)
    assert "model.layers.1.mlp.up_proj.weight has shape (95, 64)" in str(e.value)
    save_file(weights, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken already exists"):
        import_hf(src, str(tmp_path / "taken"))
    with pytest.raises(ValueError, match="expected a model directory"):
        import_hf(os.path.join(src, "config.json"), str(tmp_path / "z"))
    with pytest.raises(ValueError, match="nope does not exist"):
        import_hf(str(tmp_path / "nope"), str(tmp_path / "y"))
    # the command line (one run: each start imports torch): the message, exit status 1, no traceback
    os.remove(os.path.join(src, "tokenizer.json"))
    tool = [sys.executable, os.path.join(REPO, "tools", "import_hf.py")]
    for args, message in (([src, tmp_path / "x"], "tokenizer.json is missing"),):
        r = subprocess.run(
            [*tool, "--input", str(args[0]), "--output", str(args[1])],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": REPO},
            timeout=120,
        )
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["hf", "taken"]
