"""A stand-in for ``tools/preprocess_data.py`` with its command-line interface.

Used by tests/test_slurm.py (``PREPROCESS_TOOL=tests/fake_preprocess.py``) to test
the job array and merge dependency of ``slurm/preprocess.sh`` in seconds.
``--input FILE --output-prefix P [...]`` copies FILE's bytes to ``P_text_document.bin``
and writes its byte count to ``P_text_document.idx``; an input whose text starts with
``FAIL`` makes it exit 1. ``--merge S1 S2 ... --output-prefix OUT`` (exact prefixes, as
the real tool takes them) concatenates ``S1.bin, S2.bin, ...`` into ``OUT.bin``.
Every run appends its arguments to ``$FAKE_PREPROCESS_LOG`` when that is set.
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--input")
    parser.add_argument("--merge", nargs="+")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--tokenizer-model")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    if os.environ.get("FAKE_PREPROCESS_LOG"):
        with open(os.environ["FAKE_PREPROCESS_LOG"], "a") as f:
            f.write(" ".join(sys.argv[1:]) + "\n")
    if args.merge:
        out = args.output_prefix
        data = b""
        for prefix in args.merge:
            with open(prefix + ".bin", "rb") as f:
                data += f.read()
    else:
        out = args.output_prefix + "_text_document"
        with open(args.input, "rb") as f:
            data = f.read()
        if data.startswith(b"FAIL"):
            print(f"fake_preprocess: refusing {args.input}", file=sys.stderr)
            return 1
    for ext, payload in (("bin", data), ("idx", str(len(data)).encode())):
        tmp = f"{out}.{ext}.tmp"
        with open(tmp, "wb") as f:
            f.write(payload)
        os.replace(tmp, f"{out}.{ext}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
