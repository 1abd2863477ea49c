"""Import a Hugging Face Llama-family checkpoint (safetensors or GGUF) as a card_megatron export.

The result is what training writes as ``checkpoints/step_*/export``: ``config.yaml`` (the
resolved config, model section from the checkpoint's ``config.json``), ``model.pt``
(canonical single-process weights), ``tokenizer.model`` (the checkpoint's ``tokenizer.json``
bytes) and ``import.json`` (provenance). So ``tools/generate.py``, ``tools/evaluate.py``,
``tools/export_hf.py``, ``tools/run_lm_eval.py`` and ``train.init_from`` take it like any export.
A copy of the tokenizer is written as ``tokenizer.json`` for ``tools/preprocess_data.py``.

The weight mapping is the inverse of :mod:`card_megatron.interop.hf_export`: ``q_proj``,
``k_proj``, ``v_proj`` are interleaved per query group into ``linear_qkv``, ``[gate_proj;
up_proj]`` is ``linear_fc1``; RoPE needs no permutation (both use ``rotate_half`` halves).

New rows: the reserved ids :mod:`card_megatron.tokenizers.huggingface` appends after the tokenizer's
vocabulary (``<mask>``, and eos/bos/pad when the tokenizer has none) and the padding rows that
make the vocabulary a multiple of ``model.make_vocab_size_divisible_by`` (128) are set to the
**mean of the embedding rows of the tokenizer's own ids** (and, when the output layer is
untied, its rows to the mean of its rows likewise). A mean row gives the mask an input that
is "an average token" rather than noise, and its output logit is the average logit, so it takes
about 1/V of the probability mass on clean text until training teaches otherwise.

Everything the decoder here cannot represent exactly is refused before anything is written,
naming the ``config.json`` key and its value (:func:`config_problems`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from card_megatron.fileio import atomic_directory, file_sha256

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")  # the same tensors (Mistral without a window)
MODEL_TYPES = ("llama", "mistral")
IMPORT_RECORD = "import.json"
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


class ImportRefused(ValueError):
    """The checkpoint cannot be imported exactly; the message lists every reason."""


@dataclass
class Source:
    """What an import reads: the checkpoint's config, weights (HF names, any dtype) and tokenizer."""

    path: str
    kind: str  # "safetensors" | "gguf"
    config: dict[str, Any]
    config_name: str  # the file the config keys come from, for messages
    tokenizer_json: bytes
    files: list[str]  # every input file (hashed into the provenance)
    dequantization: Optional[dict[str, Any]] = None
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # GGUF: already loaded
    weight_files: list[str] = field(default_factory=list)  # safetensors: read by load_safetensors_weights
    tokenizer_name: str = ""  # where the tokenizer came from, for messages and the sidecar


# --------------------------------------------------------------------------- config


def _rope(config: dict[str, Any]) -> tuple[str, Any, str, Optional[dict]]:
    """(key, rope_theta, key, rope scaling dict or None) from transformers 4 keys (``rope_theta``,
    ``rope_scaling``) or 5 (``rope_parameters``, which wins when both are present, as in transformers)."""
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        return "rope_parameters.rope_theta", params.get("rope_theta", 10000.0), "rope_parameters", params
    theta = config.get("rope_theta")
    return "rope_theta", (10000.0 if theta is None else theta), "rope_scaling", config.get("rope_scaling")


def config_problems(config: dict[str, Any], where: str) -> list[str]:
    """Every reason the model of ``config`` (a ``config.json`` dict) is not exactly a card_megatron
    decoder, each naming the key and value; [] when it is."""
    p: list[str] = []

    def bad(key: str, why: str, value: Any = None) -> None:
        value = config.get(key) if value is None else value
        p.append(f"{where}: {key} = {json.dumps(value)}: {why}")

    archs = config.get("architectures") or []
    if archs and any(a not in ARCHITECTURES for a in archs):
        bad("architectures", f"only {', '.join(ARCHITECTURES)} (and models with their tensors) can be imported")
    if config.get("model_type") not in MODEL_TYPES:
        bad("model_type", f"must be one of {', '.join(MODEL_TYPES)}")
    if config.get("hidden_act", "silu") != "silu":
        bad("hidden_act", "the MLP here is gated SiLU (SwiGLU)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            bad(key, "the layers here have no biases")
    theta_key, theta, scaling_key, scaling = _rope(config)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        bad(scaling_key, "only plain RoPE (no scaling) is built here", scaling)
    if not isinstance(theta, (int, float)) or float(theta) <= 0 or not float(theta).is_integer():
        bad(theta_key, "model.rotary_base is a positive integer", theta)
    if config.get("sliding_window") is not None and config.get("use_sliding_window", True):
        bad("sliding_window", "attention here is over the whole causal prefix (no window)")
    for key in _MOE_KEYS:
        if config.get(key):
            bad(key, "mixture-of-experts layers are not built here")
    if config.get("quantization_config"):
        bad("quantization_config", "quantized safetensors are not read; import the unquantized checkpoint")
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if not isinstance(config.get(key), int) or config[key] < 1:
            bad(key, "a positive integer is required")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        if hidden % heads:
            bad("hidden_size", f"must be divisible by num_attention_heads ({heads})")
        head_dim = config.get("head_dim")
        if head_dim is not None and head_dim != hidden // heads:
            bad("head_dim", f"must equal hidden_size / num_attention_heads = {hidden // heads} here")
        groups = config.get("num_key_value_heads") or heads
        if not isinstance(groups, int) or groups < 1 or heads % groups:
            bad("num_key_value_heads", f"must divide num_attention_heads ({heads})")
    return p


def model_section(config: dict[str, Any]) -> dict[str, Any]:
    """card_megatron's ``model`` section (a dict of ModelConfig fields) for a checked ``config.json``."""
    heads = config["num_attention_heads"]
    groups = config.get("num_key_value_heads") or heads
    theta = _rope(config)[1]
    return {
        "num_layers": config["num_hidden_layers"],
        "hidden_size": config["hidden_size"],
        "num_attention_heads": heads,
        "num_query_groups": None if groups == heads else groups,
        "ffn_hidden_size": config["intermediate_size"],
        "seq_length": int(config.get("max_position_embeddings") or 2048),
        "rotary_base": int(theta),
        "norm_epsilon": float(config.get("rms_norm_eps", 1e-6)),
        "init_method_std": float(config.get("initializer_range", 0.02)),
        "untie_embeddings_and_output_weights": not config.get("tie_word_embeddings", False),
    }


# --------------------------------------------------------------------------- weights


def canonical_from_llama(hf: dict[str, torch.Tensor], m: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """CardGPT's canonical state dict (float32, source vocabulary) from ``LlamaForCausalLM`` weights;
    ``m``: :func:`model_section`. ImportRefused naming the tensor for a missing, unexpected or
    misshapen one."""
    hidden, heads, layers = m["hidden_size"], m["num_attention_heads"], m["num_layers"]
    groups = m["num_query_groups"] or heads
    head_dim, ffn = hidden // heads, m["ffn_hidden_size"]
    vocab = hf["model.embed_tokens.weight"].shape[0] if "model.embed_tokens.weight" in hf else None
    expected = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if m["untie_embeddings_and_output_weights"]:
        expected["lm_head.weight"] = (vocab, hidden)
    for i in range(layers):
        q = f"model.layers.{i}."
        expected.update(
            {
                q + "self_attn.q_proj.weight": (heads * head_dim, hidden),
                q + "self_attn.k_proj.weight": (groups * head_dim, hidden),
                q + "self_attn.v_proj.weight": (groups * head_dim, hidden),
                q + "self_attn.o_proj.weight": (hidden, heads * head_dim),
                q + "input_layernorm.weight": (hidden,),
                q + "post_attention_layernorm.weight": (hidden,),
                q + "mlp.gate_proj.weight": (ffn, hidden),
                q + "mlp.up_proj.weight": (ffn, hidden),
                q + "mlp.down_proj.weight": (hidden, ffn),
            }
        )
    problems = [f"{where}: tensor {k} is missing" for k in expected if k not in hf]
    for k, v in hf.items():
        if k in expected:
            if tuple(v.shape) != expected[k]:
                problems.append(f"{where}: tensor {k} has shape {tuple(v.shape)}, the config says {expected[k]}")
        elif k == "lm_head.weight" and not m["untie_embeddings_and_output_weights"]:
            if "model.embed_tokens.weight" in hf and not torch.equal(v, hf["model.embed_tokens.weight"]):
                problems.append(f"{where}: lm_head.weight differs from the embedding; tie_word_embeddings is true")
        elif not k.endswith("rotary_emb.inv_freq"):  # old checkpoints store the RoPE table; it is recomputed
            problems.append(f"{where}: unexpected tensor {k} (e.g. a bias): the model here cannot hold it")
    if problems:
        raise ImportRefused("cannot import:\n  - " + "\n  - ".join(problems[:20]))
    f32 = {k: v.to(torch.float32) for k, v in hf.items()}
    out = {
        "embedding.embedding.word_embeddings.weight": f32["model.embed_tokens.weight"],
        "output.final_norm.weight": f32["model.norm.weight"],
    }
    if m["untie_embeddings_and_output_weights"]:
        out["output.output_layer.weight"] = f32["lm_head.weight"]
    per = heads // groups
    for i in range(layers):
        p, q = f"layers.{i}.layer.", f"model.layers.{i}."
        qkv = torch.cat(
            [
                f32[q + "self_attn.q_proj.weight"].view(groups, per, head_dim, hidden),
                f32[q + "self_attn.k_proj.weight"].view(groups, 1, head_dim, hidden),
                f32[q + "self_attn.v_proj.weight"].view(groups, 1, head_dim, hidden),
            ],
            dim=1,
        )
        out[p + "self_attention.linear_qkv.weight"] = qkv.reshape(groups * (per + 2) * head_dim, hidden)
        out[p + "self_attention.linear_proj.weight"] = f32[q + "self_attn.o_proj.weight"]
        out[p + "input_layernorm.weight"] = f32[q + "input_layernorm.weight"]
        out[p + "pre_mlp_layernorm.weight"] = f32[q + "post_attention_layernorm.weight"]
        out[p + "mlp.linear_fc1.weight"] = torch.cat([f32[q + "mlp.gate_proj.weight"], f32[q + "mlp.up_proj.weight"]])
        out[p + "mlp.linear_fc2.weight"] = f32[q + "mlp.down_proj.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


# --------------------------------------------------------------------------- reading


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ImportRefused(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ImportRefused(f"{path}: expected a JSON object")
    return data


def read_safetensors_dir(path: str) -> Source:
    """The config, tokenizer and file list of a Hugging Face model directory (weights read later)."""
    config_path, tok_path = os.path.join(path, "config.json"), os.path.join(path, "tokenizer.json")
    for needed in (config_path, tok_path):
        if not os.path.isfile(needed):
            raise ImportRefused(f"--input {path}: {os.path.basename(needed)} is missing")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ImportRefused(f"{index}: no weight_map")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise ImportRefused(f"{index} names shards that are missing: {', '.join(missing)}")
        weights = [os.path.join(path, s) for s in shards]
        files = [config_path, index, *weights, tok_path]
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        weights = [os.path.join(path, "model.safetensors")]
        files = [config_path, *weights, tok_path]
    else:
        raise ImportRefused(
            f"--input {path}: neither model.safetensors nor model.safetensors.index.json (only safetensors are read)"
        )
    with open(tok_path, "rb") as f:
        tokenizer_json = f.read()
    config = _read_json(config_path)
    return Source(
        path, "safetensors", config, config_path, tokenizer_json, files, weight_files=weights, tokenizer_name=tok_path
    )


def load_safetensors_weights(src: Source) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for w in src.weight_files:
        try:
            state.update(load_file(w))
        except (SafetensorError, OSError) as e:
            raise ImportRefused(f"{w}: not a readable safetensors file ({e})") from None
    return state


def _gguf_quantization(path: str) -> dict[str, Any]:
    """The GGUF file's tensor types and how many tensors have each ({"Q4_1": 210, "F32": 61})."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def read_gguf(path: str) -> Source:
    """A ``.gguf`` file through transformers' GGUF loader (dequantized to float32)."""
    try:
        import accelerate  # noqa: F401  (transformers refuses GGUF without it)
        import gguf  # noqa: F401
    except ImportError:
        raise ImportRefused(
            f"--input {path}: reading GGUF needs the gguf and accelerate packages: pip install -e .[eval]"
        ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    quant = _gguf_quantization(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ImportRefused(f"{path}: transformers cannot load this GGUF file ({type(e).__name__}: {e})") from None
    config = model.config.to_dict()
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    config.pop("quantization_config", None)  # the weights are dequantized in memory (recorded below)
    src = Source(
        path,
        "gguf",
        config,
        f"{path} (config as transformers reads it)",
        tok.backend_tokenizer.to_str().encode("utf-8"),
        [path],
        dequantization={"to": "float32", "by": "transformers GGUF loader", "tensor_types": quant},
        tokenizer_name=f"{path} (tokenizer.json as transformers reconstructs it)",
    )
    src.state = {k: v.detach() for k, v in model.state_dict().items()}
    return src


# --------------------------------------------------------------------------- the import


def importable_objectives() -> tuple[str, ...]:
    """The objectives a Llama's weights can start (their traits' ``causal_lm``: the same function)."""
    from card_megatron.objectives import objective_names, objective_traits

    return tuple(n for n in objective_names() if objective_traits(n).causal_lm)


def import_hf(input_path: str, output: str, objective: str = "card") -> dict[str, Any]:
    """Writes the checkpoint at ``input_path`` (a model directory or a ``.gguf`` file) as a
    card_megatron export at ``output``, recording ``objective`` (one of :func:`importable_objectives`)
    in its config; returns the provenance record (``import.json``). ImportRefused (a ValueError) for
    what cannot be imported exactly, FileExistsError for an existing ``output``; nothing is written in
    either case."""
    import yaml

    from card_megatron.config import Config, ModelConfig, ObjectiveConfig, config_to_dict, validate
    from card_megatron.model.export import extend_vocab_rows
    from card_megatron.model.gpt import padded_vocab_size
    from card_megatron.tokenizers import HuggingFaceTokenizer

    if objective not in importable_objectives():
        raise ImportRefused(
            f"--objective {objective}: a Llama is a causal LM, which only {', '.join(importable_objectives())} "
            "models compute"
        )
    if os.path.lexists(output):
        raise FileExistsError(f"--output {output} already exists: choose a new directory (nothing was written)")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise ImportRefused(f"--output {output}: directory {parent} does not exist")
    if not os.path.exists(input_path):
        raise ImportRefused(f"--input {input_path} does not exist")
    if os.path.isdir(input_path):
        src = read_safetensors_dir(input_path)
    elif input_path.endswith(".gguf"):
        src = read_gguf(input_path)
    else:
        raise ImportRefused(
            f"--input {input_path}: expected a model directory (config.json, *.safetensors) or a .gguf file"
        )
    problems = config_problems(src.config, src.config_name)
    if problems:
        raise ImportRefused("cannot import exactly:\n  - " + "\n  - ".join(problems))
    m = model_section(src.config)
    tokenizer = HuggingFaceTokenizer(src.tokenizer_json, src.tokenizer_name)
    source_rows = src.config["vocab_size"]
    if tokenizer.num_pieces > source_rows:
        raise ImportRefused(
            f"{src.config_name}: vocab_size = {source_rows}, but the tokenizer has {tokenizer.num_pieces} tokens"
        )
    state = src.state or load_safetensors_weights(src)
    canonical = canonical_from_llama(state, m, src.path)
    del state
    cfg = Config(model=ModelConfig(**m), objective=ObjectiveConfig(name=objective))
    validate(cfg)
    rows = padded_vocab_size(max(source_rows, tokenizer.vocab_size), cfg.model.make_vocab_size_divisible_by, 1)
    new_ids = sorted(getattr(tokenizer, f"{role}_id") for role in tokenizer.appended)
    canonical = extend_vocab_rows(canonical, rows, tokenizer.num_pieces, new_ids)
    record = {
        "source": os.path.abspath(src.path),
        "format": src.kind,
        "architectures": src.config.get("architectures") or [src.config.get("model_type")],
        "source_dtype": str(src.config.get("dtype") or src.config.get("torch_dtype") or "unknown"),
        "sha256": {os.path.basename(f): file_sha256(f) for f in src.files},
        "dequantization": src.dequantization,
        "source_vocab_size": source_rows,
        "vocab_rows": rows,
        "new_rows": {
            "reserved_ids": new_ids,
            "padding_ids": [max(source_rows, tokenizer.vocab_size), rows],  # [first, end)
            "init": f"mean of the embedding (and untied output) rows 0..{tokenizer.num_pieces - 1}",
        },
        "tokenizer": tokenizer.metadata(),
    }
    with atomic_directory(output) as tmp:  # renamed to output when complete
        torch.save({"state_dict": canonical, "step": 0}, os.path.join(tmp, "model.pt"))
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
        for name in ("tokenizer.model", "tokenizer.json"):  # the loader reads the first, preprocessing the second
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(src.tokenizer_json)
        with open(os.path.join(tmp, IMPORT_RECORD), "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
    return record
