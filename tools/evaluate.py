#!/usr/bin/env python
"""``python tools/evaluate.py``: the same as ``python -m card_megatron.tools.evaluate``."""

import sys

from card_megatron.tools.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
