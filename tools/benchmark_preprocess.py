#!/usr/bin/env python
"""Preprocessing throughput relative to raw SentencePiece encoding, measured side by side.

Builds a JSONL file (or, with --format, a FineWeb-layout Parquet file of 1000-row row groups
or a .jsonl.zst file) from the built-in corpus repeated to --size-mb, trains (or loads) a
SentencePiece model (or loads a tokenizer.json), then measures on the same documents:
  raw: a multiprocessing pool of --workers processes doing only ``sp.encode`` (batched,
       one thread each; for a tokenizer.json ``encode_batch_fast``), texts already in memory;
  end to end: ``tools/preprocess_data.py --workers N`` in a subprocess (reading, decompression, parsing,
       tokenization, shard writing, process start-up included).
Prints tokens/s of each and their ratio (target: >= 0.85), the same ratio in CPU seconds (less
sensitive to other load on the machine), and both again without the tool's fixed start-up
cost (measured by a one-document run). Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time

from card_megatron.data.corpus import builtin_documents
from card_megatron.data.shards import TokenShard
from card_megatron.tokenizers import load_tokenizer, tokenizer_from_serialized, train_tokenizer

_SP = {}
_TEXTS: list[str] = []  # inherited by the forked workers: the raw side ships no text at all


def _init(model_bytes: bytes) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process, as the tool's workers
    _SP["tok"] = tokenizer_from_serialized(model_bytes)


def _encode_only(span: tuple[int, int]) -> int:
    tok = _SP["tok"]
    if hasattr(tok, "hf"):  # a tokenizer.json: the library's fastest batch call, ids as Python lists
        encodings = tok.hf.encode_batch_fast(_TEXTS[span[0] : span[1]], add_special_tokens=False)
        return sum(len(e.ids) for e in encodings) + (span[1] - span[0])
    # numpy output is SentencePiece's cheapest form (no Python int objects)
    ids = tok.sp.encode(_TEXTS[span[0] : span[1]], return_type="numpy", num_threads=1)
    return sum(len(x) for x in ids) + (span[1] - span[0])  # + one eos per document, as the shards hold


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _spans(texts: list[str], target_bytes: int = 1 << 20):
    start, size = 0, 0
    for i, t in enumerate(texts):
        size += len(t)
        if size >= target_bytes:
            yield (start, i + 1)
            start, size = i + 1, 0
    if start < len(texts):
        yield (start, len(texts))


def _write_corpus(directory: str, texts: list[str], fmt: str) -> str:
    """The documents as one input file of format ``fmt``; returns its path."""
    os.makedirs(directory, exist_ok=True)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = os.path.join(directory, "corpus.parquet")
        n = len(texts)
        table = pa.table(
            {
                "text": texts,
                "id": [f"<urn:uuid:{i:012d}>" for i in range(n)],
                "dump": ["CC-MAIN-2024-10"] * n,
                "url": [f"https://example.org/{i}" for i in range(n)],
                "language": ["en"] * n,
                "token_count": list(range(n)),
            }
        )
        pq.write_table(table, path, row_group_size=1000, compression="snappy")
        return path
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode("utf-8")
    if fmt == "jsonl.zst":
        import zstandard

        path = os.path.join(directory, "corpus.jsonl.zst")
        with open(path, "wb") as f:
            f.write(zstandard.ZstdCompressor(level=3).compress(lines))
        return path
    path = os.path.join(directory, "corpus.jsonl")
    with open(path, "wb") as f:
        f.write(lines)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=float, default=50.0, help="corpus size in MB (default 50)")
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes for both sides (default: all CPUs)"
    )
    p.add_argument("--vocab-size", type=int, default=8000, help="vocabulary of the trained model (default 8000)")
    p.add_argument(
        "--tokenizer-model",
        help="use this model (SentencePiece .model or Hugging Face tokenizer.json) instead of training one",
    )
    p.add_argument("--repeats", type=int, default=2, help="measure each side this many times, keep the best")
    p.add_argument(
        "--format",
        choices=("jsonl", "parquet", "jsonl.zst"),
        default="jsonl",
        help="input format of the end-to-end side (default jsonl); parquet: FineWeb's columns, "
        "1000-row row groups, snappy",
    )
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        docs = list(builtin_documents())
        texts = _TEXTS
        size = 0
        while size < args.size_mb * 1e6:
            for d in docs:
                texts.append(d)
                size += len(d.encode("utf-8"))
                if size >= args.size_mb * 1e6:
                    break
        path = _write_corpus(tmp, texts, args.format)
        if args.tokenizer_model:
            tok = load_tokenizer(args.tokenizer_model)
            model = args.tokenizer_model
        else:
            model = os.path.join(tmp, "tok.model")
            tok = train_tokenizer(docs, model, args.vocab_size)
        print(
            f"corpus: {len(texts)} documents, {size / 1e6:.1f} MB as {args.format} "
            f"({os.path.getsize(path) / 1e6:.1f} MB on disk); tokenizer vocab {tok.vocab_size}; "
            f"workers {args.workers} (cpus {os.cpu_count()})"
        )

        raw_best = e2e_best = raw_cpu_best = e2e_cpu_best = None
        for r in range(args.repeats):
            ctx = mp.get_context("fork")
            c0 = _child_cpu()
            t0 = time.perf_counter()
            with ctx.Pool(args.workers, initializer=_init, initargs=(tok.serialized(),)) as pool:
                raw_tokens = sum(pool.imap(_encode_only, _spans(texts)))
                pool.close()
                pool.join()
            raw_s = time.perf_counter() - t0
            raw_best = raw_s if raw_best is None else min(raw_best, raw_s)
            raw_cpu = _child_cpu() - c0
            raw_cpu_best = raw_cpu if raw_cpu_best is None else min(raw_cpu_best, raw_cpu)

            prefix = os.path.join(tmp, f"out{r}")
            cmd = [
                sys.executable,
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "preprocess_data.py"),
                "--input",
                path,
                "--tokenizer-model",
                model,
                "--output-prefix",
                prefix,
                "--workers",
                str(args.workers),
                "--log-interval",
                "1e9",
            ]
            c0 = _child_cpu()
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
            e2e_s = time.perf_counter() - t0
            e2e_best = e2e_s if e2e_best is None else min(e2e_best, e2e_s)
            e2e_cpu = _child_cpu() - c0
            e2e_cpu_best = e2e_cpu if e2e_cpu_best is None else min(e2e_cpu_best, e2e_cpu)
            e2e_tokens = TokenShard(prefix + "_text_document").num_tokens
            if e2e_tokens != raw_tokens:
                print(f"warning: token counts differ (raw {raw_tokens}, end to end {e2e_tokens})")

        # The fixed start-up cost (interpreter, imports, tokenizer load, worker start), measured
        # with the same command on a one-document input, for the steady-state ratio.
        tiny = _write_corpus(os.path.join(tmp, "tiny"), texts[:1], args.format)
        startup_s = startup_cpu = None
        for r in range(args.repeats):
            cmd = [
                sys.executable,
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "preprocess_data.py"),
                "--input",
                tiny,
                "--tokenizer-model",
                model,
                "--output-prefix",
                os.path.join(tmp, f"tiny{r}"),
                "--workers",
                str(args.workers),
            ]
            c0 = _child_cpu()
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
            dt, dc = time.perf_counter() - t0, _child_cpu() - c0
            startup_s = dt if startup_s is None else min(startup_s, dt)
            startup_cpu = dc if startup_cpu is None else min(startup_cpu, dc)

        raw_tps = raw_tokens / raw_best
        e2e_tps = e2e_tokens / e2e_best
        print(
            f"raw sp.encode pool:        {raw_tokens} tokens in {raw_best:.2f} s = {raw_tps:,.0f} tokens/s "
            f"({size / 1e6 / raw_best:.2f} MB/s)"
        )
        print(
            f"preprocess_data.py (e2e):  {e2e_tokens} tokens in {e2e_best:.2f} s = {e2e_tps:,.0f} tokens/s "
            f"({size / 1e6 / e2e_best:.2f} MB/s)"
        )
        print(
            f"ratio end-to-end / raw encode: {e2e_tps / raw_tps:.3f}  (target >= 0.85; wall clock, best of "
            f"{args.repeats})"
        )
        # CPU seconds of all processes involved (workers included): the same ratio, less sensitive
        # to other load on the machine. Includes the tool's start-up (imports, worker start).
        print(
            f"CPU seconds: raw {raw_cpu_best:.2f}, end to end {e2e_cpu_best:.2f}; "
            f"ratio raw/e2e {raw_cpu_best / e2e_cpu_best:.3f}"
        )
        print(
            f"fixed start-up of the tool (one-document run): {startup_s:.2f} s wall, {startup_cpu:.2f} CPU s; "
            f"without it: ratio {raw_best / max(e2e_best - startup_s, 1e-9):.3f} (wall), "
            f"{raw_cpu_best / max(e2e_cpu_best - startup_cpu, 1e-9):.3f} (CPU)"
        )


if __name__ == "__main__":
    main()
