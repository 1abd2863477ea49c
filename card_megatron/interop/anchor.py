"""The transformers anchor: the same checkpoint decoded by ``transformers``' ``generate``.

A user who wants speed can export a causal checkpoint (``tools/export_hf.py``) and decode it
with ``transformers``. :func:`hf_model` does exactly that (``export_llama`` into a directory,
``AutoModelForCausalLM.from_pretrained``), and :func:`hf_generate` runs greedy ``generate``
with its KV cache on the prompt token ids our decoders read (left padded within a batch, as
``transformers`` expects). ``tools/benchmark_generate.py --anchor`` times it round-robin with
our decoders in one process, so the ratios are comparable on a loaded machine.

:func:`random_export` writes a randomly initialised model of any shape as a card_megatron
export (the benchmark's model of the gpt-125m shape), so that both sides load it the way
they load a trained one.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Sequence

import torch
import yaml


def hf_model(checkpoint: str, out_dir: str, device, dtype: torch.dtype):
    """``LlamaForCausalLM`` of ``checkpoint`` exported to ``out_dir`` (reused when it exists), in eval mode."""
    from transformers import AutoModelForCausalLM

    from card_megatron.interop.hf_export import export_llama

    if not os.path.exists(out_dir):
        export_llama(checkpoint, out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype)
    return model.to(device).eval()


def hf_generate(
    model,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    eos: int,
    pad: int,
    suppress: Sequence[int] = (),
) -> tuple[list[list[int]], float]:
    """Greedy ``generate`` (KV cache) over ``prompt_ids`` in batches of ``batch_size``; ``suppress``:
    ids never generated (the benchmark passes none, as a user would; tests pass our banned ids).

    Returns (new tokens of each prompt, cut after eos as our decoders do, total seconds).
    """
    device = next(model.parameters()).device
    outputs: list[list[int]] = []
    seconds = 0.0
    for start in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[start : start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros(len(batch), width, dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, width - len(p) :] = torch.tensor(p)
            attention[i, width - len(p) :] = 1
        ids, attention = ids.to(device), attention.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=attention,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
                use_cache=True,
                **({"suppress_tokens": list(suppress)} if suppress else {}),
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        for row in out[:, width:].tolist():
            outputs.append(row[: row.index(eos) + 1] if eos in row else row)
    return outputs, seconds


def random_export(template: str, out_dir: str, model_overrides: dict, vocab_size: int, seed: int = 0) -> str:
    """Writes a randomly initialised model as an export at ``out_dir`` (reused when it exists).

    template: any checkpoint (its tokenizer and config are copied); model_overrides: ModelConfig
    fields (e.g. the model section of ``configs/gpt-125m.yaml``); vocab_size: the embedding rows.
    Returns ``out_dir``.
    """
    from card_megatron.config import ModelConfig, config_from_dict
    from card_megatron.fileio import temp_path
    from card_megatron.model.gpt import CardGPT
    from card_megatron.parallel.state import init_single_process
    from card_megatron.rundir import resolve_export_dir

    if os.path.exists(out_dir):
        return out_dir
    src = resolve_export_dir(template)
    with open(os.path.join(src, "config.yaml")) as f:
        raw = yaml.safe_load(f)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(model_overrides) - known)
    if unknown:
        raise ValueError(f"random model: unknown model settings {', '.join(unknown)}")
    raw["model"] = {**raw["model"], **model_overrides}
    cfg = config_from_dict(raw)
    init_single_process()
    model = CardGPT(cfg.model, "causal", vocab_size, tp_size=1, seed=seed)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    tmp = temp_path(os.path.abspath(out_dir))
    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.yaml"), "w") as f:
        yaml.safe_dump(raw, f)
    torch.save({"state_dict": state, "step": 0}, os.path.join(tmp, "model.pt"))
    with (
        open(os.path.join(src, "tokenizer.model"), "rb") as f_in,
        open(os.path.join(tmp, "tokenizer.model"), "wb") as f,
    ):
        f.write(f_in.read())
    os.rename(tmp, out_dir)
    return out_dir


def run_anchor(
    loaded, hf, prompts: Sequence[str], batch_size: int, max_new_tokens: int, settings: Sequence[tuple], repeats: int
) -> list[dict]:
    """Times ``transformers`` greedy ``generate`` and each of our ``settings`` ((name,
    GenerationConfig) pairs, greedy) on the same prompts, round-robin, ``repeats`` times after a
    warm-up; the fastest repeat counts. Returns one row per setting, the anchor first:
    {setting, batch, new_tokens, tokens_per_forward, tokens_per_second, vs_transformers,
    tokens_per_cpu_second, cpu_vs_transformers (the same from this process's CPU time, steadier
    than wall clock on a shared machine), same_as_transformers (fraction of sequences with the
    anchor's exact tokens), seconds, cpu_seconds}. Wall and CPU times are each the fastest repeat.
    """
    from card_megatron.inference.generate import encode_prompts, generate

    tok = loaded.tokenizer
    ids = encode_prompts(tok, prompts)
    runners = [("transformers generate (AR)", None)] + list(settings)
    for _name, cfg in runners:  # warm-up: allocator, kernels, lazy imports
        if cfg is None:
            hf_generate(hf, ids[:batch_size], 4, batch_size, tok.eos_id, tok.pad_id)
        else:
            generate(loaded, list(prompts[:batch_size]), dataclasses.replace(cfg, max_new_tokens=4))
    best: dict[str, list] = {}
    for _ in range(repeats):
        for name, cfg in runners:
            cpu = time.process_time()
            if cfg is None:
                tokens, seconds = hf_generate(hf, ids, max_new_tokens, batch_size, tok.eos_id, tok.pad_id)
                passes = sum(len(t) for t in tokens)
            else:
                gens, totals = generate(loaded, list(prompts), cfg)
                tokens, seconds, passes = [g.token_ids for g in gens], totals["seconds"], totals["forward_passes"]
            cpu = time.process_time() - cpu
            if name not in best:
                best[name] = [tokens, seconds, passes, cpu]
            best[name][1] = min(best[name][1], seconds)
            best[name][3] = min(best[name][3], cpu)
    anchor_tokens, anchor_seconds, _, anchor_cpu = best[runners[0][0]]
    anchor_new = sum(len(t) for t in anchor_tokens)
    rows = []
    for name, _ in runners:
        tokens, seconds, passes, cpu = best[name]
        new = sum(len(t) for t in tokens)
        rows.append(
            {
                "setting": name,
                "batch": batch_size,
                "sequences": len(tokens),
                "new_tokens": new,
                "tokens_per_forward": new / max(passes, 1),
                "tokens_per_second": new / seconds,
                "vs_transformers": (new / seconds) / (anchor_new / anchor_seconds),
                "tokens_per_cpu_second": new / cpu,
                "cpu_vs_transformers": (new / cpu) / (anchor_new / anchor_cpu),
                "same_as_transformers": sum(a == b for a, b in zip(tokens, anchor_tokens)) / len(tokens),
                "seconds": seconds,
                "cpu_seconds": cpu,
            }
        )
    return rows
