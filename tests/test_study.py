"""tools/study.py: the smoke plan end to end, and a restart that keeps finished runs."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from apps.study.plans import COPY, MAIN, PLANS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _study(out, tiny_corpus, timeout=600):
    data, tok = tiny_corpus  # (data prefix, tokenizer)
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


def test_plans_measure_like_with_like():
    """Every run of a plan validates on the same sequences (one data.valid_seed, not the run's seed),
    the probe counts confidence at every tau the plan's sweep uses, the decoder-aware ablation is in
    the cpu plan beside full CARD and strict tail, and verify mode joins the families once it exists."""
    from apps.study import plans
    from apps.study.runner import Corpus, planned_config
    from card_megatron.training.diagnostics import PROBE_THRESHOLDS

    corpus = Corpus("data_text_document", "data.model")
    for plan in PLANS.values():
        seeds = {planned_config(plan, r, corpus, "out")["data"]["valid_seed"] for r in plan.runs if r.corpus == MAIN}
        assert seeds == {plan.valid_seed}
        assert {t for t in plan.decode.thresholds if t <= 1} <= set(PROBE_THRESHOLDS), plan.name
    cpu = {r.name: r for r in PLANS["cpu"].runs}
    assert {"card-s0", "card-s1", "strict-s0", "strict-s1", "mixstrict-s0", "mixstrict-s1"} <= set(cpu)
    assert cpu["mixstrict-s1"].overrides == ("objective.strict_tail_fraction=0.25",)
    assert [f.name for f in PLANS["cpu"].decode.families][:2] == ["card", "forced"]
    original = plans.COMMIT_POLICIES
    try:
        plans.COMMIT_POLICIES = ("prefix", "any")
        assert "verify" not in [f.name for f in plans.decode_families(2)]
        plans.COMMIT_POLICIES = ("prefix", "any", "verify")
        assert plans.decode_families(2)[-1].commit_policy == "verify"
    finally:
        plans.COMMIT_POLICIES = original


def test_decoding_rows_of_the_families():
    """Forced rows get K // f passes per block of K as a per-sequence max_steps and are labelled; the
    headline of a greedy sweep is the most tokens per forward with output identical to AR, never a
    forced row; the sampled headline ranks unforced threshold rows by judge perplexity."""
    from apps.study import decoding as dec
    from apps.study.plans import DecodeFamily, DecodeSpec, decode_families

    spec = DecodeSpec(2, 8, 48, (0.5, 2.0), (4, 8), families=decode_families(2))
    settings = dec._settings(None, spec, {"max_new_tokens": 48}, spec.windows, spec.thresholds, 48)
    forced = [st for st in settings if st.extra["forced"]]
    assert [st.cfg.causal.max_steps for st in forced] == [2 * 12, 2 * 12, 4 * 6, 4 * 6]
    assert forced[0].name == "forced K=4 tau=0.5 (2 passes/block)"
    verify = DecodeSpec(2, 8, 48, (0.5, 2.0), (4,), families=(DecodeFamily("v", thresholds=(0.9,)),))
    assert [st.name for st in dec._settings(None, verify, {}, (4,), verify.thresholds, 48)] == ["v K=4"]
    row = dict(same_as_first=1.0, judge_ppl=10.0, threshold=0.5, family="card", forced=False)
    rows = [
        {**row, "setting": "ar", "tokens_per_forward": 1.0},
        {**row, "setting": "a", "tokens_per_forward": 1.5},
        {**row, "setting": "b", "tokens_per_forward": 2.5, "same_as_first": 0.9, "judge_ppl": 9.0},
        {**row, "setting": "f", "tokens_per_forward": 3.0, "forced": True},
    ]
    assert dec.best_identical(rows)["setting"] == "a"
    assert dec.best_within(rows)["setting"] == "b"


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
    # verify mode for every CARD run of the main corpus (issue 20): lossless by construction
    decoded = report["decoding"]["variants"]["runs"]
    assert set(decoded) == {r.name for r in plan.runs if r.corpus == "main" and r.objective == "card"}
    for name, part in decoded.items():
        assert [r["setting"] for r in part["rows"]] == ["ar", "verify K=4"], name
        assert part["rows"][1]["same_as_first"] == 1.0 and part["rows"][1]["tokens_per_forward"] >= 1.0
    full = next(v for v in report["variants"] if v["runs"] == ["card-s0"])
    assert full["verify"]["4"]["n"] == 1 and full["verify_identical"] == 1.0
    # the noise floor of the sampled rule: sampled AR with 2 seeds, judged
    seeds = main["sampled"]["ar_seeds"]
    assert [r["seed"] for r in seeds] == [0, 1] and all(r["judge_ppl"] > 0 for r in seeds)
    md = (out / "study.md").read_text()
    assert "Verify mode per variant" in md and "Sampled AR alone, 2 sampling seeds" in md
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

    # issue 21 item 6: the same study directory with another --data refuses to reuse the old runs
    other = tmp_path / "copy_text_document"
    for ext in (".bin", ".idx"):
        shutil.copy(tiny_corpus[0] + ext, str(other) + ext)
    res = _study(out, (str(other), tiny_corpus[1]))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "trained with other settings than this plan's" in res.stderr and "card-s0 (data.data_path:" in res.stderr


def test_runs_are_reused_only_with_the_plans_config_and_inputs(tmp_path):
    """check_reuse: a run directory whose saved config, data or tokenizer differs from the plan's is
    refused, naming the run and what differs; equal ones pass, runs never started are ignored."""
    import json

    from apps.study.runner import (
        RUN_RECORD,
        Corpus,
        StudyError,
        check_reuse,
        inputs_record,
        planned_config,
        run_dir,
    )
    from card_megatron.config import config_from_dict, save_config

    def write_shard(prefix, content):  # the fingerprint reads sizes, mtimes and the .idx bytes only
        for ext in (".bin", ".idx"):
            with open(prefix + ext, "wb") as f:
                f.write(content)

    plan = PLANS["smoke"]
    a, b = (Corpus(str(tmp_path / f"{n}_text_document"), str(tmp_path / f"{n}.model")) for n in "ab")
    for c in (a, b):
        write_shard(c.data_path, b"shard one")
        with open(c.tokenizer, "wb") as f:
            f.write(b"tokenizer " + c.tokenizer.encode())
    out = str(tmp_path / "study")
    started = [r for r in plan.runs if r.name in ("copy-card-s0", "arm-s0", "card-s0")]
    for run in started:  # what train_all leaves: the trainer's config.yaml and the study's record
        os.makedirs(run_dir(out, run))
        save_config(config_from_dict(planned_config(plan, run, a, out)), os.path.join(run_dir(out, run), "config.yaml"))
        with open(os.path.join(run_dir(out, run), RUN_RECORD), "w") as f:
            json.dump(inputs_record(a), f)
    check_reuse(plan, {MAIN: a, COPY: a}, out)  # the same plan and inputs: reused
    with pytest.raises(StudyError) as e:
        check_reuse(plan, {MAIN: b, COPY: a}, out)  # another --data
    msg = str(e.value)
    assert "2 run(s)" in msg and "arm-s0 (data.data_path:" in msg and "card-s0 (data.data_path:" in msg
    assert "copy-card-s0" not in msg and "another --out" in msg
    bigger = plan.__class__(**{**plan.__dict__, "overrides": plan.overrides + ("train.train_iters=7",)})
    with pytest.raises(StudyError, match=r"3 run\(s\).*train.train_iters: 6 -> 7"):
        check_reuse(bigger, {MAIN: a, COPY: a}, out)
    write_shard(a.data_path, b"shard two")  # other data under the same path
    with pytest.raises(StudyError, match="data_fingerprint"):
        check_reuse(plan, {MAIN: a, COPY: a}, out)


@pytest.mark.slow
def test_adapt_plan_end_to_end_with_a_tiny_llama_and_restart(tmp_path):
    """The adapt stages (import, tokenize with its tokenizer, CARD and ARM from train.init_from,
    decoding at every checkpoint, report) on a random 2-layer Llama instead of SmolLM2; a rerun
    keeps everything."""
    import itertools

    from apps.study.adapt import ADAPT_PLANS, AdaptPlan, run_adapt
    from card_megatron.data.corpus import builtin_documents
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
    # both are the imported model on the same sequences (measured identical); rel 1e-6 leaves room for the two
    # objectives' validation to sum the same per-token nlls in another order
    assert start["card_ppl"] == pytest.approx(start["arm_ppl"], rel=1e-6)
    assert start["card_retention"] == 1.0  # the start's perplexity divided by itself
    later = report["points"][-1]
    assert later["best_tokens_per_forward"] >= 1.0 and later["ar_judge_ppl"] > 0
    assert later["lossless"]["tokens_per_forward"] >= 1.0 and later["lossless"]["same_as_ar"] == 1.0  # verify mode
    md = open(os.path.join(out, "adapt.md")).read()
    assert "| 2 |" in md and "= AR)" in md
    decoded = json.load(open(os.path.join(out, "adapt_decoding.json")))
    assert len(decoded) == 3  # the import (step 0) and the checkpoints of steps 1 and 2
    assert report["points"][0]["best_tokens_per_forward"] >= 1.0
    again = run_adapt(plan, out, source=src)  # restart: nothing is trained or decoded again
    assert again["meta"]["train_seconds"] == {} and again["points"] == report["points"]
