"""The study's plans: which runs, on which corpora, with which decoding sweeps.

A plan is data: corpora to tokenize, training runs (each an ordinary run directory,
trained by ``python -m card_megatron.train`` with the plan's config and the run's
overrides), and the decoding measurements. ``smoke`` exercises every part in about a
minute (the tests run it), ``cpu`` fits the 2-core development machine (46.5
minutes on 2026-12-07), ``gpu`` is the same study at a larger scale for one GPU.

Run names say what they are: ``{variant}-s{seed}`` on the main corpus and
``copy-{objective}-s{seed}`` on the synthetic copy corpus.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from card_megatron.inference.causal import COMMIT_POLICIES
from card_megatron.objectives import objective_traits

MAIN, COPY = "main", "copy"  # the two corpora of every plan
# The objective the study is about and its autoregressive reference (run names card-s0, arm-s0): the
# report reads the other runs against these two. What an objective is comes from its traits.
STUDIED = "card"
REFERENCE = "arm"
VALID_SEED = 1234  # data.valid_seed of every run: all runs of a study validate on the same sequences


@dataclass(frozen=True)
class CorpusSpec:
    """A corpus the study tokenizes itself (``--data`` replaces the main one)."""

    input: str  # what tools/preprocess_data.py reads, e.g. builtin:python-code
    vocab_size: int


@dataclass(frozen=True)
class RunSpec:
    """One training run. ``group``: efficiency | ablation | sweep | synthetic."""

    name: str
    corpus: str
    group: str
    label: str  # the variant, as the report names it (e.g. "strict tail (lambda=1)")
    objective: str
    seed: int
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class DecodeFamily:
    """One family of CARD decoding rows, measured at every (K, tau) of the sweep: adding a family
    to a plan is one line.

    ``forced_tokens_per_pass`` f forces commits the way the paper's decoder does: a step limit of
    K // f passes per block of K new tokens. The decoder's ``max_steps`` counts passes per
    sequence, so the limit is applied as K // f x ceil(max_new_tokens / K) passes per sequence,
    the last one committing what is left (at least f tokens per pass on average, not a per-block
    limit); its rows are labelled forced. ``thresholds`` replaces the sweep's (verify mode ignores
    tau: one row per K).
    """

    name: str  # the rows' prefix: "card K=4 tau=0.5", "forced ...", "verify K=4"
    commit_policy: str = "prefix"
    forced_tokens_per_pass: Optional[int] = None
    thresholds: Optional[tuple[float, ...]] = None
    note: str = ""


THRESHOLD = DecodeFamily("card", note="threshold decoding: commit the confident masked positions, left to right")


def decode_families(forced_tokens_per_pass: Optional[int] = None) -> tuple[DecodeFamily, ...]:
    """Threshold decoding, forced commits (when given) and, once the decoder offers it, verify mode
    (output identical to greedy AR by construction: the lossless tokens-per-forward number)."""
    families = [THRESHOLD]
    if forced_tokens_per_pass:
        f = forced_tokens_per_pass
        families.append(
            DecodeFamily(
                "forced",
                forced_tokens_per_pass=f,
                note=f"forced commits (paper-style step limit): K // {f} passes per block of K new tokens, "
                "applied as a per-sequence budget (the decoder's max_steps), the last pass committing what is left",
            )
        )
    if "verify" in COMMIT_POLICIES:
        families.append(
            DecodeFamily("verify", commit_policy="verify", thresholds=(0.9,), note="verify: drafts checked by AR")
        )
    return tuple(families)


@dataclass(frozen=True)
class DecodeSpec:
    """The decoding measurements (CARD.md §4) of the study's CARD models."""

    num_prompts: int  # prompts from held-out documents of the main corpus
    prompt_tokens: int  # tokens of each main-corpus prompt
    max_new_tokens: int
    thresholds: tuple[float, ...]  # tau; a value > 1 commits one token per step
    windows: tuple[int, ...]  # K
    families: tuple[DecodeFamily, ...] = (THRESHOLD,)  # the rows of each sweep (see decode_families)
    temperature: float = 1.0  # the sampled sweep (the greedy sweep always runs)
    top_p: float = 0.9
    copy_prompts: int = 16  # synthetic corpus: prompts = a document's first string and its period
    copy_max_new_tokens: int = 48
    curve_checkpoints: int = 4  # checkpoints of the main CARD run decoded for the curve against tokens
    ar_sampling_seeds: int = 5  # sampled AR repeated with seeds 0..n-1: the judge perplexity's noise floor


@dataclass(frozen=True)
class Plan:
    name: str
    description: str
    config: str  # base YAML (model, optimizer, schedule) of every run
    overrides: tuple[str, ...]  # applied to every run
    copy_overrides: tuple[str, ...]  # applied to the synthetic-corpus runs after ``overrides``
    corpora: dict[str, CorpusSpec]
    runs: tuple[RunSpec, ...]
    decode: DecodeSpec
    jobs: int = 2  # training runs at once (one process each)
    valid_seed: int = VALID_SEED  # data.valid_seed of every run (the same validation sequences for all)
    budget_minutes: float = 0.0  # what the plan is sized for on its machine (reported, not enforced)
    notes: tuple[str, ...] = field(default=())

    def with_overrides(self, extra: tuple[str, ...]) -> "Plan":
        """This plan with ``extra`` (``section.key=value``) applied to every run after the plan's own
        overrides (the copy runs' included), e.g. a tiny budget to check the whole plan end to end."""
        if not extra:
            return self
        return dataclasses.replace(
            self, overrides=self.overrides + tuple(extra), copy_overrides=self.copy_overrides + tuple(extra)
        )


# The paper's ablations (CARD.md §2-3) and the sweeps: (name, label, overrides).
ABLATIONS = (
    ("strict", "strict tail (lambda=1)", ("objective.tail_factor=1.0",)),
    ("uniform", "uniform masking", ("objective.masking=uniform",)),
    ("noreweight", "no reweighting", ("objective.reweighting=none",)),
    # the decoder-aware ablation: the decoder reads a clean prefix and a solid run of masks
    ("mixstrict", "soft tail + 25% strict-tail samples", ("objective.strict_tail_fraction=0.25",)),
)
SWEEPS = (
    ("lambda1.25", "lambda=1.25", ("objective.tail_factor=1.25",)),
    ("lambda2", "lambda=2", ("objective.tail_factor=2.0",)),
    ("p0.25", "p=0.25", ("objective.reweight_decay=0.25",)),
    ("p0.75", "p=0.75", ("objective.reweight_decay=0.75",)),
)
FULL_CARD = "full CARD (lambda=1.5, p=0.5)"


def _runs(
    seeds: int,
    ablation_seeds: int,
    sweep_seeds: int,
    baselines: tuple[str, ...],
    copy_objectives: tuple[str, ...],
) -> tuple[RunSpec, ...]:
    """The runs of a plan. Sweep rows with fewer seeds than full CARD are compared with full CARD of
    the same seeds only (the report's "vs full CARD, same seeds" column)."""
    runs = []
    for objective in copy_objectives:  # first: the end-to-end check of objective + decoder
        runs.append(RunSpec(f"copy-{objective}-s0", COPY, "synthetic", objective_traits(objective).label, objective, 0))
    reference = objective_traits(REFERENCE).label
    for seed in range(seeds):
        runs.append(RunSpec(f"{REFERENCE}-s{seed}", MAIN, "efficiency", reference, REFERENCE, seed))
        runs.append(RunSpec(f"{STUDIED}-s{seed}", MAIN, "efficiency", FULL_CARD, STUDIED, seed))
    for name in baselines:
        runs.append(RunSpec(f"{name}-s0", MAIN, "efficiency", objective_traits(name).label, name, 0))
    for name, label, over in ABLATIONS:
        for seed in range(ablation_seeds):
            runs.append(RunSpec(f"{name}-s{seed}", MAIN, "ablation", label, STUDIED, seed, over))
    for name, label, over in SWEEPS:
        for seed in range(sweep_seeds):
            runs.append(RunSpec(f"{name}-s{seed}", MAIN, "sweep", label, STUDIED, seed, over))
    return tuple(runs)


PLANS: dict[str, Plan] = {
    "smoke": Plan(
        name="smoke",
        description="every stage of the study on a toy model in about a minute (run by the tests)",
        config="configs/study-cpu.yaml",
        overrides=(
            "model.num_layers=2",
            "model.hidden_size=64",
            "model.num_attention_heads=2",
            "model.ffn_hidden_size=128",
            "model.seq_length=32",
            "train.train_iters=6",
            "train.micro_batch_size=4",
            "train.global_batch_size=4",
            "train.eval_iters=1",
            "train.eval_interval=3",
            "train.save_interval=3",
            "train.log_interval=3",
            "optim.lr_warmup_iters=2",
            "logging.probe_window=4",
            "logging.probe_min_prefix=8",
            "logging.probe_cuts=2",
        ),
        copy_overrides=(),
        corpora={MAIN: CorpusSpec("builtin:python-docs", 512), COPY: CorpusSpec("builtin:synthetic-copy", 512)},
        runs=_runs(1, 1, 0, ("mdlm", "bd3lm"), ("card",)),
        decode=DecodeSpec(
            num_prompts=2,
            prompt_tokens=8,
            max_new_tokens=8,
            thresholds=(0.5, 2.0),
            windows=(4,),
            copy_prompts=2,
            copy_max_new_tokens=8,
            curve_checkpoints=2,
            ar_sampling_seeds=2,
            families=decode_families(forced_tokens_per_pass=2),
        ),
        budget_minutes=2,
    ),
    "cpu": Plan(
        name="cpu",
        description="the study on the 2-core CPU machine (47 minutes measured on 2026-12-07)",
        config="configs/study-cpu.yaml",
        # 512 validation sequences and 4 probe cuts each (2,048 predictions per k): sized from the measured
        # per-sequence spread of two seeds on the same sequences (docs/study.md, "Sizing the validation")
        overrides=("train.eval_iters=32", "logging.probe_min_prefix=24", "logging.probe_cuts=4"),
        # copying a 9-token period is learned by 2 layers; 2,400 steps make it confident (docs/study.md)
        copy_overrides=(
            "model.num_layers=2",
            "train.train_iters=2400",
            "train.eval_interval=400",
            "train.save_interval=400",
            "train.eval_iters=8",  # its perplexity curve is read alone (no comparison across seeds)
        ),
        corpora={MAIN: CorpusSpec("builtin:python-code", 2048), COPY: CorpusSpec("builtin:synthetic-copy", 1024)},
        runs=_runs(2, 2, 1, ("mdlm", "bd3lm"), ("card", "arm")),
        decode=DecodeSpec(
            num_prompts=16,
            prompt_tokens=24,
            max_new_tokens=48,
            thresholds=(0.3, 0.5, 0.7, 0.9, 2.0),
            windows=(4, 8),
            families=decode_families(forced_tokens_per_pass=2),
        ),
        budget_minutes=90,  # what it is sized for; the run of 2026-12-07 took 46.5 min (docs/study.md)
    ),
    "gpu": Plan(
        name="gpu",
        description="the study with a 30M-parameter model on one GPU (four runs at a time)",
        config="configs/study-gpu.yaml",
        # 512 validation sequences (study-gpu.yaml: 8 x 64), probe after a prompt's 32 tokens, 4 cuts each
        overrides=("logging.probe_min_prefix=32", "logging.probe_cuts=4"),
        copy_overrides=(),
        corpora={MAIN: CorpusSpec("builtin:python-code", 8192), COPY: CorpusSpec("builtin:synthetic-copy", 1024)},
        runs=_runs(2, 2, 1, ("mdlm", "bd3lm"), ("card", "arm")),
        decode=DecodeSpec(
            num_prompts=64,
            prompt_tokens=32,
            max_new_tokens=96,
            thresholds=(0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 2.0),
            windows=(4, 8, 16),
            copy_prompts=64,
            families=decode_families(forced_tokens_per_pass=2),
        ),
        jobs=4,
        budget_minutes=10,
    ),
}


def get_plan(name: str) -> Plan:
    if name not in PLANS:
        raise ValueError(f"unknown plan {name!r} (available: {', '.join(PLANS)})")
    return PLANS[name]
