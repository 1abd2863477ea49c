#!/usr/bin/env python
"""Step time, tokens/s and peak memory of each objective on the same model and batches.

Each objective runs in its own child process (so peak memory is its own), on the same
random token batches, with the same model (the demo model by default, or --config).
A step is what the trainer does per micro-batch: objective.prepare, forward,
vocab-parallel cross entropy, objective.loss, backward, AdamW step.

Prints a table, the ratios (CARD/ARM, BD3LM/CARD, ...), and, as its last line, a JSON
object with every objective's step time. Never asserts on time.

    python tools/benchmark_train.py                       # demo model, CPU
    python tools/benchmark_train.py --config configs/gpt-350m.yaml --device cuda --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from card_megatron.config import OBJECTIVES

# ARM first: the other objectives' step times are reported as ratios to it.
OBJECTIVES = ("arm", *(name for name in OBJECTIVES if name != "arm"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny-cpu.yaml", help="model config (YAML) to benchmark")
    p.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated objectives to compare")
    p.add_argument("--steps", type=int, default=10, help="timed steps per objective")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--micro-batch-size", type=int, default=None, help="default: train.micro_batch_size")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size of the benchmark model")
    p.add_argument("--seq-length", type=int, default=None, help="default: model.seq_length of the config")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu or cuda")
    p.add_argument("--precision", default="auto", help="auto (bf16 on cuda, fp32 on cpu), bf16 or fp32")
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="run the objectives this many times, interleaved, and keep each one's best",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def child(args) -> dict:
    import resource

    from card_megatron import quiet_warnings

    quiet_warnings.install()
    import torch

    from card_megatron.config import ParallelConfig, load_config
    from card_megatron.parallel.state import init_distributed

    init_distributed(ParallelConfig())
    from card_megatron.model.gpt import CardGPT, padded_vocab_size, per_token_nll
    from card_megatron.objectives import build_objective

    overrides = [f"objective.name={args.child}"]
    if args.seq_length:
        overrides.append(f"model.seq_length={args.seq_length}")
    cfg = load_config(args.config, overrides)
    device = torch.device(args.device)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    L = cfg.model.seq_length
    B = args.micro_batch_size or cfg.train.micro_batch_size
    vocab = padded_vocab_size(args.vocab_size + 1, cfg.model.make_vocab_size_divisible_by, 1)
    mask_id = args.vocab_size
    objective = build_objective(cfg.objective, L, mask_id, args.vocab_size + 1)
    model = CardGPT(cfg.model, objective.mask_kind, vocab, seed=cfg.train.seed).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randint(0, args.vocab_size, (B, L + 1), generator=g),
            torch.randint(-(2**62), 2**62, (B,), generator=g),
            torch.arange(i * B, (i + 1) * B),
        )
        for i in range(4)
    ]
    batches = [tuple(t.to(device) for t in b) for b in batches]

    def step(i):
        tokens, seeds, ids = batches[i % len(batches)]
        mi, li = objective.prepare(tokens, seeds, ids)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(mi.input_ids, mi.position_ids, mi.attention_mask)
        nll = per_token_nll(logits, li.targets, mask_id if li.suppress_mask_logit else None)
        loss, _ = objective.loss(nll, li)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(args.warmup):
        step(i)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(i)
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    tokens = B * L  # clean tokens of data consumed per step (BD3LM processes 2x as many positions)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "objective": args.child,
        "step_time_s": median,
        "tokens_per_sec": tokens / median,
        "peak_memory_gb": peak,
        "params": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "precision": precision,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    names = [n for n in args.objectives.split(",") if n]
    results: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name in names:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--child",
                name,
                "--config",
                args.config,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--device",
                args.device,
                "--precision",
                args.precision,
                "--vocab-size",
                str(args.vocab_size),
            ]
            if args.micro_batch_size:
                cmd += ["--micro-batch-size", str(args.micro_batch_size)]
            if args.seq_length:
                cmd += ["--seq-length", str(args.seq_length)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            r = json.loads(out.stdout.strip().splitlines()[-1])
            best = results.get(name)
            if best is None or r["step_time_s"] < best["step_time_s"]:
                results[name] = r
    first = results[names[0]]
    print(
        f"model: {first['params'] / 1e6:.1f}M parameters, {args.config}, device {first['device']}, "
        f"{first['precision']}, best of {args.rounds} rounds x median of {args.steps} steps"
    )
    print(f"{'objective':<10} {'step ms':>10} {'tokens/s':>12} {'peak mem GB':>12}")
    for name in names:
        r = results[name]
        print(f"{name:<10} {1000 * r['step_time_s']:>10.1f} {r['tokens_per_sec']:>12,.0f} {r['peak_memory_gb']:>12.3f}")
    ratios = {}
    for a, b in (("card", "arm"), ("mdlm", "arm"), ("bd3lm", "arm"), ("bd3lm", "card")):
        if a in results and b in results:
            ratios[f"{a}/{b}_step_time"] = results[a]["step_time_s"] / results[b]["step_time_s"]
            ratios[f"{a}/{b}_peak_memory"] = results[a]["peak_memory_gb"] / results[b]["peak_memory_gb"]
    for k, v in ratios.items():
        print(f"{k:<28} {v:.3f}")
    if args.device == "cpu":
        print("note: on CPU, peak memory is the child process's max RSS (includes the Python/torch runtime)")
    print(json.dumps({"step_time_s": {n: results[n]["step_time_s"] for n in names}, **ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
