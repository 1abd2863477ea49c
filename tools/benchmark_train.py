#!/usr/bin/env python
"""Step time, tokens/s and peak memory of each objective on the same model and batches; with
--anchor, our training step against the best plain-PyTorch step for the same model.

Each objective runs in its own child process (so peak memory is its own), on the same
random token batches, with the same model (the demo model by default, or --config).
A step is what the trainer does per micro-batch: objective.prepare, forward,
vocab-parallel cross entropy, objective.loss, backward, AdamW step.

Prints a table, the ratios (CARD/ARM, BD3LM/CARD, ...), and, as its last line, a JSON
object with every objective's step time. Never asserts on time.

--anchor (one child process, steps interleaved): "ours" is ``Trainer.train_step`` (the data
pipeline, the objective, the DeepSpeed engine over Megatron-core layers, the chunked loss),
on a corpus tokenized into a temporary directory and a model of --vocab-size; the anchors
are the same decoder in plain PyTorch (``PlainDecoder``) and ``transformers``'
``LlamaForCausalLM`` (SDPA), each with fused AdamW and ``F.cross_entropy`` on the same token
batches, precision and threads. Prints our tokens/s as a ratio to the faster anchor, and with
--profile N a self-CPU-time breakdown per step by category.

    python tools/benchmark_train.py                       # demo model, CPU
    python tools/benchmark_train.py --config configs/gpt-350m.yaml --device cuda --steps 20
    python tools/benchmark_train.py --anchor --config configs/gpt-125m.yaml --seq-length 128 --profile 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

from card_megatron.objectives import objective_names  # noqa: E402
from card_megatron.training.metrics import model_flops_per_token, peak_flops  # noqa: E402

# ARM first: the other objectives' step times are reported as ratios to it.
REFERENCE = "arm"
OBJECTIVES = (REFERENCE, *(name for name in objective_names() if name != REFERENCE))


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
    p.add_argument("--anchor", action="store_true", help="time our Trainer's step against plain-PyTorch steps")
    p.add_argument("--objective", default="arm", help="--anchor: our objective (arm: the anchors' loss)")
    p.add_argument("--threads", type=int, default=1, help="--anchor: torch threads for every contender (CPU)")
    p.add_argument(
        "--anchors", default="plain,transformers", help="--anchor: comma-separated plain-PyTorch steps to time"
    )
    p.add_argument("--profile", type=int, default=0, help="--anchor: profile this many more steps of each")
    p.add_argument("--override", action="append", default=[], help="--anchor: a config override key=value (repeatable)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-anchor", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def child(args) -> dict:
    import resource

    from card_megatron import cli

    cli.start_logging(None)  # the start-up note, before Megatron-core is imported
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
    if args.child_anchor:
        print(json.dumps(anchor_child(args)))
        return 0
    repo = REPO
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if args.anchor:
        if args.device == "cpu":
            env["OMP_NUM_THREADS"] = str(args.threads)
        cmd = [sys.executable, os.path.abspath(__file__), "--child-anchor", *_argv_without_anchor(argv)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        print_anchor(json.loads(out.stdout.strip().splitlines()[-1]))
        return 0
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


# ---------------------------------------------------------------------------------------- --anchor
# Our training step (the Trainer: data, objective, DeepSpeed engine, Megatron-core layers, loss)
# against the best plain-PyTorch step for the same shape, interleaved in one process.


class PlainDecoder(torch.nn.Module):
    """The same Llama-style decoder in plain PyTorch: fused QKV and gate/up projections, RoPE,
    SDPA with a causal mask, RMSNorm (``F.rms_norm``), untied head. forward(ids [B, S]) -> [B, S, V]."""

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, ffn: int, seq: int, eps: float, base: int):
        super().__init__()
        nn = torch.nn
        self.heads, self.ffn, self.eps = heads, ffn, eps
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm1": nn.RMSNorm(hidden, eps=eps),
                    "qkv": nn.Linear(hidden, 3 * hidden, bias=False),
                    "proj": nn.Linear(hidden, hidden, bias=False),
                    "norm2": nn.RMSNorm(hidden, eps=eps),
                    "fc1": nn.Linear(hidden, 2 * ffn, bias=False),
                    "fc2": nn.Linear(ffn, hidden, bias=False),
                }
            )
            for _ in range(layers)
        )
        self.norm = nn.RMSNorm(hidden, eps=eps)
        self.head = nn.Linear(hidden, vocab, bias=False)
        d = hidden // heads
        inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", torch.cat((freqs, freqs), -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat((freqs, freqs), -1).sin(), persistent=False)

    def _rope(self, x):  # [B, h, S, d]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        s = x.shape[2]
        return x * self.cos[:s] + rotated * self.sin[:s]

    def forward(self, ids):
        F = torch.nn.functional
        x = self.embed(ids)
        b, s, h = x.shape
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["norm1"](x)).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(self._rope(q), self._rope(k), v, is_causal=True)
            x = x + blk["proj"](a.transpose(1, 2).reshape(b, s, h))
            gate, up = blk["fc1"](blk["norm2"](x)).split(self.ffn, dim=-1)
            x = x + blk["fc2"](F.silu(gate) * up)
        return self.head(self.norm(x))


def _anchor_models(m, vocab: int, names: list[str]):
    """The plain-PyTorch candidates ``names`` (plain, transformers) for model config ``m``:
    (name, module, ids -> logits), each trained the same way."""
    from transformers import LlamaConfig, LlamaForCausalLM

    unknown = set(names) - {"plain", "transformers"}
    if unknown or not names:
        raise SystemExit(f"--anchors {','.join(names)}: choose among plain, transformers")
    ffn = m.ffn_hidden_size or 4 * m.hidden_size
    out = []
    if "plain" in names:
        if m.num_query_groups not in (None, m.num_attention_heads):
            raise SystemExit("--anchors plain: PlainDecoder has no grouped-query attention; use transformers")
        plain = PlainDecoder(
            vocab, m.hidden_size, m.num_layers, m.num_attention_heads, ffn, m.seq_length, m.norm_epsilon, m.rotary_base
        )
        out.append(("plain", plain, plain))
    if "transformers" not in names:
        return out
    hf_config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=m.hidden_size,
        intermediate_size=ffn,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        head_dim=m.hidden_size // m.num_attention_heads,
        max_position_embeddings=m.seq_length,
        rms_norm_eps=m.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)},
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        attn_implementation="sdpa",
    )
    hf = LlamaForCausalLM(hf_config)
    return out + [("transformers", hf, lambda ids: hf(input_ids=ids).logits)]


LOSS_OPS = ("cross_entropy", "nll_loss", "log_softmax", "_ChunkedNLL", "logsumexp")
CATEGORIES = ("matmul", "attention", "loss", "optimizer", "elementwise", "communication", "other")
# and, on CUDA, "idle"


def _category(event) -> str:
    """The category of a profiler event by its own name and its ancestors' (self CPU time)."""
    names = []
    e = event
    while e is not None:
        names.append(e.name)
        e = e.cpu_parent
    if any("Optimizer.step" in n for n in names):
        return "optimizer"
    if any(op in n for n in names for op in LOSS_OPS) or any(n == "loss" for n in names):
        return "loss"
    if any("scaled_dot_product" in n for n in names):
        return "attention"
    own = event.name
    if own.startswith(("c10d::", "gloo:", "record_param_comms")) or "all_reduce" in own:
        return "communication"
    if own in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
        return "matmul"
    if own.startswith("aten::") and own not in ("aten::empty", "aten::view", "aten::as_strided", "aten::detach"):
        return "elementwise"
    return "other"


def profile_categories(step, steps: int, cuda: bool = False) -> dict[str, float]:
    """Seconds per step of ``step()`` by category (:data:`CATEGORIES`): self CPU time, or on CUDA
    the device time of the kernels each operator launched, plus "idle" (wall time the device did
    not spend in kernels: host overhead, launches, synchronisation)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    out = dict.fromkeys(CATEGORIES, 0.0)
    for e in prof.events():
        if cuda and e.device_type != torch.autograd.DeviceType.CPU:
            continue  # kernels are counted through the operator that launched them
        out[_category(e)] += (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e6 / steps
    if cuda:
        out["idle"] = max(0.0, wall / steps - sum(out.values()))
    return out


def anchor_child(args) -> dict:
    """Times our Trainer's step and each plain-PyTorch step, interleaved; returns their median times."""
    import tempfile

    from card_megatron import cli

    cli.start_logging(None)  # the start-up note, before Megatron-core is imported
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    from card_megatron.config import load_config
    from card_megatron.training.trainer import Trainer

    tmp = tempfile.mkdtemp(prefix="card_anchor_")
    try:
        prefix = os.path.join(tmp, "docs")
        subprocess.run(
            [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", "builtin:python-docs",
             "--train-tokenizer", "--vocab-size", "1024", "--output-prefix", prefix, "--workers", "1"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        B = args.micro_batch_size or 8
        overrides = [
            "objective.name=" + args.objective,
            f"model.seq_length={args.seq_length or 128}",
            f"model.vocab_size={args.vocab_size}",
            f"train.micro_batch_size={B}",
            f"train.global_batch_size={B}",
            f"train.train_iters={10**6}",
            f"train.log_interval={10**6}",
            "train.eval_iters=1",
            f"train.precision={args.precision}",
            f"train.run_dir={os.path.join(tmp, 'run')}",
            f"data.data_path={prefix}_text_document",
            f"data.tokenizer_model={prefix}.model",
            "logging.wandb=false",
            *args.override,
        ]
        cfg = load_config(args.config, overrides)
        trainer = Trainer(cfg)
        L, V = cfg.model.seq_length, trainer.vocab_size
        device = trainer.info.device
        if device.type != args.device:
            raise SystemExit(f"--device {args.device}, but the trainer runs on {device}")
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[trainer.precision]
        batches = [b["tokens"] for b in trainer.batches.micro_batches("train", 0, 4)]  # already on the device
        counter = itertools.count()
        contenders = {"ours": trainer.train_step}
        params = {"ours": trainer.num_params}
        for name, model, logits_of in _anchor_models(cfg.model, V, args.anchors.split(",")):
            model.to(device).train()
            params[name] = sum(p.numel() for p in model.parameters())
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

            def step(logits_of=logits_of, optimizer=optimizer):
                tokens = batches[next(counter) % len(batches)]
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    logits = logits_of(tokens[:, :-1])
                with torch.profiler.record_function("loss"):
                    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V).float(), tokens[:, 1:].reshape(-1))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            contenders[name] = step
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for step in contenders.values():
            for _ in range(args.warmup):
                step()
        times = {name: [] for name in contenders}
        for _ in range(args.steps):
            for name, step in contenders.items():
                sync()
                t0 = time.perf_counter()
                step()
                sync()
                times[name].append(time.perf_counter() - t0)
        median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
        result = {
            "config": args.config,
            "shape": f"{cfg.model.num_layers} layers x {cfg.model.hidden_size}, vocab {V}, {B} x {L}",
            "precision": trainer.precision,
            "threads": torch.get_num_threads(),
            "params": params,
            "step_time_s": median,
            "tokens": B * L,
            "load_average": os.getloadavg(),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        }
        peak = peak_flops(result["device"]) if device.type == "cuda" else None
        if peak:  # model FLOPs utilisation, as the trainer logs it
            flops = model_flops_per_token(trainer.num_params, cfg.model.num_layers, cfg.model.hidden_size, L)
            result["mfu"] = {name: B * L / t * flops / peak for name, t in median.items()}
        if args.profile:
            real_nll = trainer.losses.nll

            def nll(*a):
                with torch.profiler.record_function("loss"):
                    return real_nll(*a)

            trainer.losses.nll = nll
            result["profile_s"] = {
                name: profile_categories(step, args.profile, device.type == "cuda") for name, step in contenders.items()
            }
        trainer.close()
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def print_anchor(r: dict) -> None:
    median = r["step_time_s"]
    anchors = [n for n in median if n != "ours"]
    best = min(anchors, key=lambda n: median[n])
    print(
        f"{r['config']}: {r['shape']}, {r['precision']}, {r['threads']} thread(s), median of interleaved steps, "
        f"load average {r['load_average'][0]:.1f}"
    )
    print(f"{'step':<14} {'params':>12} {'step ms':>10} {'tokens/s':>10}")
    for name, t in median.items():
        print(f"{name:<14} {r['params'][name]:>12,} {1000 * t:>10.1f} {r['tokens'] / t:>10,.0f}")
    ratio = median[best] / median["ours"]
    print(f"ours / anchor ({best}) tokens/s: {ratio:.3f}  (goal >= 0.95)")
    if "mfu" in r:
        print("MFU on " + r["device"] + ": " + ", ".join(f"{n} {100 * v:.1f}%" for n, v in r["mfu"].items()))
    if "profile_s" in r:
        columns = list(next(iter(r["profile_s"].values())))
        what = "self CPU" if r["device"] == "cpu" else "device"
        print(f"profile, {what} ms per step:  " + " ".join(f"{c:>10}" for c in columns))
        for name, cats in r["profile_s"].items():
            print(f"  {name:<28}" + " ".join(f"{1000 * cats[c]:>10.1f}" for c in columns))
    print(json.dumps({**r, "anchor": best, "ratio": ratio}))


def _argv_without_anchor(argv) -> list[str]:
    return [a for a in (sys.argv[1:] if argv is None else argv) if a != "--anchor"]


if __name__ == "__main__":
    sys.exit(main())
