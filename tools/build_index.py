#!/usr/bin/env python
"""``python tools/build_index.py``: the same as ``python -m card_megatron.tools.build_index``."""

import sys

from card_megatron.tools.build_index import main

if __name__ == "__main__":
    sys.exit(main())
