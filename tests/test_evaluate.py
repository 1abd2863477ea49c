"""tools/evaluate.py: perplexity per dataset, exact for causal checkpoints, a labelled bound otherwise."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from card_megatron.data import preprocess as pp
from card_megatron.data.corpus import builtin_documents
from card_megatron.tokenizers import train_tokenizer
from tests.distributed import REPO
from tests.test_export_hf import single_process, write_export  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    docs = list(itertools.islice(builtin_documents(), 400))
    tok = train_tokenizer(docs[:150], str(root / "tok.model"), vocab_size=500)
    prefixes = []
    for name, part in (("docs_a", docs[150:250]), ("docs_b", docs[250:400])):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": d[:600]}) + "\n" for d in part))
        pp.preprocess(
            pp.PreprocessOptions(inputs=[str(path)], output_prefix=str(root / name), tokenizer_model=tok.source)
        )
        prefixes.append(str(root / f"{name}_text_document"))
    return root, tok, prefixes


def reference_nll(loaded, prefix, max_windows):
    """Mean next-token NLL over windows of seq_length + 1 tokens, written as a plain loop."""
    from card_megatron.data.shards import TokenShard

    tokens = np.asarray(TokenShard(prefix).tokens, dtype=np.int64)
    L = loaded.config.model.seq_length
    total, count = 0.0, 0
    for w in range(min((len(tokens) - 1) // L, max_windows)):
        seq = torch.from_numpy(tokens[w * L : w * L + L + 1])
        with torch.no_grad():
            logits = loaded.model(seq[None, :-1], torch.arange(L)[None])[:, 0].double()
        logp = torch.log_softmax(logits, dim=-1)
        for i in range(L):
            total -= float(logp[i, seq[i + 1]])
            count += 1
    return total / count, count


def test_exact_for_causal_and_bound_for_mdlm(single_process, setup):  # noqa: F811
    from card_megatron.eval.perplexity import evaluate_checkpoint, markdown_table
    from card_megatron.inference.loading import load_model

    root, tok, prefixes = setup
    for objective in ("arm", "card"):
        ckpt = write_export(root / f"ckpt_{objective}", tok, objective, seed=3)
        result = evaluate_checkpoint(ckpt, prefixes, ["a", "b"], batch_size=3, max_windows=7)
        loaded = load_model(ckpt, device="cpu")
        for row, prefix in zip(result["rows"], prefixes):
            nll, count = reference_nll(loaded, prefix, 7)
            assert row["kind"] == "exact" and row["num_windows"] == 7 and row["num_tokens"] == count
            # batched windows against a per-window reference, fp32 logits summed in float64: measured nll gap
            # 2e-8 (ppl 2e-8 relative) on nll 7.13; a window scored at a wrong offset is off by far more
            assert row["nll"] == pytest.approx(nll, abs=1e-5) and row["ppl"] == pytest.approx(np.exp(nll), rel=1e-4)
        assert [r["dataset"] for r in result["rows"]] == ["a", "b"]
        assert "| <= " not in markdown_table(result)
    ckpt = write_export(root / "ckpt_mdlm", tok, "mdlm", seed=3)
    result = evaluate_checkpoint(ckpt, prefixes[:1], max_windows=4)
    again = evaluate_checkpoint(ckpt, prefixes[:1], max_windows=4, batch_size=1)
    row = result["rows"][0]
    assert row["kind"] == "bound" and np.isfinite(row["nll"]) and row["dataset"] == "docs_a_text_document"
    # seeded by window, not by batch: the same noise, so only the batch's summation order differs (measured
    # 1.2e-16 relative); noise that followed the batch would move the bound by its Monte-Carlo spread, not by rounding
    assert again["rows"][0]["nll"] == pytest.approx(row["nll"], rel=1e-6)
    assert "| docs_a_text_document |" in markdown_table(result) and "| <= " in markdown_table(result)


def evaluate_main():
    from card_megatron.tools.evaluate import main  # what tools/evaluate.py runs

    return main


def test_outputs_and_shards_checked_before_loading(setup, tmp_path, monkeypatch, capsys):
    """--output-json DIR, an output under a file, one file for both outputs and a missing shard are
    refused before the checkpoint is loaded (issue 21: a directory lost the whole evaluation)."""
    from card_megatron.inference import loading

    _, _, prefixes = setup

    def no_loading(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the outputs were checked")

    monkeypatch.setattr(loading, "load_model", no_loading)
    (tmp_path / "file").write_text("x")
    for args, message in (
        (["--output-json", str(tmp_path)], f"output {tmp_path} is a directory"),
        (
            ["--output-markdown", str(tmp_path / "file" / "p.md")],
            f"output {tmp_path / 'file' / 'p.md'} cannot be written",
        ),
        (["--output-json", str(tmp_path / "p"), "--output-markdown", str(tmp_path / "p")], "are the same file"),
        (["--data", prefixes[0], str(tmp_path / "missing")], "missing.bin not found"),
    ):
        rc = evaluate_main()(["--checkpoint", str(tmp_path / "ckpt"), "--data", prefixes[0], *args])
        err = capsys.readouterr().err
        assert rc == 1 and message in err and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_table_printed_before_the_files_are_written(single_process, setup, tmp_path, monkeypatch, capsys):  # noqa: F811
    import errno

    from card_megatron.eval import perplexity

    root, tok, prefixes = setup
    ckpt = write_export(tmp_path / "ckpt", tok, "arm", seed=5)

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(perplexity, "atomic_write", disk_full)
    out = tmp_path / "new" / "p.json"
    rc = evaluate_main()(["--checkpoint", ckpt, "--data", prefixes[0], "--max-windows", "2", "--output-json", str(out)])
    captured = capsys.readouterr()
    assert rc == 1 and "| docs_a_text_document |" in captured.out
    assert f"cannot write {out}: No space left on device (the disk is full) (the table is above)" in captured.err


def test_windows_are_streamed_not_materialised(tmp_path):
    """The windows of a 600k-token shard come in batches; peak memory stays far below the int64 copy
    of every window (4.5 MB here; 160 GB for 10B tokens) that evaluation used to build (issue 21)."""
    import tracemalloc

    from card_megatron.data.shards import ShardWriter, TokenShard
    from card_megatron.eval.perplexity import num_windows, window_batches

    rng = np.random.default_rng(0)
    with ShardWriter(str(tmp_path / "s"), vocab_size=1000) as w:
        for _ in range(60):
            w.add_document(rng.integers(0, 1000, size=10_000))
    tokens = TokenShard(str(tmp_path / "s")).tokens
    L = 16
    n = num_windows(str(tmp_path / "s"), L, None)
    assert n == (len(tokens) - 1) // L and n * (L + 1) * 8 > 4_000_000
    seen, starts = 0, []
    for start, batch in window_batches(tokens, L, n, batch_size=8):
        assert batch.dtype == np.int64 and batch.shape == (min(8, n - start), L + 1)
        if start % 997 == 0 or start + 8 >= n:  # spot checks against the definition
            for i in range(len(batch)):
                np.testing.assert_array_equal(batch[i], tokens[(start + i) * L : (start + i) * L + L + 1])
        seen += len(batch)
        starts.append(start)
    assert seen == n and starts == list(range(0, n, 8))
    tracemalloc.start()
    for _ in window_batches(tokens, L, n, batch_size=8):
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 100_000, peak  # a few batches of 8 x 17 int64; all windows at once: 4.5 MB
    assert num_windows(str(tmp_path / "s"), L, 5) == 5


@pytest.mark.slow
def test_cli(single_process, setup, tmp_path):  # noqa: F811
    root, tok, prefixes = setup
    ckpt = write_export(tmp_path / "ckpt", tok, "card", seed=4)
    tool = [sys.executable, os.path.join(REPO, "tools", "evaluate.py"), "--checkpoint", ckpt]
    env = {**os.environ, "PYTHONPATH": REPO}
    r = subprocess.run(
        [
            *tool,
            "--data",
            *prefixes,
            "--max-windows",
            "3",
            "--output-json",
            str(tmp_path / "p.json"),
            "--output-markdown",
            str(tmp_path / "p.md"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "p.json").read_text())
    assert [row["dataset"] for row in result["rows"]] == ["docs_a_text_document", "docs_b_text_document"]
    assert (tmp_path / "p.md").read_text() == r.stdout and "| perplexity |" in r.stdout
    other = train_tokenizer(["another corpus of other words"] * 40, str(tmp_path / "other.model"), 300)
    with open(other.source, "rb") as f:
        (tmp_path / "ckpt" / "tokenizer.model").write_bytes(f.read())
    for args, message in (
        (["--data", str(tmp_path / "missing")], "not found"),
        (["--data", prefixes[0]], "was tokenized with"),
        (["--data", *prefixes, "--names", "one"], "--names gives 1 names for 2"),
    ):
        r = subprocess.run([*tool, *args], capture_output=True, text=True, env=env, timeout=180)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_shard_without_sidecar_is_refused_unless_accepted(single_process, setup, tmp_path, capsys):  # noqa: F811
    """Issue 21: a shard without its tokenizer sidecar was evaluated with any same-size tokenizer after a
    warning. It is refused before the checkpoint loads, naming the shard and the flag that accepts it."""
    import shutil

    root, tok, prefixes = setup
    bare = str(tmp_path / "bare_text_document")
    for ext in (".bin", ".idx"):
        shutil.copyfile(prefixes[0] + ext, bare + ext)
    ckpt = write_export(root / "ckpt_sidecar", tok, "arm", seed=3)
    args = ["--checkpoint", ckpt, "--data", bare, "--max-windows", "2"]
    assert evaluate_main()(args) == 1
    err = capsys.readouterr().err
    assert f"{bare} has no tokenizer sidecar" in err and "--allow-missing-sidecar" in err and "Traceback" not in err
    assert evaluate_main()([*args, "--allow-missing-sidecar"]) == 0
    assert "| bare_text_document |" in capsys.readouterr().out
