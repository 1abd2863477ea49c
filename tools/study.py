#!/usr/bin/env python
"""``python tools/study.py``: the same as ``python -m apps.study`` (``card-study``)."""

import sys

from apps.study.main import main

if __name__ == "__main__":
    sys.exit(main())
