"""Shared fixtures: a tiny tokenized corpus (built once per session with the real tool).

Tiers (pytest.ini): ``make test-fast`` runs ``-m "not slow and not slurm"``. A test that uses
``tiny_corpus`` is marked ``slow`` here, since that fixture runs the real tokenizer tool and
its users train or launch; other multi-process or end-to-end tests carry ``@pytest.mark.slow``.
"""

import os
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    """Every test session compiles into its own inductor kernel cache (inherited by the tests' subprocesses).
    The shared default, ``/tmp/torchinductor_{user}``, hands kernels compiled under another kernel set or thread
    count to a later run; reused that way they gave a NaN in the compiled-layer test and aborted a fused-kernel
    test, while a fresh cache passes both (docs/design.md "Parity tests"). A cache the user sets is kept."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="card_megatron_inductor_")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tiny_corpus" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """The built-in corpus tokenized with a 1024-piece SentencePiece model: (data prefix, tokenizer path)."""
    out = tmp_path_factory.mktemp("corpus")
    prefix = str(out / "docs")
    subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "preprocess_data.py"),
            "--input",
            "builtin:python-docs",
            "--train-tokenizer",
            "--vocab-size",
            "1024",
            "--output-prefix",
            prefix,
            "--workers",
            "2",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    return f"{prefix}_text_document", f"{prefix}.model"
