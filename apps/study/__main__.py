"""``python -m apps.study``: the study's command line (``apps/study/main.py``)."""

import sys

from apps.study.main import main

if __name__ == "__main__":
    sys.exit(main())
