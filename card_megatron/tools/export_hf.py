"""Export a causal checkpoint (ARM or CARD) as a Hugging Face transformers Llama model directory.

  python tools/export_hf.py --checkpoint runs/demo --output exports/demo-hf
  python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('exports/demo-hf')"

Writes config.json, generation_config.json, model.safetensors, the tokenizer files and
card_megatron.json (source checkpoint, step, objective, reserved token ids) under a temporary
name, renamed when complete. MDLM and BD3LM checkpoints are refused (bidirectional attention).
Exit status 1 with a message on stderr for a user error.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from card_megatron import cli
from card_megatron.cli import option

DESCRIPTION, EPILOG = cli.doc_parts(__doc__)


@dataclass
class ExportOptions:
    """``python -m card_megatron.tools.export_hf``'s options (``card-export-hf``, ``tools/export_hf.py``)."""

    checkpoint: str = option(metavar="PATH")
    """A run directory (latest checkpoint), a checkpoint directory or an export, of any training layout."""
    output: str = option(metavar="DIR")
    """The model directory to create (must not exist)."""
    ema: bool = False
    """Export the EMA weights (runs trained with optim.ema_decay > 0)."""


def build_parser():
    """The command line, generated from :class:`ExportOptions`."""
    return cli.build_parser(ExportOptions, description=DESCRIPTION, epilog=EPILOG)


def run(args: ExportOptions) -> int:
    """Exports, and says what on stderr."""
    from card_megatron.interop.hf_export import export_llama

    record = export_llama(args.checkpoint, args.output, ema=args.ema)
    print(
        f"exported step {record['step']} of {record['source']} ({record['objective']}) to {args.output}",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    errors = (ValueError, FileNotFoundError, FileExistsError)
    return cli.run_tool(ExportOptions, run, argv, description=DESCRIPTION, epilog=EPILOG, errors=errors)


if __name__ == "__main__":
    sys.exit(main())
