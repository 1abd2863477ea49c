#!/usr/bin/env python
"""Peak memory and time of the output head and loss: Megatron-core's cross entropy against ours.

"megatron" is the loss before issue 23 (a float32 copy of the logits, then
``tensor_parallel.vocab_parallel_cross_entropy``); "chunked" is ``per_token_nll`` now
(``model/cross_entropy.py``). Each measurement runs in a child process: the head's matmul
(hidden [N, H] x weight [V, H]), the per-token loss, a weighted sum, backward. Peak memory is
the rise of the process's resident set (VmHWM, reset before the head) above what it held
before, so it includes the logits and the gradients of hidden and weight; allocations go
through mmap (MALLOC_MMAP_THRESHOLD_) so freed memory leaves the resident set. Prints a table
and, last, a JSON line; never asserts.

    python tools/benchmark_loss.py --vocab-sizes 49152 131072 --tokens 1024 --hidden 768
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

IMPLEMENTATIONS = ("megatron", "chunked")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab-sizes", type=int, nargs="+", default=[49152, 131072], help="vocabulary sizes to measure")
    p.add_argument("--tokens", type=int, default=1024, help="N: tokens per micro-batch (batch x sequence)")
    p.add_argument("--hidden", type=int, default=768, help="H: hidden size of the head")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], help="logit dtypes: fp32, bf16")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per child (the fastest is kept)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--child", nargs=3, metavar=("IMPL", "VOCAB", "DTYPE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(impl: str, vocab: int, dtype_name: str, args) -> dict:
    from card_megatron import cli

    cli.start_logging(None)  # the start-up note, before Megatron-core is imported
    import torch

    from card_megatron.parallel.state import init_single_process

    init_single_process()
    from megatron.core import tensor_parallel

    from card_megatron.model.gpt import per_token_nll

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    g = torch.Generator().manual_seed(0)
    n = args.tokens
    hidden = (torch.randn(n, 1, args.hidden, generator=g)).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, args.hidden, generator=g) * 0.02).to(dtype).requires_grad_(True)
    targets = torch.randint(0, vocab, (1, n), generator=g)
    weights = torch.rand(1, n, generator=g)

    def step():
        logits = hidden @ weight.t()  # [N, 1, V]: the head's output, [S, B, V]
        if impl == "megatron":
            nll = tensor_parallel.vocab_parallel_cross_entropy(
                logits.float().contiguous(), targets.t().contiguous()
            ).t()
        else:
            nll = per_token_nll(logits, targets)
        (nll * weights).sum().backward()
        hidden.grad = weight.grad = None

    step()  # warm-up: first-call allocations and kernels
    times, peaks = [], []
    for _ in range(args.repeats):
        before = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        peaks.append(_rss_kib("VmHWM") - before)
    return {"impl": impl, "vocab": vocab, "dtype": dtype_name, "time_s": min(times), "peak_mib": max(peaks) / 1024}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        impl, vocab, dtype = args.child
        print(json.dumps(child(impl, int(vocab), dtype, args)))
        return 0
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        **os.environ,
        "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": str(args.threads),
    }
    rows = []
    for vocab in args.vocab_sizes:
        for dtype in args.dtypes:
            for impl in IMPLEMENTATIONS:
                cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, str(vocab), dtype]
                cmd += ["--tokens", str(args.tokens), "--hidden", str(args.hidden)]
                cmd += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return 1
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"head + loss, N = {args.tokens} tokens, H = {args.hidden}, {args.threads} thread(s), fastest of {args.repeats}"
    )
    print(f"{'vocab':>7} {'dtype':>5} {'impl':>9} {'peak MiB':>9} {'logits MiB':>10} {'ms':>8}")
    for r in rows:
        logits_mib = args.tokens * r["vocab"] * (4 if r["dtype"] == "fp32" else 2) / 2**20
        print(
            f"{r['vocab']:>7} {r['dtype']:>5} {r['impl']:>9} {r['peak_mib']:>9.0f} {logits_mib:>10.0f} "
            f"{1000 * r['time_s']:>8.1f}"
        )
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
