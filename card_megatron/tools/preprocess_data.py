"""Tokenize text into Megatron .bin/.idx token shards (or merge shards).

  python tools/preprocess_data.py --input builtin:python-docs --train-tokenizer --vocab-size 8000 \\
      --output-prefix data/pydocs --workers 2
  python tools/preprocess_data.py --input builtin:synthetic-copy --train-tokenizer --vocab-size 1000 \\
      --output-prefix data/copy --workers 2
  python tools/preprocess_data.py --input 'corpus/*.jsonl.gz' --tokenizer-model tok.model \\
      --output-prefix data/web --workers 16
  python tools/preprocess_data.py --input 'fineweb/*.parquet' --json-keys text \\
      --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer.json \\
      --output-prefix data/fw --workers 16
  python tools/preprocess_data.py --merge data/a_text_document data/b_text_document \\
      --output-prefix data/ab_text_document
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import textwrap

from card_megatron import cli
from card_megatron.data.builtin import BUILTIN_CORPORA, BUILTIN_PREFIX
from card_megatron.data.corpus import DEFAULT_MAX_LINE_BYTES
from card_megatron.data.preprocess import PreprocessOptions, preprocess
from card_megatron.data.shards import merge_shards
from card_megatron.fileio import write_error_message
from card_megatron.tokenizers import TOKENIZER_TYPES


def _builtin_help() -> str:
    width = max(len(BUILTIN_PREFIX + name) for name in BUILTIN_CORPORA)
    lines = [f"  {BUILTIN_PREFIX + name:<{width}}  {text}" for name, text in BUILTIN_CORPORA.items()]
    return "built-in corpora (--input builtin:NAME; nothing downloaded, fixed document order):\n" + "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=_builtin_help()
        + "\n\n"
        + textwrap.fill(
            "Outputs {output_prefix}_{key}_document.bin/.idx (Megatron MMIDIDX v1; uint16 tokens when the "
            "vocabulary is under 65500, else int32), one sequence per document ending with the end-of-document "
            "id, and {output_prefix}.tokenizer.json with the pad/bos/eos/mask ids, the vocabulary size and, "
            "under \"inputs\", each input's name, line and document counts, sha256 (of a file's bytes, or of a "
            "built-in corpus's documents) and a built-in corpus's parameters. "
            "Files are written under temporary names and renamed only when complete. User errors (bad input "
            "line, missing key or tokenizer, existing output) exit with status 1 and a message on stderr.",
            width=100,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("input")
    g.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="input files or globs (an existing path is a file, even with glob characters in its name): "
        ".jsonl/.json/.ndjson (one JSON object per line), .txt (one document "
        "per line), each optionally .gz or .zst; .parquet (read one row group at a time, the "
        "--json-keys columns only; e.g. FineWeb's 'text'); or a built-in corpus: "
        + ", ".join(BUILTIN_PREFIX + name for name in BUILTIN_CORPORA)
        + " (listed below)",
    )
    g.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        metavar="KEY",
        help="JSON keys (Parquet: string columns) to tokenize, one output shard per key (default: text)",
    )
    g.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="skip and count lines with invalid JSON, invalid UTF-8 or a missing/non-string key "
        "(Parquet: rows with a null or invalid UTF-8 value) instead of stopping with an error "
        "naming the file and line (or row group and row)",
    )
    g.add_argument(
        "--max-line-bytes",
        type=int,
        default=DEFAULT_MAX_LINE_BYTES,
        metavar="N",
        help="longest JSONL or text line accepted, in bytes (default: %(default)s = 256 MiB); a longer "
        "line stops the run with an error naming the file and line, even with --skip-bad-lines (it is "
        "not read to its end, so memory stays bounded)",
    )
    g = p.add_argument_group("tokenizer (SentencePiece or Hugging Face tokenizer.json)")
    g.add_argument(
        "--tokenizer-model",
        metavar="PATH",
        help="an existing SentencePiece .model file or a local Hugging Face tokenizer.json "
        "(told apart by content; <mask> and any missing eos/bos/pad are appended after the "
        "vocabulary, see card_megatron/tokenizers/huggingface.py)",
    )
    g.add_argument(
        "--train-tokenizer",
        action="store_true",
        help="train a SentencePiece model on the input first and save it as {output_prefix}.model",
    )
    g.add_argument(
        "--vocab-size", type=int, metavar="N", help="vocabulary size for --train-tokenizer (incl. reserved ids)"
    )
    g.add_argument(
        "--tokenizer-type",
        choices=list(TOKENIZER_TYPES),
        default=None,
        help="Megatron's name of the tokenizer kind; when given, --tokenizer-model must be of that kind "
        "(default: told from the file)",
    )
    g.add_argument(
        "--tokenizer-model-type",
        choices=["unigram", "bpe"],
        default="unigram",
        help="SentencePiece model type for --train-tokenizer (default: unigram)",
    )
    g.add_argument(
        "--tokenizer-sample-sentences",
        type=int,
        default=1_000_000,
        metavar="N",
        help="--train-tokenizer trains on a deterministic uniform sample of at most N input lines "
        "(default: 1000000), drawn from the first 10*N lines",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the tokenizer training sample (default: 0)")
    g = p.add_argument_group("output")
    g.add_argument(
        "--output-prefix",
        required=True,
        metavar="PREFIX",
        help="path prefix of the outputs (with --merge: the exact prefix of the merged shard)",
    )
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: refuse)")
    g.add_argument(
        "--append-eod",
        action="store_true",
        help="accepted for Megatron compatibility; the end-of-document id is always appended",
    )
    g.add_argument(
        "--merge",
        nargs="+",
        metavar="PREFIX",
        help="instead of tokenizing, concatenate these existing shards (PREFIX.bin/.idx, same dtype) "
        "into --output-prefix",
    )
    g = p.add_argument_group("runtime")
    g.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="tokenizer worker processes (default: all CPUs, %(default)s here)",
    )
    g.add_argument(
        "--log-interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="seconds between progress lines on stderr when it is not a terminal; on a terminal "
        "a tqdm progress bar with ETA is drawn instead (default: 2)",
    )
    return p


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the cleanup that deletes temporary files


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.start_logging(logging.INFO, "%(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.merge:
            if args.input:
                raise ValueError("give either --input or --merge, not both")
            s = merge_shards(args.merge, args.output_prefix, overwrite=args.overwrite)
            print(
                f"merged {len(args.merge)} shards: {s.num_documents} documents, {s.num_sequences} sequences, "
                f"{s.num_tokens} tokens ({s.dtype}) -> {s.prefix}.bin/.idx",
                file=sys.stderr,
            )
            return 0
        if not args.input:
            raise ValueError("--input is required (or --merge)")
        opts = PreprocessOptions(
            inputs=args.input,
            output_prefix=args.output_prefix,
            json_keys=args.json_keys,
            tokenizer_model=args.tokenizer_model,
            train_tokenizer=args.train_tokenizer,
            vocab_size=args.vocab_size,
            tokenizer_type=args.tokenizer_model_type,
            tokenizer_kind=args.tokenizer_type,
            tokenizer_sample_sentences=args.tokenizer_sample_sentences,
            tokenizer_scan_sentences=10 * args.tokenizer_sample_sentences,
            workers=args.workers,
            overwrite=args.overwrite,
            skip_bad_lines=args.skip_bad_lines,
            max_line_bytes=args.max_line_bytes,
            log_interval=args.log_interval,
            seed=args.seed,
        )
        stats = preprocess(opts)
        print(stats.summary(), file=sys.stderr)
        return 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # --merge meeting a full disk (preprocessing turns it into a PreprocessError)
        print(f"error: {write_error_message(e, args.output_prefix)}; no output written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
