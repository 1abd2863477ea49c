#!/usr/bin/env python
"""lm-eval-harness with card_megatron checkpoints: lm-eval's own command line, with the
``card_megatron`` model registered (lm-eval does not discover model plugins by itself).

  python tools/run_lm_eval.py --model card_megatron --model_args checkpoint=runs/demo,decoding=card \\
      --tasks hellaswag,piqa,winogrande --batch_size 8 --output_path results/

Every flag is lm-eval's (``python tools/run_lm_eval.py --help``); model args: checkpoint,
decoding, threshold, window, max_gen_toks, mc_samples (MDLM), seed, device, ema
(card_megatron/eval/harness.py); the batch size is --batch_size.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("error: lm-eval-harness is not installed: pip install -e .[eval] (or make setup)", file=sys.stderr)
        return 1

    import card_megatron.eval.harness  # noqa: F401 (registers the card_megatron model)

    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
