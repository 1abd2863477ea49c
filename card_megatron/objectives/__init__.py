"""Training objectives: CARD and its ARM / MDLM / BD3LM baselines (pure tensor math).

``build_objective`` is the only name the training loop needs; nothing outside this
package chooses anything objective-specific by name. No module here imports
``torch.distributed`` or knows about parallelism.
"""

from __future__ import annotations

from card_megatron.config import OBJECTIVES, ObjectiveConfig, check_objective
from card_megatron.objectives.arm import ArmObjective
from card_megatron.objectives.base import LossInputs, ModelInputs, Objective
from card_megatron.objectives.bd3lm import Bd3lmObjective, block_diffusion_attention_mask
from card_megatron.objectives.card import CardObjective, context_aware_weights, soft_tail_mask
from card_megatron.objectives.mdlm import MdlmObjective

__all__ = [
    "build_objective",
    "Objective",
    "ModelInputs",
    "LossInputs",
    "soft_tail_mask",
    "context_aware_weights",
    "block_diffusion_attention_mask",
]

_OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (CardObjective, ArmObjective, MdlmObjective, Bd3lmObjective)
}
assert tuple(_OBJECTIVES) == OBJECTIVES, "config.OBJECTIVES and the registered objectives disagree"


def build_objective(objective_cfg: ObjectiveConfig, seq_length: int, mask_token_id: int, vocab_size: int) -> Objective:
    """The objective named by ``objective_cfg.name`` for samples of seq_length + 1 tokens.

    mask_token_id: the [MASK] id (inside vocab_size; unused by ARM). Raises ConfigError (a ValueError)
    naming each setting at fault: the section is checked by ``config.check_objective``, the rules
    ``load_config`` applies.
    """
    check_objective(objective_cfg, seq_length)
    return _OBJECTIVES[objective_cfg.name](objective_cfg, seq_length, mask_token_id, vocab_size)
