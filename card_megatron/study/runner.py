"""Running a plan: tokenize the corpora, train every run, measure decoding, write the report.

Every stage is restartable. A corpus whose shard exists is not tokenized again; a run
whose directory holds ``finished`` is kept; any other run is (re)started with the same
command, and the trainer resumes it from its newest complete checkpoint; decoding
results are kept in ``decoding.json`` keyed by the checkpoints they measured. A killed
study therefore restarts where it stopped.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

from card_megatron.study.plans import COPY, MAIN, Plan, RunSpec

log = logging.getLogger("card_megatron.study")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class StudyError(RuntimeError):
    """A stage of the study failed; the message names the run and its log."""


@dataclass(frozen=True)
class Corpus:
    data_path: str  # shard prefix (..._text_document)
    tokenizer: str


def prepare_corpora(
    plan: Plan, out: str, data: Optional[str] = None, tokenizer: Optional[str] = None
) -> dict[str, Corpus]:
    """Tokenizes the plan's corpora under ``{out}/data`` (skipping those already there).

    ``data``/``tokenizer`` replace the main corpus (a shard prefix and its SentencePiece model).
    """
    from card_megatron.data.preprocess import PreprocessOptions, preprocess
    from card_megatron.data.shards import shard_exists

    corpora: dict[str, Corpus] = {}
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    for key, spec in plan.corpora.items():
        if key == MAIN and data:
            if not tokenizer:
                raise StudyError("--data needs --tokenizer (the SentencePiece model that tokenized it)")
            if not shard_exists(data):
                raise StudyError(f"--data {data}: no shard {data}.bin/.idx")
            corpora[key] = Corpus(data, tokenizer)
            continue
        prefix = os.path.join(out, "data", key)
        corpus = Corpus(f"{prefix}_text_document", f"{prefix}.model")
        if not (shard_exists(corpus.data_path) and os.path.exists(corpus.tokenizer)):
            log.info("tokenizing %s (%d-piece tokenizer) -> %s", spec.input, spec.vocab_size, corpus.data_path)
            preprocess(
                PreprocessOptions(
                    inputs=[spec.input],
                    output_prefix=prefix,
                    train_tokenizer=True,
                    vocab_size=spec.vocab_size,
                    workers=max(1, plan.jobs),
                    overwrite=True,
                )
            )
        corpora[key] = corpus
    return corpora


def run_dir(out: str, run: RunSpec) -> str:
    return os.path.join(out, "runs", run.name)


def train_command(plan: Plan, run: RunSpec, corpus: Corpus, out: str, python: str = sys.executable) -> list[str]:
    """The ordinary training command of one run (single process)."""
    overrides = list(plan.overrides) + (list(plan.copy_overrides) if run.corpus == COPY else [])
    overrides += list(run.overrides) + [
        f"objective.name={run.objective}",
        f"train.seed={1234 + run.seed}",
        f"train.run_dir={run_dir(out, run)}",
        f"data.data_path={corpus.data_path}",
        f"data.tokenizer_model={corpus.tokenizer}",
    ]
    return [python, "-m", "card_megatron.train", "--config", os.path.join(REPO, plan.config), *overrides]


def is_finished(out: str, run: RunSpec) -> bool:
    return os.path.exists(os.path.join(run_dir(out, run), "finished"))


def train_all(
    plan: Plan,
    corpora: dict[str, Corpus],
    out: str,
    jobs: Optional[int] = None,
    only: Optional[set[str]] = None,
    python: str = sys.executable,
) -> dict[str, float]:
    """Trains every unfinished run, ``jobs`` at a time; returns {run: seconds} of the runs trained now.

    Each run's output goes to ``{run_dir}/train.log``. Raises StudyError naming the runs that
    failed (the others still complete).
    """
    jobs = max(1, jobs or plan.jobs)
    todo = [r for r in plan.runs if (only is None or r.name in only) and not is_finished(out, r)]
    done = len([r for r in plan.runs if is_finished(out, r)])
    if done:
        log.info("%d run(s) already finished: kept", done)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}  # each run is its own single process
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
        }
    )
    running: list[tuple[RunSpec, subprocess.Popen, float, object]] = []
    seconds: dict[str, float] = {}
    failed: list[str] = []
    queue = list(todo)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                run = queue.pop(0)
                os.makedirs(run_dir(out, run), exist_ok=True)
                logf = open(os.path.join(run_dir(out, run), "train.log"), "a")
                state = "resuming" if os.path.isdir(os.path.join(run_dir(out, run), "checkpoints")) else "training"
                log.info("%s %s (%s)", state, run.name, run.label)
                proc = subprocess.Popen(
                    train_command(plan, run, corpora[run.corpus], out, python),
                    cwd=REPO,
                    env=env,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
                running.append((run, proc, time.monotonic(), logf))
            time.sleep(0.5)
            for item in list(running):
                run, proc, start, logf = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                logf.close()
                seconds[run.name] = time.monotonic() - start
                if proc.returncode != 0 or not is_finished(out, run):
                    failed.append(run.name)
                    log.error(
                        "run %s failed (exit %s); see %s",
                        run.name,
                        proc.returncode,
                        os.path.join(run_dir(out, run), "train.log"),
                    )
                else:
                    log.info(
                        "finished %s in %.0f s (%d of %d runs done)",
                        run.name,
                        seconds[run.name],
                        len([r for r in plan.runs if is_finished(out, r)]),
                        len(plan.runs),
                    )
    finally:
        for _, proc, _, logf in running:  # interrupted: stop the children, they resume next time
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            logf.close()
    if failed:
        raise StudyError(
            f"{len(failed)} run(s) failed: {', '.join(failed)} (logs: {out}/runs/<run>/train.log); "
            "rerun the same command to retry them"
        )
    return seconds
