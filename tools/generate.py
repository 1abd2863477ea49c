#!/usr/bin/env python
"""``python tools/generate.py``: the same as ``python -m card_megatron.tools.generate`` (``card-generate``)."""

import sys

from card_megatron.tools.generate import main

if __name__ == "__main__":
    sys.exit(main())
