#!/usr/bin/env python
"""Export a causal checkpoint (ARM or CARD) as a Hugging Face transformers Llama model directory.

  python tools/export_hf.py --checkpoint runs/demo --output exports/demo-hf
  python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('exports/demo-hf')"

Writes config.json, generation_config.json, model.safetensors, the tokenizer files and
card_megatron.json (source checkpoint, step, objective, reserved token ids) under a temporary
name, renamed when complete. MDLM and BD3LM checkpoints are refused (bidirectional attention).
Exit status 1 with a message on stderr for a user error.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="a run directory (latest checkpoint), a checkpoint directory or an export, of any training layout",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="the model directory to create (must not exist)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (runs trained with optim.ema_decay > 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from card_megatron.interop.hf_export import export_llama

    try:
        record = export_llama(args.checkpoint, args.output, ema=args.ema)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"exported step {record['step']} of {record['source']} ({record['objective']}) to {args.output}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
