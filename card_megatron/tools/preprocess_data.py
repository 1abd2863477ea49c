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

import logging
import os
import signal
import sys
import textwrap
from dataclasses import dataclass
from typing import Literal, Optional

from card_megatron import cli
from card_megatron.cli import at_least, option
from card_megatron.data.builtin import BUILTIN_CORPORA, BUILTIN_PREFIX
from card_megatron.data.corpus import DEFAULT_MAX_LINE_BYTES
from card_megatron.data.preprocess import PreprocessOptions, preprocess
from card_megatron.data.shards import merge_shards
from card_megatron.fileio import write_error_message
from card_megatron.tokenizers import TOKENIZER_TYPES

DESCRIPTION = __doc__.split("\n\n")[0]
INPUT, TOKENIZER, OUTPUT, RUNTIME = (
    "input",
    "tokenizer (SentencePiece or Hugging Face tokenizer.json)",
    "output",
    "runtime",
)


def _builtin_help() -> str:
    width = max(len(BUILTIN_PREFIX + name) for name in BUILTIN_CORPORA)
    lines = [f"  {BUILTIN_PREFIX + name:<{width}}  {text}" for name, text in BUILTIN_CORPORA.items()]
    return "built-in corpora (--input builtin:NAME; nothing downloaded, fixed document order):\n" + "\n".join(lines)


EPILOG = (
    _builtin_help()
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
    )
)


@dataclass(kw_only=True)  # in help order: the required --output-prefix among the outputs
class PreprocessCommand:
    """``python -m card_megatron.tools.preprocess_data``'s options (``card-preprocess``,
    ``tools/preprocess_data.py``); the flags follow Megatron-LM's ``tools/preprocess_data.py``."""

    input: Optional[list[str]] = option(None, metavar="PATH", nargs="+", group=INPUT)
    """Input files or globs (an existing path is a file, even with glob characters in its name):
    .jsonl/.json/.ndjson (one JSON object per line), .txt (one document per line), each optionally .gz or
    .zst; .parquet (read one row group at a time, the --json-keys columns only; e.g. FineWeb's 'text'); or
    a built-in corpus (listed below)."""
    json_keys: list[str] = option(default_factory=lambda: ["text"], metavar="KEY", nargs="+", group=INPUT)
    """JSON keys (Parquet: string columns) to tokenize, one output shard per key."""
    skip_bad_lines: bool = option(False, group=INPUT)
    """Skip and count lines with invalid JSON, invalid UTF-8 or a missing/non-string key (Parquet: rows with
    a null or invalid UTF-8 value) instead of stopping with an error naming the file and line (or row group
    and row)."""
    max_line_bytes: int = option(
        DEFAULT_MAX_LINE_BYTES, metavar="N", group=INPUT, default_text=f"{DEFAULT_MAX_LINE_BYTES} = 256 MiB"
    )
    """Longest JSONL or text line accepted, in bytes; a longer line stops the run with an error naming the
    file and line, even with --skip-bad-lines (it is not read to its end, so memory stays bounded)."""

    tokenizer_model: Optional[str] = option(None, metavar="PATH", group=TOKENIZER)
    """An existing SentencePiece .model file or a local Hugging Face tokenizer.json (told apart by content;
    <mask> and any missing eos/bos/pad are appended after the vocabulary, see
    card_megatron/tokenizers/huggingface.py)."""
    train_tokenizer: bool = option(False, group=TOKENIZER)
    """Train a SentencePiece model on the input first and save it as {output_prefix}.model."""
    vocab_size: Optional[int] = option(None, metavar="N", range=at_least(1), group=TOKENIZER)
    """Vocabulary size for --train-tokenizer (incl. reserved ids)."""
    tokenizer_type: Optional[str] = option(None, choices=lambda: tuple(TOKENIZER_TYPES), group=TOKENIZER)
    """Megatron's name of the tokenizer kind; when given, --tokenizer-model must be of that kind (default:
    told from the file)."""
    tokenizer_model_type: Literal["unigram", "bpe"] = option("unigram", group=TOKENIZER)
    """SentencePiece model type for --train-tokenizer."""
    tokenizer_sample_sentences: int = option(1_000_000, metavar="N", range=at_least(1), group=TOKENIZER)
    """--train-tokenizer trains on a deterministic uniform sample of at most N input lines, drawn from the
    first 10*N lines."""
    seed: int = option(0, group=TOKENIZER)
    """Seed of the tokenizer training sample."""

    output_prefix: str = option(metavar="PREFIX", group=OUTPUT)
    """Path prefix of the outputs (with --merge: the exact prefix of the merged shard)."""
    overwrite: bool = option(False, group=OUTPUT)
    """Replace existing outputs (default: refuse)."""
    append_eod: bool = option(False, group=OUTPUT)
    """Accepted for Megatron compatibility; the end-of-document id is always appended."""
    merge: Optional[list[str]] = option(None, metavar="PREFIX", nargs="+", group=OUTPUT)
    """Instead of tokenizing, concatenate these existing shards (PREFIX.bin/.idx, same dtype) into
    --output-prefix."""

    workers: int = option(os.cpu_count() or 1, group=RUNTIME, default_text=f"all CPUs, {os.cpu_count() or 1} here")
    """Tokenizer worker processes."""
    log_interval: float = option(2.0, metavar="SECONDS", range=at_least(0), group=RUNTIME)
    """Seconds between progress lines on stderr when it is not a terminal; on a terminal a tqdm progress
    bar with ETA is drawn instead."""


def build_parser():
    """The command line, generated from :class:`PreprocessCommand`."""
    return cli.build_parser(PreprocessCommand, description=DESCRIPTION, epilog=EPILOG)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the cleanup that deletes temporary files


def main(argv: list[str] | None = None) -> int:
    args = cli.parse_options(PreprocessCommand, argv, description=DESCRIPTION, epilog=EPILOG)
    cli.start_logging(logging.INFO, "%(message)s", megatron=False, stream=sys.stderr)  # tokenization only
    signal.signal(signal.SIGTERM, _terminate)
    try:
        cli.check_options(args)
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
