"""The objective's section of the config (``objective.*``), its ranges and its rules.

``config.py`` composes the tree from this section and checks it with :func:`objective_problems`;
:func:`check_objective` (run by ``build_objective``) applies the same rules to an objective built
without the loader. The rules that belong to one objective are declared by it: its
``exclusive_keys`` (traits) and its ``config_problems`` classmethod (BD3LM's block size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from card_megatron.config_checks import ConfigError, Range, choice_problems, range_problems
from card_megatron.objectives.traits import objective_class, objective_names

_INF = math.inf


@dataclass
class ObjectiveConfig:
    """The training objective; see ``card_megatron/objectives`` and CARD.md."""

    name: str = field(default="card", metadata={"choices": objective_names})
    """Objective: CARD or one of its baselines (ARM, MDLM, BD3LM); the choices are the registered objectives."""
    masking: Literal["tail", "uniform"] = "tail"
    """CARD: where masks go: soft tail (a window at the end of the sequence) or uniform."""
    tail_factor: float = 1.5
    """CARD: lambda, the tail window's size relative to the masked count; 1 = strict (solid) tail."""
    strict_tail_fraction: float = 0.0
    """CARD: fraction of samples masked with a strict tail (lambda = 1) instead, chosen per sample from its
    noise seed: the decoder-aware ablation (the decoder reads a clean prefix and a solid run of masks); 0 = off."""
    reweighting: Literal["context", "none"] = "context"
    """CARD: context-aware loss weights (down-weight targets behind many masks) or none."""
    reweight_decay: float = 0.5
    """CARD: p, the decay of the context-aware weights."""
    reweight_beta: float = 1.0
    """CARD: beta, the strength of the context-aware weights."""
    normaliser: Literal["weights", "tokens"] = "weights"
    """CARD: the loss is divided by the sum of the weights or by the token count."""
    t_eps: float = 1e-3
    """MDLM/BD3LM: t is drawn from [t_eps, 1] so that 1/t stays bounded."""
    low_discrepancy: bool = True
    """Noise levels t from a Weyl sequence over the global sample id (else independent draws)."""
    block_size: int = 4
    """BD3LM: block size (must divide model.seq_length; e.g. 4, 8, 16 or seq_length)."""
    eval_t_samples: int = 4
    """MDLM/BD3LM: Monte-Carlo t samples of the validation ELBO."""


# The range of every numeric key of the section (config.RANGES holds them with the other sections').
RANGES: dict[str, Range] = {
    "objective.tail_factor": (1, _INF, True, False, " (1 = strict tail)"),
    "objective.strict_tail_fraction": (0, 1, True, True, " (0 = off)"),
    "objective.reweight_decay": (0, 1, True, True, ""),
    "objective.reweight_beta": (0, _INF, False, False, ""),
    "objective.t_eps": (0, 1, False, False, ""),
    "objective.block_size": (1, _INF, True, False, ""),
    "objective.eval_t_samples": (1, _INF, True, False, ""),
}


def objective_problems(o: ObjectiveConfig, seq_length: int) -> list[str]:
    """Every problem of the objective section: its choices (``objective.name`` among the registered
    objectives), its ranges, the keys another objective owns, and the chosen objective's own rules."""
    p = choice_problems("objective", o) + range_problems("objective", o, RANGES)
    if o.name not in objective_names():
        return p  # named by choice_problems; no objective's rules apply
    default = ObjectiveConfig()
    for name in objective_names():
        owner = objective_class(name).traits
        if name == o.name:
            continue
        for key in owner.exclusive_keys:  # e.g. CARD's strict_tail_fraction
            if getattr(o, key) != getattr(default, key):
                p.append(
                    f"objective.{key} ({getattr(o, key)}) applies to {owner.label} only (objective.name is {o.name})"
                )
    return p + objective_class(o.name).config_problems(o, seq_length)


def check_objective(o: ObjectiveConfig, seq_length: int) -> None:
    """Raises ConfigError listing every problem of the objective section (``build_objective`` calls
    it, so an objective built without ``config.load_config`` is checked by the same rules)."""
    p = objective_problems(o, seq_length)
    if p:
        raise ConfigError("invalid objective configuration:\n  - " + "\n  - ".join(p))
