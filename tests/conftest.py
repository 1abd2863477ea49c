"""Shared fixtures: a tiny tokenized corpus (built once per session with the real tool)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """The built-in corpus tokenized with a 1024-piece SentencePiece model: (data prefix, tokenizer path)."""
    out = tmp_path_factory.mktemp("corpus")
    prefix = str(out / "docs")
    subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", "builtin:python-docs",
         "--train-tokenizer", "--vocab-size", "1024", "--output-prefix", prefix, "--workers", "2"],
        check=True, capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    return f"{prefix}_text_document", f"{prefix}.model"
