"""lm-eval-harness with card_megatron checkpoints: lm-eval's own command line, with the
``card_megatron`` model registered (lm-eval does not discover model plugins by itself).

  python tools/run_lm_eval.py --model card_megatron --model_args checkpoint=runs/demo,decoding=card \\
      --tasks hellaswag,piqa,winogrande --batch_size 8 --output_path results/

Every flag is lm-eval's (``python tools/run_lm_eval.py --help``); model args: checkpoint,
decoding, threshold, window, max_gen_toks, mc_samples (MDLM), seed, device, ema
(card_megatron/eval/harness.py); the batch size is --batch_size. An unknown model arg or a bad
value (a missing checkpoint included) is refused with one line each and exit status 1.
"""

from __future__ import annotations

import sys

from card_megatron import cli


def main() -> int:
    try:
        from lm_eval._cli import HarnessCLI
        from lm_eval.utils import setup_logging
    except ImportError:
        print("error: lm-eval-harness is not installed: pip install -e .[eval] (or make setup)", file=sys.stderr)
        return 1

    setup_logging()
    cli.start_logging(None)  # lm-eval configured logging; the start-up note before Megatron-core is imported
    # the import registers the card_megatron model
    from card_megatron.eval.harness import ModelArgsError, check_model_arg_dict

    # lm_eval.__main__.cli_evaluate, with the model args checked between parsing and running: lm-eval
    # indexes every task before it builds the model, minutes on a loaded machine for a misspelled key.
    harness = HarnessCLI()
    args = harness.parse_args()
    try:
        if getattr(args, "model", None) == "card_megatron":
            check_model_arg_dict(args.model_args or {})
        harness.execute(args)
    except ModelArgsError as e:  # unknown keys, bad values, a missing checkpoint: one line each
        print("\n".join(f"error: {line}" for line in str(e).splitlines()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
