#!/usr/bin/env python
"""``python tools/run_lm_eval.py``: the same as ``python -m card_megatron.tools.run_lm_eval``."""

import sys

from card_megatron.tools.run_lm_eval import main

if __name__ == "__main__":
    sys.exit(main())
