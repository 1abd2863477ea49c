#!/usr/bin/env python
"""Speed/quality sweep of CARD's threshold tau against AR decoding, measured side by side.

  python tools/benchmark_generate.py --checkpoint runs/demo --judge runs/demo-arm --plot docs/generation_sweep.png
  python tools/benchmark_generate.py --checkpoint RUN --judge ARM_RUN --device cuda --batch-size 16
  python tools/benchmark_generate.py --anchor --checkpoint runs/demo --random-model configs/gpt-125m.yaml \
      --markdown runs/anchor.md        # the transformers anchor table (make bench-generate)

--anchor: instead of the sweep, the checkpoint is exported with tools/export_hf.py's exporter and
decoded greedily by transformers' generate (KV cache) and by ours (AR, threshold CARD, verify CARD,
and AR through Megatron's modules), on the same prompt ids, device, dtype and threads, round-robin
in one process, at each --batch-sizes; the table gives tokens/s ratios against transformers.
--random-model CONFIG adds a randomly initialised model of that config's shape (sequence length
--random-seq-length, vocabulary --random-vocab-size), exported and decoded the same way.

--cuda-graphs adds, after each of our AR and CARD settings (sweep and anchor), the same setting
with static shapes and CUDA graphs (``CausalDecodeConfig(cuda_graphs=True)``), so graphs on and
off are timed side by side in one run; on a CPU the twin runs the static-shape path eagerly.

For every setting (``--decoding ar``, then ``--decoding card`` at each threshold, and any
``--also`` checkpoint with its own decoder) it generates from the same prompts and seeds,
and reports tokens per forward pass, wall-clock tokens/s (best of ``--repeats``, after a
warm-up), the speed-up over AR, the judge's perplexity of the generated text (normally
the ARM baseline), unigram entropy and the fraction of repeated 4-grams. The settings
run interleaved in one process on one device, so ratios are comparable; absolute numbers
are not (other load on the machine moves them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

PROMPTS = [
    "",
    "The default value of",
    "Return a list of",
    "This module provides",
    "If the argument is",
    "Raise ValueError if",
    "The following example shows",
    "A string containing",
    "When the file is",
    "The function returns",
    "Note that the",
    "For example,",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", default="runs/demo", help="the CARD checkpoint (default runs/demo)")
    p.add_argument("--judge", default="runs/demo-arm", help="the judge, normally the ARM run (default runs/demo-arm)")
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="CHECKPOINT",
        help="another checkpoint (e.g. MDLM or BD3LM) to run with its default decoder (repeatable)",
    )
    p.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        default=[0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.5],
        help="tau values for CARD decoding (> 1: one token per step)",
    )
    p.add_argument("--window", type=int, default=8, help="CARD window K (default 8)")
    p.add_argument(
        "--commit-policy",
        nargs="+",
        choices=("prefix", "any"),
        default=["prefix"],
        help="commit policies to sweep (default prefix)",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="also run every AR/CARD setting with static shapes and CUDA graphs (a twin row named '... graphs'); "
        "on a CPU the twin runs the static-shape path eagerly",
    )
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--num-samples", type=int, default=2, help="sequences per prompt (default 2)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences decoded together (default 1: latency)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="timed repetitions per setting; the fastest counts")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", metavar="FILE", help="write all results as JSON here")
    a = p.add_argument_group("--anchor: against transformers' generate on the same exported weights")
    a.add_argument("--anchor", action="store_true", help="run the transformers anchor table instead of the sweep")
    a.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="batch sizes (default 1 16)")
    a.add_argument(
        "--num-prompts",
        type=int,
        default=16,
        help="prompts per batch size (default 16; a trained model's are held-out documents cut after their "
        "first period, the random model's the fixed text prompts)",
    )
    a.add_argument(
        "--random-model",
        metavar="CONFIG",
        help="also a random model with the model section of this YAML (e.g. configs/gpt-125m.yaml)",
    )
    a.add_argument("--random-seq-length", type=int, default=128, help="its sequence length (default 128)")
    a.add_argument("--random-vocab-size", type=int, default=50304, help="its vocabulary rows (default 50304)")
    a.add_argument("--random-max-new-tokens", type=int, default=32, help="new tokens for the random model (default 32)")
    a.add_argument(
        "--random-num-prompts", type=int, default=4, help="prompts per batch size of 1 for the random model (default 4)"
    )
    a.add_argument(
        "--work-dir",
        default="runs/anchor",
        help="exports (HF and the random model) are written here and reused (default runs/anchor)",
    )
    a.add_argument("--markdown", metavar="FILE", help="write the table (markdown) here")
    p.add_argument("--plot", metavar="PNG", help="draw judge perplexity vs tokens per forward and speed-up vs tau")
    return p


def _plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ar = next(r for r in rows if r["setting"] == "ar")
    for policy in sorted({r.get("commit_policy") for r in rows if r["decoding"] == "card"}):
        card = [
            r for r in rows if r["decoding"] == "card" and r["commit_policy"] == policy and not r.get("cuda_graphs")
        ]
        left.plot(
            [r["tokens_per_forward"] for r in card], [r["judge_ppl"] for r in card], "o-", label=f"CARD ({policy})"
        )
        for r in card:
            left.annotate(f"{r['threshold']:g}", (r["tokens_per_forward"], r["judge_ppl"]), fontsize=7)
        right.plot([r["threshold"] for r in card], [r["speedup"] for r in card], "o-", label=f"wall clock ({policy})")
        right.plot(
            [r["threshold"] for r in card],
            [r["tokens_per_forward"] for r in card],
            "s--",
            label=f"tokens/forward ({policy})",
        )
    left.scatter([1.0], [ar["judge_ppl"]], marker="*", s=120, color="k", label="AR (KV cache)")
    for r in rows:
        if r["decoding"] in ("mdlm", "bd3lm", "ar") and r["setting"] != "ar" and not r.get("cuda_graphs"):
            left.scatter([r["tokens_per_forward"]], [r["judge_ppl"]], marker="x", label=r["setting"])
    left.axhline(ar["judge_ppl"] * 1.05, color="grey", lw=0.8, ls=":", label="AR perplexity + 5 %")
    left.set_xlabel("tokens per forward pass")
    left.set_ylabel("judge perplexity (ARM)")
    left.legend(fontsize=7)
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_xlabel("threshold tau")
    right.set_ylabel("ratio to AR")
    right.legend(fontsize=7)
    fig.suptitle("CARD dynamic parallel decoding: speed vs quality", fontsize=10)
    fig.tight_layout()
    from card_megatron.fileio import atomic_open

    with atomic_open(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    print(f"plot: {path}", file=sys.stderr)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from card_megatron import cli

    cli.start_logging(None)  # the start-up note, before Megatron-core is imported
    import torch

    from card_megatron.inference.causal import CausalDecodeConfig
    from card_megatron.inference.generate import GenerationConfig
    from card_megatron.inference.loading import load_model
    from card_megatron.inference.sampling import SamplingConfig
    from card_megatron.inference.sweep import Setting, run_sweep

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.anchor:
        return _anchor(args, dtype)
    with contextlib.redirect_stdout(sys.stderr):
        model = load_model(args.checkpoint, device=args.device, dtype=dtype)
        judge = load_model(args.judge, device=args.device, dtype=dtype)
        others = [load_model(path, device=args.device, dtype=dtype) for path in args.also]
    prompts = [p for p in PROMPTS for _ in range(args.num_samples)]
    samp = SamplingConfig(greedy=args.greedy, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    base = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, sampling=samp)
    settings = [("ar", model, GenerationConfig(decoding="ar", **base), {})]
    for policy in args.commit_policy:
        for tau in args.thresholds:
            cfg = GenerationConfig(
                decoding="card",
                causal=CausalDecodeConfig(window=args.window, threshold=tau, commit_policy=policy),
                **base,
            )
            settings.append((f"card tau={tau:g} {policy}", model, cfg, {"threshold": tau, "commit_policy": policy}))
    if args.cuda_graphs:
        settings = [twin for s in settings for twin in (s, _graphs_twin(s))]
    for other in others:
        name = f"{other.config.objective.name} ({os.path.basename(os.path.normpath(args.also[others.index(other)]))})"
        settings.append((name, other, GenerationConfig(causal=CausalDecodeConfig(window=args.window), **base), {}))
    print(
        f"device {model.device}, {len(prompts)} sequences x {args.max_new_tokens} new tokens, batch {args.batch_size}, "
        f"{'greedy' if samp.is_greedy else f'sampling T={args.temperature} top-p={args.top_p}'}, K={args.window}"
        f"{', CUDA graphs on and off' if args.cuda_graphs else ''}; "
        f"judge {judge.path}",
        file=sys.stderr,
    )
    header = (
        f"{'setting':<24} {'tok/fwd':>7} {'tok/s':>8} {'speedup':>7} {'cpu tok/s':>9} {'cpu x':>6} "
        f"{'judge ppl':>9} {'entropy':>7} {'rep4':>6}"
    )
    print(header)
    rows, _ = run_sweep([Setting(*s) for s in settings], prompts, judge, args.repeats)
    for row in rows:
        print(
            f"{row['setting']:<24} {row['tokens_per_forward']:7.2f} {row['tokens_per_second']:8.1f} "
            f"{row['speedup']:7.2f} {row['tokens_per_cpu_second']:9.1f} {row['cpu_speedup']:6.2f} "
            f"{row['judge_ppl']:9.2f} {row['entropy']:7.3f} {row['repetition_4gram']:6.3f}",
            flush=True,
        )
    meta = {
        "checkpoint": model.path,
        "judge": judge.path,
        "device": str(model.device),
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "prompts": PROMPTS,
        "args": vars(args),
        "time": time.ctime(),
    }
    if args.json:
        from card_megatron.fileio import atomic_write

        atomic_write(args.json, json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.plot:
        _plot(rows, args.plot)
    return 0


def _graphs_config(cfg):
    """A GenerationConfig -> the same with static shapes and CUDA graphs (``CausalDecodeConfig.cuda_graphs``)."""
    import dataclasses

    return dataclasses.replace(cfg, causal=dataclasses.replace(cfg.causal, cuda_graphs=True))


def _graphs_twin(setting: tuple) -> tuple:
    """A sweep setting (name, model, GenerationConfig, extra) -> its twin with CUDA graphs."""
    name, loaded, cfg, extra = setting
    return (f"{name} graphs", loaded, _graphs_config(cfg), {**extra, "cuda_graphs": True})


def _anchor_models(args, dtype):
    """(label, loaded model, transformers model, prompts, max new tokens) for the checkpoint and the random model."""
    import yaml

    from apps.study.decoding import copy_prompts
    from apps.study.plans import DecodeSpec
    from card_megatron.inference.loading import load_model
    from card_megatron.interop.anchor import hf_model, random_export

    os.makedirs(args.work_dir, exist_ok=True)
    out = []
    loaded = load_model(args.checkpoint, device=args.device, dtype=dtype)
    spec = DecodeSpec(0, 0, args.max_new_tokens, (), (), copy_prompts=args.num_prompts)
    prompts = []
    if loaded.config.data.data_path and os.path.exists(loaded.config.data.data_path + ".idx"):
        prompts = copy_prompts(loaded.config.data.data_path, loaded.config.data.split, loaded.tokenizer, spec)
    if len(prompts) < args.num_prompts:  # no corpus here: the fixed text prompts
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.num_prompts)]
    hf = hf_model(args.checkpoint, os.path.join(args.work_dir, "checkpoint-hf"), loaded.device, dtype)
    name = os.path.basename(os.path.normpath(args.checkpoint))
    out.append((f"{name} ({_num_params(loaded.model) / 1e6:.1f}M)", loaded, hf, prompts, args.max_new_tokens))
    if args.random_model:
        with open(args.random_model) as f:
            shape = dict(yaml.safe_load(f).get("model") or {})
        shape["seq_length"] = args.random_seq_length
        base = os.path.splitext(os.path.basename(args.random_model))[0]
        export = random_export(
            args.checkpoint, os.path.join(args.work_dir, f"random-{base}"), shape, args.random_vocab_size
        )
        rand = load_model(export, device=args.device, dtype=dtype)
        rand_hf = hf_model(export, os.path.join(args.work_dir, f"random-{base}-hf"), rand.device, dtype)
        text = [PROMPTS[1 + i % (len(PROMPTS) - 1)] for i in range(args.num_prompts)]
        label = f"random {base} shape, seq {args.random_seq_length} ({_num_params(rand.model) / 1e6:.0f}M)"
        out.append((label, rand, rand_hf, text, args.random_max_new_tokens))
    return out


def _num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _anchor(args, dtype) -> int:
    import dataclasses

    import torch

    from card_megatron.inference.causal import CausalDecodeConfig
    from card_megatron.inference.generate import GenerationConfig
    from card_megatron.inference.sampling import SamplingConfig
    from card_megatron.interop.anchor import run_anchor

    with contextlib.redirect_stdout(sys.stderr):
        models = _anchor_models(args, dtype)
    greedy = SamplingConfig(greedy=True)
    header = (
        "| model | batch | setting | tokens/forward | tokens/s | vs transformers (wall) | vs transformers (CPU time) "
        "| same tokens as transformers |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    lines = [header]
    print(header, flush=True)
    all_rows = []
    for label, loaded, hf, prompts, max_new in models:
        for batch in args.batch_sizes:
            n = args.num_prompts if batch > 1 or label == models[0][0] else args.random_num_prompts
            use = prompts[: max(n, batch)] if len(prompts) >= batch else prompts
            base = GenerationConfig(max_new_tokens=max_new, batch_size=batch, sampling=greedy)
            settings = [
                ("ours AR", dataclasses.replace(base, decoding="ar")),
                (
                    "ours AR, Megatron modules",
                    dataclasses.replace(base, decoding="ar", causal=CausalDecodeConfig(lean=False)),
                ),
                (
                    f"ours CARD tau 0.9, K {args.window}",
                    dataclasses.replace(base, decoding="card", causal=CausalDecodeConfig(window=args.window)),
                ),
                (
                    f"ours CARD verify, K {args.window}",
                    dataclasses.replace(
                        base, decoding="card", causal=CausalDecodeConfig(window=args.window, commit_policy="verify")
                    ),
                ),
            ]
            if args.cuda_graphs:  # each lean setting followed by its twin with static shapes and CUDA graphs
                twins = []
                for name, cfg in settings:
                    twins.append((name, cfg))
                    if cfg.causal.lean:
                        twins.append((f"{name}, CUDA graphs", _graphs_config(cfg)))
                settings = twins
            rows = run_anchor(loaded, hf, use, batch, max_new, settings, args.repeats)
            for r in rows:
                r["model"] = label
                line = (
                    f"| {label} | {batch} | {r['setting']} | {r['tokens_per_forward']:.2f} | "
                    f"{r['tokens_per_second']:.1f} | {r['vs_transformers']:.2f} | {r['cpu_vs_transformers']:.2f} | "
                    f"{r['same_as_transformers']:.0%} |"
                )
                lines.append(line)
                print(line, flush=True)
            all_rows += rows
    meta = (
        f"device {models[0][1].device}, {args.dtype}, torch threads {torch.get_num_threads()}, greedy, "
        f"fastest of {args.repeats} round-robin repeats after a warm-up, {time.strftime('%Y-%m-%d %H:%M %Z')}, "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    print(meta, file=sys.stderr)
    from card_megatron.fileio import atomic_write

    if args.markdown:
        atomic_write(args.markdown, "\n".join(lines) + "\n\n" + meta + "\n")
    if args.json:
        atomic_write(args.json, json.dumps({"meta": meta, "args": vars(args), "rows": all_rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
