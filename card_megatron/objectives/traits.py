"""What the rest of card_megatron may ask about an objective, declared once by the objective itself.

Every objective class carries an :class:`ObjectiveTraits` (``traits = ObjectiveTraits(...)``, next
to its maths in ``card.py``, ``arm.py``, ``mdlm.py``, ``bd3lm.py``); ``objectives/__init__.py``
registers the classes (:func:`register`). Outside ``objectives/`` no code compares objective
names: the model's attention, the decoders, exact or bound evaluation, export to a causal LM, the
lm-eval adapter, the config's choices of ``objective.name`` and the study's labels all ask
:func:`objective_traits` (``tests/test_objective_traits.py`` greps the library for comparisons).

This module imports neither torch nor the rest of card_megatron.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

MaskKind = Literal["causal", "full", "block"]
MASK_KINDS: tuple[str, ...] = typing.get_args(MaskKind)  # the attention rules an objective may ask the model for
MASK_KIND_TEXT = {"causal": "causal", "full": "full", "block": "block-wise"}  # how messages name them
Likelihood = Literal["exact", "bound"]
LmEvalLoglikelihood = Literal["exact", "bound", "refused"]


@dataclass(frozen=True)
class ObjectiveTraits:
    """Everything the code outside ``objectives/`` asks about one objective."""

    name: str
    """``objective.name``."""
    label: str
    """How reports and messages name it (``CARD``)."""
    mask_kind: MaskKind
    """The attention the model is built with: causal, full (bidirectional) or block (block-causal)."""
    likelihood: Likelihood
    """Validation: ``exact`` (one clean pass) or ``bound`` (an ELBO averaged over t: an upper bound on the NLL)."""
    decoders: tuple[str, ...]
    """The decoders (``inference/generate.DECODINGS``) that fit a checkpoint; the first is the default."""
    decoder_note: str
    """Why the other decoders are refused (the end of ``--decoding``'s error)."""
    causal_lm: bool
    """A ``transformers`` causal LM computes the same function: exported to Llama (``interop/hf_export``),
    and a Llama imported as its initial weights (``interop/hf_import``)."""
    lm_eval_loglikelihood: LmEvalLoglikelihood
    """The lm-eval adapter's loglikelihood requests: ``exact`` (clean causal scoring), ``bound`` (the
    masked-diffusion conditional ELBO) or ``refused``."""
    lm_eval_generation: bool = True
    """The lm-eval adapter's generate_until runs (with the default decoder unless told otherwise)."""
    sequence_length_multiplier: int = 1
    """Positions the model reads per sampled token (BD3LM: 2, concat(xt, x0))."""
    mask_diagnostics: bool = False
    """The model reads [MASK] under causal attention: training logs the per-corruption metrics and the
    mask probe (``training/diagnostics.py``; ``logging.corruption_metrics``, ``logging.probe_window``)."""
    exclusive_keys: tuple[str, ...] = ()
    """``objective.*`` keys only this objective reads: another objective refuses them when they differ
    from their default."""

    def __post_init__(self) -> None:
        problems = []
        if self.mask_kind not in MASK_KINDS:
            problems.append(f"mask_kind {self.mask_kind!r} must be one of {', '.join(MASK_KINDS)}")
        if self.likelihood not in typing.get_args(Likelihood):
            problems.append(f"likelihood {self.likelihood!r} must be exact or bound")
        if self.lm_eval_loglikelihood not in typing.get_args(LmEvalLoglikelihood):
            problems.append(f"lm_eval_loglikelihood {self.lm_eval_loglikelihood!r} must be exact, bound or refused")
        if not self.decoders:
            problems.append("decoders must name at least one decoder (the first is the default)")
        if self.causal_lm and (self.mask_kind != "causal" or self.sequence_length_multiplier != 1):
            problems.append("causal_lm needs causal attention over the tokens themselves")
        if problems:
            raise ValueError(f"objective {self.name!r}: " + "; ".join(problems))

    @property
    def default_decoder(self) -> str:
        return self.decoders[0]

    @property
    def is_bound(self) -> bool:
        """Whether validation perplexity is an upper bound (an ELBO) rather than exact."""
        return self.likelihood == "bound"


_REGISTERED: dict[str, type] = {}  # objective.name -> its class, in registration order


def register(cls: type) -> type:
    """Makes ``cls`` (an ``Objective`` with ``traits``) the objective ``cls.traits.name``; returns it."""
    traits = getattr(cls, "traits", None)
    if not isinstance(traits, ObjectiveTraits):
        raise TypeError(f"{cls.__name__} has no ObjectiveTraits (set traits = ObjectiveTraits(...))")
    if _REGISTERED.get(traits.name, cls) is not cls:
        raise ValueError(f"objective {traits.name!r} is registered twice ({_REGISTERED[traits.name].__name__})")
    _REGISTERED[traits.name] = cls
    return cls


def objective_names() -> tuple[str, ...]:
    """The registered objectives' names (``objective.name``'s choices), in registration order."""
    return tuple(_REGISTERED)


def objective_class(name: str) -> type:
    """The objective class registered as ``name``; ValueError naming the known objectives."""
    if name not in _REGISTERED:
        raise ValueError(f"unknown objective {name!r} (known objectives: {', '.join(_REGISTERED)})")
    return _REGISTERED[name]


def objective_traits(name: str) -> ObjectiveTraits:
    """The traits of objective ``name``; ValueError naming the known objectives."""
    return objective_class(name).traits
