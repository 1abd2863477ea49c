"""Export a causal checkpoint (ARM or CARD) as a ``transformers`` Llama model directory.

The decoder maps onto ``LlamaForCausalLM`` weight for weight: RMSNorm, SwiGLU MLP, RoPE
(non-interleaved halves, as Megatron's default and Llama's ``rotate_half``), no biases,
grouped-query attention. Megatron keeps Q, K and V in one ``linear_qkv`` weight, grouped by
query group ``[q_0 .. q_{n/g-1}, k, v]`` per group; the gated MLP's ``linear_fc1`` is
``[gate; up]``. The weights come from :func:`card_megatron.inference.loading.load_model`, so
any training layout (TP, PP, ZeRO) exports the same way.

MDLM and BD3LM are refused (their traits say ``causal_lm=False``): their attention is bidirectional
(full or block), which a causal LM class would silently replace by causal attention and give
different outputs.

The output directory holds ``config.json``, ``generation_config.json``, ``model.safetensors``
(written by ``save_pretrained``), the tokenizer files (a ``tokenizer.json`` with the
reserved tokens card_megatron appended, or a SentencePiece ``tokenizer.model``) and
``card_megatron.json`` (the source checkpoint, its step and objective, the reserved ids).
It is written under a temporary name and renamed when complete; an existing target is refused.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from card_megatron.fileio import atomic_directory
from card_megatron.objectives import ObjectiveConfig, objective_names, objective_traits
from card_megatron.objectives.traits import MASK_KIND_TEXT

logger = logging.getLogger(__name__)


def llama_config(loaded) -> Any:
    """The ``transformers.LlamaConfig`` of a loaded causal model (padded vocabulary)."""
    from transformers import LlamaConfig

    m = loaded.config.model
    tok = loaded.tokenizer
    return LlamaConfig(
        vocab_size=loaded.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size or 4 * m.hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        head_dim=m.hidden_size // m.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=m.seq_length,
        rms_norm_eps=m.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)},
        tie_word_embeddings=not m.untie_embeddings_and_output_weights,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=tok.eos_id,  # documents are separated (and prompts begun) by eos in training
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )


def llama_state_dict(model: torch.nn.Module, cfg) -> dict[str, torch.Tensor]:
    """``LlamaForCausalLM`` weights from a single-process :class:`CardGPT` (``cfg``: its ModelConfig)."""
    src = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    heads = cfg.num_attention_heads
    groups = cfg.num_query_groups or heads
    head_dim = cfg.hidden_size // heads
    ffn = cfg.ffn_hidden_size or 4 * cfg.hidden_size
    out = {
        "model.embed_tokens.weight": src["embedding.embedding.word_embeddings.weight"],
        "model.norm.weight": src["output.final_norm.weight"],
    }
    if cfg.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = src["output.output_layer.weight"]
    for i in range(cfg.num_layers):
        p, q = f"layers.{i}.layer.", f"model.layers.{i}."
        qkv = src[p + "self_attention.linear_qkv.weight"].view(groups, heads // groups + 2, head_dim, cfg.hidden_size)
        out[q + "self_attn.q_proj.weight"] = qkv[:, : heads // groups].reshape(heads * head_dim, cfg.hidden_size)
        out[q + "self_attn.k_proj.weight"] = qkv[:, heads // groups].reshape(groups * head_dim, cfg.hidden_size)
        out[q + "self_attn.v_proj.weight"] = qkv[:, heads // groups + 1].reshape(groups * head_dim, cfg.hidden_size)
        out[q + "self_attn.o_proj.weight"] = src[p + "self_attention.linear_proj.weight"]
        out[q + "input_layernorm.weight"] = src[p + "input_layernorm.weight"]
        out[q + "post_attention_layernorm.weight"] = src[p + "pre_mlp_layernorm.weight"]
        fc1 = src[p + "mlp.linear_fc1.weight"]
        out[q + "mlp.gate_proj.weight"], out[q + "mlp.up_proj.weight"] = fc1[:ffn], fc1[ffn:]
        out[q + "mlp.down_proj.weight"] = src[p + "mlp.linear_fc2.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def check_exportable(objective: str, path: str) -> None:
    """ValueError unless ``objective`` is a causal LM (its traits' ``causal_lm``: ARM and CARD)."""
    traits = objective_traits(objective)
    if not traits.causal_lm:
        exportable = [objective_traits(n).label for n in objective_names() if objective_traits(n).causal_lm]
        raise ValueError(
            f"{path} was trained with objective {objective!r}, whose attention is bidirectional "
            f"({MASK_KIND_TEXT[traits.mask_kind]}); a transformers causal LM class would run it with "
            f"causal attention and compute something else. Only {' and '.join(exportable)} checkpoints export to Llama."
        )


def _save_tokenizer(tokenizer, out_dir: str) -> list[str]:
    """Writes the tokenizer files ``AutoTokenizer.from_pretrained(out_dir)`` reads; returns their names."""
    from card_megatron.tokenizers import HuggingFaceTokenizer

    names = {
        "eos_token": tokenizer.eos_id,
        "bos_token": tokenizer.bos_id,
        "pad_token": tokenizer.pad_id,
        "mask_token": tokenizer.mask_id,
    }
    if isinstance(tokenizer, HuggingFaceTokenizer):
        from tokenizers import Tokenizer as RustTokenizer
        from transformers import PreTrainedTokenizerFast

        rust = RustTokenizer.from_str(tokenizer.hf_json())
        rust.encode_special_tokens = True
        special = {k: rust.id_to_token(v) for k, v in names.items()}
        if tokenizer.unk_id >= 0:
            special["unk_token"] = rust.id_to_token(tokenizer.unk_id)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=rust, **special, model_max_length=None, clean_up_tokenization_spaces=False
        )
        files = fast.save_pretrained(out_dir)
        return sorted(os.path.basename(f) for f in files)
    # SentencePiece: transformers' own SentencePiece tokenizer over the same .model file.
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    fallback = {"mask_token": "<mask>", "eos_token": "</s>", "bos_token": "<s>", "pad_token": "<pad>"}
    special = {k: tokenizer.sp.id_to_piece(v) if v < tokenizer.num_pieces else fallback[k] for k, v in names.items()}
    if tokenizer.unk_id >= 0:
        special["unk_token"] = tokenizer.sp.id_to_piece(tokenizer.unk_id)
    slow = SentencePieceBackend(vocab_file=tokenizer.source, **special, model_max_length=None)
    got = {k: slow.convert_tokens_to_ids(special[k]) for k in names}
    if got != names:
        raise ValueError(
            f"{tokenizer.source}: transformers gives the reserved tokens ids {got}, "
            f"card_megatron {names}; "
            "the tokenizer cannot be exported faithfully"
        )
    files = slow.save_pretrained(out_dir)
    return sorted(os.path.basename(f) for f in files)


def export_llama(checkpoint: str, output: str, ema: bool = False) -> dict[str, Any]:
    """Writes ``checkpoint`` (run, checkpoint or export directory) as a Llama model directory at
    ``output``; returns the ``card_megatron.json`` record. ValueError for a bidirectional
    objective, FileExistsError for an existing ``output``."""
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        raise ValueError(
            "exporting needs transformers and safetensors: pip install -e .[eval] (or make setup)"
        ) from None

    from card_megatron.inference.loading import load_model
    from card_megatron.rundir import resolve_export_dir

    if os.path.lexists(output):
        raise FileExistsError(f"--output {output} already exists: choose a new directory (nothing was written)")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise ValueError(f"--output {output}: directory {parent} does not exist")
    export_dir = resolve_export_dir(checkpoint)
    import yaml

    with open(os.path.join(export_dir, "config.yaml")) as f:
        objective = (yaml.safe_load(f).get("objective") or {}).get("name", ObjectiveConfig().name)
    check_exportable(objective, checkpoint)
    loaded = load_model(checkpoint, device="cpu", dtype=torch.float32, ema=ema)
    config = llama_config(loaded)
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    state = llama_state_dict(loaded.model, loaded.config.model)
    hf.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        hf.tie_weights()
    hf = hf.float().eval()
    with atomic_directory(output) as tmp:  # renamed to output when complete
        hf.save_pretrained(tmp, safe_serialization=True)
        tokenizer_files = _save_tokenizer(loaded.tokenizer, tmp)
        record = {
            "source": os.path.abspath(loaded.path),
            "step": loaded.step,
            "objective": objective,
            "ema": ema,
            "tokenizer": loaded.tokenizer.metadata(),
            "tokenizer_files": tokenizer_files,
            "note": "prompts start with the document-boundary token (eos), as in training; "
            "CARD checkpoints decode autoregressively here (no parallel decoding in transformers)",
        }
        with open(os.path.join(tmp, "card_megatron.json"), "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
    return record
