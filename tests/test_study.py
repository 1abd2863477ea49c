"""tools/study.py: the smoke plan end to end, and a restart that keeps finished runs."""

import json
import os
import subprocess
import sys

import pytest

from card_megatron.study.plans import PLANS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _study(out, tiny_corpus, timeout=600):
    data, tok = tiny_corpus
    return subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "study.py"),
            "--plan",
            "smoke",
            "--out",
            str(out),
            "--data",
            data,
            "--tokenizer",
            tok,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"},
    )


def test_every_plan_names_existing_configs():
    for plan in PLANS.values():
        assert os.path.exists(os.path.join(REPO, plan.config)), plan.config
        names = [r.name for r in plan.runs]
        assert len(names) == len(set(names)) and "card-s0" in names


@pytest.mark.slow
def test_smoke_plan_end_to_end_and_restart(tmp_path, tiny_corpus):
    out = tmp_path / "study"
    res = _study(out, tiny_corpus)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.load(open(out / "study.json"))
    plan = PLANS["smoke"]
    assert set(report["runs"]) == {r.name for r in plan.runs}
    assert report["meta"]["runs_trained_now"] == len(plan.runs)
    for name, run in report["runs"].items():
        assert run["final"]["step"] == 6 and run["step_time_s"] > 0, name
    card = report["runs"]["card-s0"]["final"]
    assert 0.0 <= card["probe_acc_k1"] <= 1.0 and card["val_ctx0_nll"] > 0  # diagnostics reached eval.jsonl
    assert report["runs"]["mdlm-s0"]["final"]["val_ppl_is_bound"]
    assert {c["objective"] for c in report["cost"]} == {"arm", "card", "mdlm", "bd3lm"}
    main = report["decoding"]["main"]
    ar, card_rows = main["greedy"]["rows"][0], main["greedy"]["rows"][1:]
    assert ar["decoding"] == "ar" and ar["judge_ppl"] > 0 and card_rows
    # tau > 1 commits one token per step: greedy CARD decoding then equals greedy AR decoding
    above_one = [r for r in card_rows if r["threshold"] > 1]
    assert above_one and all(r["same_as_first"] == 1.0 for r in above_one)
    assert len(report["decoding"]["curve"]["points"]) == 2
    assert report["decoding"]["copy"]["rows"]
    md = (out / "study.md").read_text()
    for heading in ("Data efficiency", "Training cost", "Ablations", "Decoding", "Synthetic copy"):
        assert heading in md
    for png in ("perplexity.png", "ablations.png", "decoding.png", "curve.png"):
        assert (out / png).stat().st_size > 1000

    # restart: finished runs are kept; a run without `finished` is run again and resumes
    os.remove(out / "runs" / "arm-s0" / "finished")
    res = _study(out, tiny_corpus)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.load(open(out / "study.json"))
    assert report["meta"]["runs_trained_now"] == 1
    assert "resumed from" in (out / "runs" / "arm-s0" / "train.log").read_text()


@pytest.mark.slow
def test_adapt_plan_end_to_end_with_a_tiny_llama_and_restart(tmp_path):
    """The adapt stages (import, tokenize with its tokenizer, CARD and ARM from train.init_from,
    decoding at every checkpoint, report) on a random 2-layer Llama instead of SmolLM2; a rerun
    keeps everything."""
    import itertools

    from card_megatron.data.corpus import builtin_documents
    from card_megatron.study.adapt import ADAPT_PLANS, AdaptPlan, run_adapt
    from tests.test_hf_tokenizer import train_bpe
    from tests.test_import_hf import llama_dir

    bpe = train_bpe(list(itertools.islice(builtin_documents(), 150)), tmp_path / "bpe.json", vocab_size=300)
    src, _ = llama_dir(tmp_path / "hf", bpe, seed=2)
    smoke = ADAPT_PLANS["adapt-smoke"]
    plan = AdaptPlan(
        name="tiny",
        description="test",
        overrides=tuple(o for o in smoke.overrides if not o.startswith("optim.freeze_layers"))
        + ("optim.freeze_layers=1",),
        decode=smoke.decode,
        max_files=30,
    )
    out = str(tmp_path / "adapt")
    report = run_adapt(plan, out, source=src)
    steps = [p["step"] for p in report["points"]]
    assert steps == [0, 1, 2]
    start = report["points"][0]
    assert start["card_ppl"] == pytest.approx(start["arm_ppl"], rel=1e-6)  # both are the imported model
    assert start["card_retention"] == pytest.approx(1.0)
    later = report["points"][-1]
    assert later["best_tokens_per_forward"] >= 1.0 and later["ar_judge_ppl"] > 0
    assert later["lossless"] is None  # the issue-19 hook, not built yet
    md = open(os.path.join(out, "adapt.md")).read()
    assert "| 2 |" in md and "not measured" in md
    decoded = json.load(open(os.path.join(out, "adapt_decoding.json")))
    assert len(decoded) == 3  # the import (step 0) and the checkpoints of steps 1 and 2
    assert report["points"][0]["best_tokens_per_forward"] >= 1.0
    again = run_adapt(plan, out, source=src)  # restart: nothing is trained or decoded again
    assert again["meta"]["train_seconds"] == {} and again["points"] == report["points"]
