#!/usr/bin/env python
"""``python tools/export_hf.py``: the same as ``python -m card_megatron.tools.export_hf``."""

import sys

from card_megatron.tools.export_hf import main

if __name__ == "__main__":
    sys.exit(main())
