#!/usr/bin/env python
"""``python tools/preprocess_data.py``: the same as ``python -m card_megatron.tools.preprocess_data``."""

import sys

from card_megatron.tools.preprocess_data import main

if __name__ == "__main__":
    sys.exit(main())
