"""Running a plan: tokenize the corpora, train every run, measure decoding, write the report.

Every stage is restartable. A corpus whose shard exists is not tokenized again; a run
whose directory holds ``finished`` is kept; any other run is (re)started with the same
command, and the trainer resumes it from its newest complete checkpoint; decoding
results are kept in ``decoding.json`` keyed by the checkpoints they measured and the
decoding plan. A killed study therefore restarts where it stopped.

Nothing is reused silently (:func:`check_reuse`): a run directory is kept only when its saved
config equals the one the plan would train now and its data and tokenizer files are the ones
it was trained on (``study_run.json``); a tokenized corpus only when its input and vocabulary
size are the plan's (``{prefix}.study.json``). Otherwise the study refuses, naming what differs.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

from apps.study.plans import COPY, MAIN, Plan, RunSpec
from card_megatron.fileio import file_sha256

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
        record_path, wanted = f"{prefix}.study.json", {"input": spec.input, "vocab_size": spec.vocab_size}
        if shard_exists(corpus.data_path) and os.path.exists(record_path):
            with open(record_path) as f:
                recorded = json.load(f)
            if recorded != wanted:
                raise StudyError(
                    f"corpus {key}: {out}/data holds {recorded['input']} with a {recorded['vocab_size']}-piece "
                    f"tokenizer, the plan asks for {spec.input} with {spec.vocab_size}: use another --out (or delete "
                    f"{prefix}* and the runs trained on it)"
                )
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
        if not os.path.exists(record_path):
            from card_megatron.fileio import atomic_write

            atomic_write(record_path, json.dumps(wanted))
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
        f"data.valid_seed={plan.valid_seed}",
        f"train.run_dir={run_dir(out, run)}",
        f"data.data_path={corpus.data_path}",
        f"data.tokenizer_model={corpus.tokenizer}",
    ]
    return [python, "-m", "card_megatron.train", "--config", os.path.join(REPO, plan.config), *overrides]


RUN_RECORD = "study_run.json"  # in each run directory: the data and tokenizer it was trained on


def planned_config(plan: Plan, run: RunSpec, corpus: Corpus, out: str) -> dict:
    """The resolved config (as a dict) that :func:`train_command` trains, as the trainer saves it."""
    from card_megatron.config import config_to_dict, load_config

    command = train_command(plan, run, corpus, out)
    at = command.index("--config")
    return config_to_dict(load_config(command[at + 1], command[at + 2 :]))


def inputs_record(corpus: Corpus) -> dict:
    """What a run was trained on: the shard's fingerprint and the tokenizer file's SHA-256."""
    from card_megatron.data.shards import shard_fingerprint

    return {"data_fingerprint": shard_fingerprint(corpus.data_path), "tokenizer_sha256": file_sha256(corpus.tokenizer)}


def _config_changes(saved: dict, wanted: dict) -> list[str]:
    from card_megatron.config import ConfigError, config_from_dict, config_to_dict

    try:
        saved = config_to_dict(config_from_dict(saved))  # keys added since then take their defaults
    except ConfigError as e:
        return [str(e)]
    return [
        f"{section}.{key}: {saved.get(section, {}).get(key)!r} -> {value!r}"
        for section, values in wanted.items()
        for key, value in values.items()
        if saved.get(section, {}).get(key) != value
    ]


def check_reuse(plan: Plan, corpora: dict[str, Corpus], out: str) -> None:
    """Raises StudyError naming every existing run of ``plan`` under ``out`` that was trained (or
    started) with another config, data or tokenizer than the plan's now (e.g. another ``--data``):
    reusing it would report old results under the new settings. Runs never started pass."""
    import yaml

    differ = []
    for run in plan.runs:
        path = os.path.join(run_dir(out, run), "config.yaml")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            saved = yaml.safe_load(f) or {}
        changes = _config_changes(saved, planned_config(plan, run, corpora[run.corpus], out))
        record = os.path.join(run_dir(out, run), RUN_RECORD)
        if not changes and os.path.exists(record):
            with open(record) as f:
                trained_on = json.load(f)
            now = inputs_record(corpora[run.corpus])
            changes = [f"{k}: {trained_on.get(k)} -> {v}" for k, v in now.items() if trained_on.get(k) != v]
        if changes:
            more = f"; {len(changes) - 2} more" if len(changes) > 2 else ""
            differ.append(f"{run.name} ({'; '.join(changes[:2])}{more})")
    if differ:
        raise StudyError(
            f"{len(differ)} run(s) under {out}/runs were trained with other settings than this plan's and "
            f"would be reported as its results: {', '.join(differ)}. Use another --out, or delete those run "
            "directories to train them again"
        )


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
                record = os.path.join(run_dir(out, run), RUN_RECORD)
                if not os.path.exists(record):
                    from card_megatron.fileio import atomic_write

                    atomic_write(record, json.dumps(inputs_record(corpora[run.corpus])))
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
