"""The study: CARD against its baselines and ablations, trained and measured by this codebase.

``run_study(plan, out)`` tokenizes the corpora, trains every run of the plan (ordinary
run directories under ``{out}/runs``), measures decoding and writes ``study.json``,
``study.md`` and PNG plots into ``out``. ``tools/study.py`` is its command line.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import platform
import sys
import time
from typing import Optional

from apps.study import decoding as dec
from apps.study import report
from apps.study.plans import COPY, MAIN, PLANS, STUDIED, Plan, get_plan
from apps.study.runner import StudyError, check_reuse, is_finished, prepare_corpora, run_dir, train_all

__all__ = ["PLANS", "Plan", "StudyError", "get_plan", "run_study"]

log = logging.getLogger("card_megatron.study")


def machine_description() -> str:
    """This machine for the report: the GPU and CPU cores, or the processor and cores without a GPU."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (1 GPU), {os.cpu_count()} CPU cores"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU"


def _load(path: str):
    from card_megatron.inference.loading import load_model

    with contextlib.redirect_stdout(io.StringIO()):
        return load_model(path)


def _measure_decoding(plan: Plan, out: str, corpora: dict, runs: dict[str, dict]) -> dict:
    """Runs the decoding stage, reusing ``decoding.json`` for parts whose checkpoints are unchanged."""
    from card_megatron.fileio import atomic_write
    from card_megatron.rundir import latest_checkpoint

    path = os.path.join(out, "decoding.json")
    cached = json.load(open(path)) if os.path.exists(path) else {}
    spec, result = plan.decode, {}
    names = {r.name for r in plan.runs}

    def part(key: str, inputs: list, compute):
        inputs = inputs + [repr(spec)]  # a changed decoding plan is measured again, not reused
        if cached.get(key, {}).get("inputs") == inputs:
            result[key] = cached[key]
        else:
            log.info("decoding: %s", key)
            result[key] = {"inputs": inputs, **compute()}
        atomic_write(path, json.dumps({**cached, **result}, indent=1))  # a killed study keeps finished parts

    card = os.path.join(out, "runs", "card-s0")
    arm = os.path.join(out, "runs", "arm-s0") if "arm-s0" in names else None
    split = runs["card-s0"]["split"]
    card_ckpt, arm_ckpt = latest_checkpoint(card), latest_checkpoint(arm) if arm else None

    def main_part():
        model, judge = _load(card_ckpt), _load(arm_ckpt) if arm_ckpt else None
        prompts = dec.main_prompts(corpora[MAIN].data_path, split, model.tokenizer, spec)
        res = {
            "model": card_ckpt,
            "judge": arm_ckpt,
            "num_prompts": len(prompts),
            "prompts": prompts,
            "max_new_tokens": spec.max_new_tokens,
        }
        for mode, greedy in (("greedy", True), ("sampled", False)):
            rows = dec.sweep(model, judge, prompts, spec, greedy)
            # greedy: the lossless number (output identical to AR); sampled: within 5% of AR's judge ppl
            res[mode] = {"rows": rows, "best": None if greedy else dec.best_within(rows)}
            if greedy:
                res[mode]["identical"] = dec.best_identical(rows)
        if judge is not None and spec.ar_sampling_seeds > 1:
            seeds = range(spec.ar_sampling_seeds)
            res["sampled"]["ar_seeds"] = dec.sampled_ar_spread(model, judge, prompts, spec, seeds)
        return res

    part("main", [card_ckpt, arm_ckpt], main_part)

    ckpts = dec.checkpoints_of(card)[-spec.curve_checkpoints :]

    def curve_part():
        judge = _load(arm_ckpt) if arm_ckpt else None
        evals = {e["step"]: e for e in runs["card-s0"]["evals"]}
        points = []
        for ck in ckpts:
            model = _load(ck)
            prompts = dec.main_prompts(corpora[MAIN].data_path, split, model.tokenizer, spec)
            rows = dec.sweep(model, judge, prompts, spec, greedy=True, windows=(max(spec.windows),))
            ev = evals.get(model.step, {})
            points.append(
                {
                    "checkpoint": ck,
                    "step": model.step,
                    "tokens": model.step * runs["card-s0"]["tokens_per_step"],
                    "ar_judge_ppl": rows[0].get("judge_ppl"),
                    "identical": dec.best_identical(rows),
                    "probe_acc_k1": ev.get("probe_acc_k1"),
                    "probe_conf_k1": ev.get("probe_conf_k1"),
                    "probe_conf": {k: v for k, v in ev.items() if k.startswith("probe_conf") and k.endswith("_k1")},
                    "rows": rows,
                }
            )
        return {"points": points}

    part("curve", ckpts + [arm_ckpt], curve_part)

    studied = [r for r in plan.runs if r.corpus == MAIN and r.objective == STUDIED]
    variant_ckpts = {r.name: latest_checkpoint(run_dir(out, r)) for r in studied}

    def variants_part():
        runs_out = {}
        for name, ck in variant_ckpts.items():
            model = _load(ck)
            prompts = dec.main_prompts(corpora[MAIN].data_path, split, model.tokenizer, spec)
            runs_out[name] = {"checkpoint": ck, "rows": dec.verify_rows(model, prompts, spec)}
        return {"runs": runs_out}

    part("variants", [f"{n}={c}" for n, c in sorted(variant_ckpts.items())], variants_part)

    copy_card = [r for r in plan.runs if r.corpus == COPY and r.objective == STUDIED]
    if copy_card:
        ck = latest_checkpoint(run_dir(out, copy_card[0]))

        def copy_part():
            model = _load(ck)
            prompts = dec.copy_prompts(corpora[COPY].data_path, runs[copy_card[0].name]["split"], model.tokenizer, spec)
            rows = dec.sweep(model, None, prompts, spec, greedy=True, max_new_tokens=spec.copy_max_new_tokens)
            return {
                "model": ck,
                "num_prompts": len(prompts),
                "prompts": prompts,
                "rows": rows,
                "identical": dec.best_identical(rows),
            }

        part("copy", [ck], copy_part)
    return result


def run_study(
    plan: Plan,
    out: str,
    data: Optional[str] = None,
    tokenizer: Optional[str] = None,
    jobs: Optional[int] = None,
    python: str = sys.executable,
) -> dict:
    """Runs (or resumes) ``plan`` into ``out``; returns the report's summary."""
    t0 = time.monotonic()
    os.makedirs(out, exist_ok=True)
    corpora = prepare_corpora(plan, out, data, tokenizer)
    check_reuse(plan, corpora, out)  # before anything is trained: old runs of other settings are refused
    trained = train_all(plan, corpora, out, jobs, python=python)
    runs = {}
    for r in plan.runs:
        assert is_finished(out, r)
        runs[r.name] = report.collect_run(run_dir(out, r), r)
    decoding = _measure_decoding(plan, out, corpora, runs)
    meta = {
        "machine": machine_description(),
        "elapsed_min": (time.monotonic() - t0) / 60,
        "runs_trained_now": len(trained),
        "train_seconds": trained,
        "written": time.strftime("%Y-%m-%d %H:%M"),
        "corpora": {k: {"data_path": c.data_path, "tokenizer": c.tokenizer} for k, c in corpora.items()},
        "budget_minutes": plan.budget_minutes,
        "valid_sequences": runs["card-s0"]["valid_sequences"],
    }
    return report.write(out, plan, meta, runs, decoding)
