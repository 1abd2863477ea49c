"""card_megatron/quiet_warnings.py: Megatron-core's start-up notes become one line; other warnings show."""

import logging
import os
import subprocess
import sys
import warnings

import pytest

from card_megatron import quiet_warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TE_NOTE = "Transformer Engine and Apex are not installed"

needs_fallbacks = pytest.mark.skipif(
    not quiet_warnings.fused_packages_missing(),
    reason="Transformer Engine or Apex is installed: Megatron-core takes no fallback",
)


@pytest.mark.slow  # a fresh process importing Megatron-core: ~5-15 s
@needs_fallbacks
def test_a_real_start_shows_the_note_once_and_other_warnings_still_show():
    """A fresh process imports the Megatron-core modules that warn (as the trainer does), then warns
    about something else: Megatron's notes are gone, the note is logged once, the other warning shows."""
    script = (
        "import logging, warnings\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "from card_megatron import quiet_warnings\n"
        "quiet_warnings.install()\n"
        "quiet_warnings.install()\n"  # a second call changes nothing
        "import megatron.core.optimizer, megatron.core.models.gpt.gpt_layer_specs\n"
        "from megatron.core.transformer.transformer_config import TransformerConfig\n"
        "TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)\n"
        "warnings.warn('an unrelated warning', UserWarning)\n"
        "import sys\n"
        "print(sorted(m for m in sys.modules if m.startswith('megatron.core.optimizer')))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO, "PYTHONWARNINGS": ""},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Megatron's warning sites were imported, so without the filters their notes would be here.
    assert "megatron.core.optimizer.clip_grads" in proc.stdout
    assert proc.stderr.count(TE_NOTE) == 1, proc.stderr
    assert quiet_warnings.FALLBACK_NOTE in proc.stderr
    assert "Falling back" not in proc.stderr and "full scope is deprecated" not in proc.stderr, proc.stderr
    assert "UserWarning: an unrelated warning" in proc.stderr


@needs_fallbacks
def test_only_megatrons_own_notes_are_filtered(monkeypatch, caplog):
    """The same words from another module, and other words from Megatron-core, still show."""
    monkeypatch.setattr(quiet_warnings, "_noted", False)
    te = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        with caplog.at_level(logging.INFO, logger="card_megatron"):
            quiet_warnings.install()
            quiet_warnings.install()
        shown = [f for f in warnings.filters if f[0] == "ignore"]
        assert len(shown) == len(set(shown)) == 3  # not duplicated by the second call

        def warn(message, module):
            warnings.warn_explicit(
                message, UserWarning, f"/site-packages/{module.replace('.', '/')}.py", 24, module=module
            )

        warn(te, "megatron.core.optimizer")
        warn("Apex is not installed. Falling back to Torch Norm", "megatron.core.models.backends")
        warn(
            "full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.",
            "megatron.core.transformer.transformer_config",
        )
        warn(te, "card_megatron.training.trainer")
        warn("something else went wrong", "megatron.core.optimizer")
    assert [(str(w.message), w.filename) for w in seen] == [
        (te, "/site-packages/card_megatron/training/trainer.py"),
        ("something else went wrong", "/site-packages/megatron/core/optimizer.py"),
    ]
    assert caplog.messages.count(quiet_warnings.FALLBACK_NOTE) == 1


def test_nothing_is_filtered_when_transformer_engine_is_there(monkeypatch, caplog):
    """With Transformer Engine or Apex installed, a fallback note means a broken install: it shows."""
    monkeypatch.setattr(quiet_warnings, "fused_packages_missing", lambda: False)
    monkeypatch.setattr(quiet_warnings, "_noted", False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        with caplog.at_level(logging.INFO, logger="card_megatron"):
            quiet_warnings.install()
        warnings.warn_explicit(
            "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
            UserWarning,
            "optimizer.py",
            24,
            module="megatron.core.optimizer",
        )
    assert len(seen) == 1 and TE_NOTE in str(seen[0].message)
    assert quiet_warnings.FALLBACK_NOTE not in caplog.text
