#!/usr/bin/env python
"""``python tools/demo_report.py``: the same as ``python -m apps.demo.report`` (the end of ``make demo``)."""

import sys

from apps.demo.report import main

if __name__ == "__main__":
    sys.exit(main())
