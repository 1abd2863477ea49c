"""Training objectives: CARD and its ARM / MDLM / BD3LM baselines (pure tensor math), each one plug-in.

An objective is one module here: its class (the maths: ``prepare``, ``eval_passes``) declares its
:class:`ObjectiveTraits` (everything the rest of the code asks about it, and its own config rules);
this file registers the classes, in the order the config and the docs list them
(:data:`OBJECTIVE_CLASSES`). ``build_objective`` is the only name the
training loop needs, ``objective_traits(name)`` the only question other packages ask; nothing
outside this package compares objective names. The package also owns its config section
(``config.py``: ``ObjectiveConfig``, its ranges and rules), which ``card_megatron/config.py``
composes into the tree. No module here imports ``torch.distributed`` or knows about parallelism.
"""

from __future__ import annotations

from card_megatron.objectives.arm import ArmObjective
from card_megatron.objectives.base import LossInputs, ModelInputs, Objective
from card_megatron.objectives.bd3lm import Bd3lmObjective, block_diffusion_attention_mask
from card_megatron.objectives.card import CardObjective, context_aware_weights, soft_tail_mask
from card_megatron.objectives.config import ObjectiveConfig, check_objective, objective_problems
from card_megatron.objectives.mdlm import MdlmObjective
from card_megatron.objectives.traits import (
    MASK_KINDS,
    ObjectiveTraits,
    objective_class,
    objective_names,
    objective_traits,
    register,
)

__all__ = [
    "MASK_KINDS",
    "build_objective",
    "check_objective",
    "Objective",
    "ObjectiveConfig",
    "ObjectiveTraits",
    "ModelInputs",
    "LossInputs",
    "objective_names",
    "objective_problems",
    "objective_traits",
    "soft_tail_mask",
    "context_aware_weights",
    "block_diffusion_attention_mask",
]

# The registered objectives, in the order the config's choices and the docs list them.
OBJECTIVE_CLASSES: tuple[type[Objective], ...] = (CardObjective, ArmObjective, MdlmObjective, Bd3lmObjective)
for _cls in OBJECTIVE_CLASSES:
    register(_cls)


def build_objective(objective_cfg: ObjectiveConfig, seq_length: int, mask_token_id: int, vocab_size: int) -> Objective:
    """The objective named by ``objective_cfg.name`` for samples of seq_length + 1 tokens.

    mask_token_id: the [MASK] id (inside vocab_size; unused by ARM). Raises ConfigError (a ValueError)
    naming each setting at fault: the section is checked by :func:`check_objective`, the rules
    ``config.load_config`` applies.
    """
    check_objective(objective_cfg, seq_length)
    return objective_class(objective_cfg.name)(objective_cfg, seq_length, mask_token_id, vocab_size)
