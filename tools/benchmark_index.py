"""Benchmark of the sample index: build time and peak memory against Megatron-core, read rate.

1. A synthetic corpus of ``--tokens`` tokens (log-normal document lengths, mean about
   ``--mean-doc`` tokens), one epoch, sequence length ``--seq-length``. Each measurement runs
   in its own child process (peak memory = that child's ru_maxrss, inputs included):
     ours/seeds   build_sample_index + noise_seeds on a given document index
     ours/full    document index + sample index + shuffle index + noise seeds
     megatron     helpers.build_sample_idx on the same sizes and document index
     megatron/full  NumPy document shuffle + build_sample_idx + NumPy sample shuffle
                    (what Megatron's GPTDataset does; no noise seeds)
2. Random-access reads of ``dataset[k]`` (L = 1024) through build_datasets on a real
   ~200 MB shard written to a temp dir, with a warm page cache.

Prints numbers and ratios; asserts nothing. Run: PYTHONPATH=$PWD python tools/benchmark_index.py
"""

from __future__ import annotations

import argparse
import glob
import importlib.machinery
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def synthetic_sizes(num_tokens: int, mean_doc: float, seed: int = 0) -> np.ndarray:
    """int32 document lengths, log-normal with sigma 1 and the given mean, summing to ~num_tokens."""
    sigma = 1.0
    mu = np.log(mean_doc) - sigma**2 / 2
    num_docs = int(num_tokens / mean_doc)
    rng = np.random.default_rng(seed)
    sizes = np.empty(num_docs, dtype=np.int32)
    chunk = 1 << 20
    for start in range(0, num_docs, chunk):  # in chunks: keep float64 temporaries small
        n = min(chunk, num_docs - start)
        sizes[start : start + n] = np.clip(rng.lognormal(mu, sigma, n), 1, 1 << 20).astype(np.int32)
    return sizes


def megatron_helpers():
    """Megatron-core's compiled helpers, loaded without importing megatron (and torch)."""
    spec = importlib.util.find_spec("megatron")
    root = list(spec.submodule_search_locations)[0]  # megatron is a namespace package
    (path,) = glob.glob(os.path.join(root, "core", "datasets", "helpers_cpp*.so"))
    loader = importlib.machinery.ExtensionFileLoader("helpers_cpp", path)
    module_spec = importlib.util.spec_from_file_location("helpers_cpp", path, loader=loader)
    module = importlib.util.module_from_spec(module_spec)
    loader.exec_module(module)
    return module


def child(what: str, num_tokens: int, mean_doc: float, seq_length: int, repeats: int) -> dict:
    from card_megatron.data import index as idx

    sizes = synthetic_sizes(num_tokens, mean_doc)
    tokens = int(sizes.sum(dtype=np.int64))
    n = (tokens - 1) // seq_length
    doc_key = idx.shuffle_key(1234, 0, 0, 1)
    document_index = None
    if what in ("ours/seeds", "megatron"):  # the shared input: one shuffled epoch of documents
        document_index = idx.build_document_index(0, len(sizes), 1, doc_key)
    helpers = megatron_helpers() if what.startswith("megatron") else None
    rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def run() -> tuple:
        if what == "ours/seeds":
            return (
                idx.build_sample_index(sizes, document_index, seq_length, n),
                idx.noise_seeds(1234, 0, n),
            )
        if what == "ours/full":
            doc = idx.build_document_index(0, len(sizes), 1, doc_key)
            return (
                doc,
                idx.build_sample_index(sizes, doc, seq_length, n),
                idx.build_shuffle_index(idx.epoch_sample_starts(tokens, seq_length, 1), 99),
                idx.noise_seeds(1234, 0, n),
            )
        if what == "megatron":
            return (helpers.build_sample_idx_int32(sizes, document_index, seq_length, 1, tokens, True, 1),)
        if what == "megatron/full":
            rs = np.random.RandomState(1234)
            doc = np.arange(len(sizes), dtype=np.int32)
            rs.shuffle(doc)
            sample_index = helpers.build_sample_idx_int32(sizes, doc, seq_length, 1, tokens, True, 1)
            shuffle = np.arange(sample_index.shape[0] - 1, dtype=np.uint32)
            rs.shuffle(shuffle)
            return doc, sample_index, shuffle
        raise ValueError(what)

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
        del out  # the next repeat starts from the inputs alone
    return {
        "what": what,
        "seconds": min(times),
        "all_seconds": times,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_inputs_mb": rss_inputs,
        "num_docs": len(sizes),
        "num_tokens": tokens,
        "num_samples": n,
    }


def measure(what: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--tokens", str(args.tokens), "--mean-doc",
           str(args.mean_doc), "--seq-length", str(args.seq_length), "--repeats", str(args.repeats)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"measurement {what!r} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def read_benchmark(shard_tokens: int, seq_length: int, num_reads: int) -> dict:
    """Builds a real shard in a temp dir, indexes it, and times random dataset[k] reads."""
    from card_megatron import cli

    cli.start_logging(None)  # the start-up note, before Megatron-core is imported
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from card_megatron.config import DataConfig
    from card_megatron.data.dataset import build_datasets

    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "bench_text_document")
        sizes = synthetic_sizes(shard_tokens, 1500.0, seed=1)
        rng = np.random.default_rng(2)
        tokens = rng.integers(0, 32000, size=int(sizes.sum()), dtype=np.uint16)
        start = time.perf_counter()
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        offset = 0
        for n in sizes.tolist():
            builder.add_document(tokens[offset : offset + n], [n])
            offset += n
        builder.finalize(prefix + ".idx")
        write_s = time.perf_counter() - start
        bin_mb = os.path.getsize(prefix + ".bin") / 1e6
        num_samples = (offset - 1) // seq_length
        cfg = DataConfig(data_path=prefix, split="1,0,0", cache_dir=os.path.join(tmp, "cache"))
        start = time.perf_counter()
        ds = build_datasets(cfg, seq_length, 1234, {"train": num_samples})["train"]
        build_s = time.perf_counter() - start
        with open(prefix + ".bin", "rb") as f:  # warm the page cache
            while f.read(1 << 24):
                pass
        ids = rng.integers(0, len(ds), size=num_reads)
        for k in ids[:1000]:
            ds[int(k)]
        start = time.perf_counter()
        for k in ids:
            ds[int(k)]
        read_s = time.perf_counter() - start
    return {"bin_mb": bin_mb, "write_s": write_s, "build_s": build_s, "num_samples": num_samples,
            "reads_per_s": num_reads / read_s, "us_per_read": 1e6 * read_s / num_reads}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=10_000_000_000, help="synthetic corpus size in tokens")
    p.add_argument("--mean-doc", type=float, default=1500.0, help="mean document length in tokens")
    p.add_argument("--seq-length", type=int, default=1024, help="sequence length L (samples hold L+1)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (min is kept)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens of the real shard (uint16)")
    p.add_argument("--reads", type=int, default=20000, help="random sample reads to time")
    p.add_argument("--skip-reads", action="store_true", help="only the index build benchmark")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.mean_doc, args.seq_length, args.repeats)))
        return

    print(f"machine: {os.cpu_count()} cpus; corpus {args.tokens / 1e9:.1f}B tokens, mean doc "
          f"{args.mean_doc:.0f}, L={args.seq_length}, one epoch, min of {args.repeats}")  # fmt: skip
    results = {w: measure(w, args) for w in ("megatron", "ours/seeds", "megatron/full", "ours/full")}
    first = results["megatron"]
    print(f"documents {first['num_docs']:,}  tokens {first['num_tokens']:,}  samples {first['num_samples']:,}")
    for w, r in results.items():
        print(f"  {w:14s} {r['seconds']:7.3f} s   peak RSS {r['peak_rss_mb']:7.0f} MB "
              f"(after inputs {r['rss_after_inputs_mb']:.0f} MB)")  # fmt: skip
    ours, theirs = results["ours/seeds"]["seconds"], results["megatron"]["seconds"]
    print(f"ratio sample index + seeds / megatron build_sample_idx: {ours / theirs:.2f}  (target <= 1.2)")
    print(f"ratio full index + seeds / megatron build_sample_idx: {results['ours/full']['seconds'] / theirs:.2f}")
    print(f"ratio full index + seeds / megatron GPTDataset path (doc shuffle + sample idx + shuffle): "
          f"{results['ours/full']['seconds'] / results['megatron/full']['seconds']:.2f}")  # fmt: skip
    peak = max(r["peak_rss_mb"] for w, r in results.items() if w.startswith("ours"))
    print(f"peak memory of our builds: {peak:.0f} MB (target < 2048 MB)")
    if not args.skip_reads:
        r = read_benchmark(args.shard_tokens, 1024, args.reads)
        print(f"real shard {r['bin_mb']:.0f} MB (written in {r['write_s']:.1f} s), index of "
              f"{r['num_samples']:,} samples built in {r['build_s']:.2f} s")  # fmt: skip
        print(f"random dataset[k] reads, L=1024, warm cache: {r['reads_per_s']:,.0f} samples/s "
              f"({r['us_per_read']:.1f} us each)")  # fmt: skip


if __name__ == "__main__":
    main()
