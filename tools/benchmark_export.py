#!/usr/bin/env python
"""Save time and peak memory of a checkpoint's export, before and after the sharded export, side by side.

  python tools/benchmark_export.py --config configs/gpt-350m.yaml --tp 2 --pp 2 --repeats 2

Each measurement is a fresh ``torchrun`` of TP x PP processes (gloo, CPU) that builds the config's
model the way the trainer does (``CardGPT``, or the pipeline stages under PP > 1), resets its
peak-RSS mark (``/proc/self/clear_refs``), writes one export and reports the seconds (the slowest
rank, from a barrier before to a barrier after) and each rank's peak RSS during the export:

* ``before``: the old method, kept here only for comparison (the library no longer has it: it was
  ``Checkpoints._gather`` with ``checkpoint_contents.write_export_stage`` and ``merge_export``): every
  rank gathers its stage's canonical weights over tensor parallelism
  (``model.export.gather_canonical_state``), TP rank 0 of each stage ``torch.save``s them, and after a
  barrier rank 0 loads every stage file, merges them and writes one ``model.pt``;
* ``after``: what a save does now: every rank writes its own slice (``local_pieces`` and
  ``write_shards``), and rank 0 writes the index after a barrier (``write_index``).

The two run alternately (``--repeats`` times each); the table gives the best time, the peak RSS
over ranks, its sum over ranks, and the after/before ratios. Weights only (an EMA doubles both sides).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from card_megatron.config import ParallelConfig, load_config
    from card_megatron.model import sharded_export as sx
    from card_megatron.model.export import gather_canonical_state
    from card_megatron.model.gpt import CardGPT
    from card_megatron.model.pipeline import build_pipeline_model
    from card_megatron.parallel.state import init_distributed

    cfg = load_config(args.config, [])
    info = init_distributed(ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp))
    if args.pp == 1:
        model = CardGPT(cfg.model, "causal", args.vocab, args.tp, seed=1, tp_group=info.tp_group)
    else:
        model = build_pipeline_model(
            cfg.model, "causal", args.vocab, args.tp, args.pp, info.dp_size, 1, lambda *a: 0, tp_group=info.tp_group
        )
    layers = cfg.model.num_layers
    export_dir = os.path.join(args.out, "export")
    dist.barrier()
    reset = _reset_peak()
    base = _rss_kib("VmRSS")
    dist.barrier()
    start = time.perf_counter()
    if args.mode == "before":  # the old method (gather to one model.pt), for comparison only
        state = gather_canonical_state(model, layers, info.tp_group, info.tp_size)
        if info.tp_rank == 0 and info.dp_rank == 0:
            os.makedirs(export_dir, exist_ok=True)
            torch.save({"state_dict": state}, os.path.join(export_dir, f"stage_{info.pp_rank:03d}.pt"))
        del state
        dist.barrier()
        if info.rank == 0:
            merged = {}
            for i in range(info.pp_size):
                merged.update(
                    torch.load(os.path.join(export_dir, f"stage_{i:03d}.pt"), weights_only=True)["state_dict"]
                )
            torch.save({"state_dict": merged, "step": 0}, os.path.join(export_dir, "model.pt"))
            for i in range(info.pp_size):
                os.remove(os.path.join(export_dir, f"stage_{i:03d}.pt"))
            del merged
    else:
        part = sx.ShardPart(info.tp_rank, info.pp_rank, info.tp_size, info.pp_size, writes=info.dp_rank == 0)
        part.weights, part.pieces = sx.local_pieces(list(model.named_parameters()), layers, info.tp_rank, info.tp_size)
        sx.write_shards(export_dir, part)
        del part
        dist.barrier()
        if info.rank == 0:
            sx.write_index(export_dir, info.tp_size, info.pp_size, False, 0, {})
    dist.barrier()
    seconds = time.perf_counter() - start
    record = {
        "rank": info.rank,
        "seconds": seconds,
        "peak_kib": _rss_kib("VmHWM") if reset else None,
        "base_kib": base,
        "params": sum(p.numel() for p in model.parameters()),
    }
    with open(os.path.join(args.out, f"rank{info.rank}.json"), "w") as f:
        json.dump(record, f)
    if info.rank == 0:
        size = sum(os.path.getsize(os.path.join(export_dir, n)) for n in os.listdir(export_dir))
        with open(os.path.join(args.out, "export_bytes"), "w") as f:
            f.write(str(size))
    dist.barrier()
    dist.destroy_process_group()


def measure(args: argparse.Namespace, mode: str) -> dict:
    from card_megatron.parallel.ports import free_port

    out = tempfile.mkdtemp(prefix=f"export-{mode}-", dir=args.work_dir)
    try:
        cmd = [
            os.path.abspath(__file__),
            "--worker",
            "--mode",
            mode,
            "--out",
            out,
            "--config",
            args.config,
            "--tp",
            str(args.tp),
            "--pp",
            str(args.pp),
            "--vocab",
            str(args.vocab),
        ]
        n = args.tp * args.pp
        launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}"]
        launch += ["--master-addr=127.0.0.1", f"--master-port={free_port()}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
        proc = subprocess.run(launch + cmd, capture_output=True, text=True, cwd=REPO, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{proc.stderr[-4000:]}")
        ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(n)]
        return {
            "seconds": max(r["seconds"] for r in ranks),
            "peak_mib": max(r["peak_kib"] or 0 for r in ranks) / 1024,
            "sum_peak_mib": sum(r["peak_kib"] or 0 for r in ranks) / 1024,
            "extra_mib": max((r["peak_kib"] or 0) - r["base_kib"] for r in ranks) / 1024,
            "params": sum(r["params"] for r in ranks),
            "bytes": int(open(os.path.join(out, "export_bytes")).read()),
        }
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/gpt-350m.yaml", help="the model's shape (its model section)")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=2, help="pipeline-parallel size")
    p.add_argument("--vocab", type=int, default=32768, help="vocabulary rows")
    p.add_argument("--repeats", type=int, default=2, help="measurements of each side (alternating)")
    p.add_argument("--work-dir", default=None, help="where the exports are written (default: the temp dir)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["before", "after"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(args.repeats):
        for mode in runs:
            runs[mode].append(measure(args, mode))
            print(f"{mode}: {json.dumps(runs[mode][-1])}", file=sys.stderr, flush=True)
    best = {m: min(r, key=lambda x: x["seconds"]) for m, r in runs.items()}
    peak = {m: {k: max(x[k] for x in r) for k in ("peak_mib", "sum_peak_mib", "extra_mib")} for m, r in runs.items()}
    b, a = best["before"], best["after"]
    print(
        f"{args.config}: {b['params'] / 1e6:.0f}M parameters (fp32, {b['bytes'] / 2**20:.0f} MiB exported), "
        f"TP={args.tp} PP={args.pp}, {args.repeats} runs each, CPU, gloo"
    )
    print("| | before (gather, one model.pt) | after (shards + index) | after / before |")
    print("| --- | --- | --- | --- |")
    print(f"| export time, best (s) | {b['seconds']:.2f} | {a['seconds']:.2f} | {a['seconds'] / b['seconds']:.2f} |")
    for key, label in (
        ("peak_mib", "peak RSS, largest rank (MiB)"),
        ("extra_mib", "peak RSS above the model, largest rank (MiB)"),
        ("sum_peak_mib", "peak RSS, sum over ranks (MiB)"),
    ):
        ratio = peak["after"][key] / peak["before"][key] if peak["before"][key] else float("nan")
        print(f"| {label} | {peak['before'][key]:.0f} | {peak['after'][key]:.0f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
