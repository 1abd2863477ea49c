"""The interface every tokenizer here has, and what is built on it alone.

:class:`Tokenizer` is the protocol that preprocessing, training, evaluation, generation and the
interop code use; :class:`~card_megatron.tokenizers.sentencepiece.SentencePieceTokenizer` and
:class:`~card_megatron.tokenizers.huggingface.HuggingFaceTokenizer` implement it. The sidecar
record (:func:`tokenizer_metadata`, :func:`write_tokenizer_sidecar`) reads only the protocol.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Protocol, runtime_checkable

from card_megatron.fileio import atomic_write


@runtime_checkable
class Tokenizer(Protocol):
    """A tokenizer plus the reserved ids card_megatron uses.

    ``num_pieces``: ids of the underlying model; ``vocab_size``: ``num_pieces`` plus the reserved ids
    appended after them (``appended`` names their roles: mask, eos, bos, pad); ``unk_id`` is -1
    without one; ``sha256`` identifies the model (two models of one size differ there).
    """

    source: str
    num_pieces: int
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    mask_id: int
    unk_id: int
    appended: tuple[str, ...]
    sha256: str

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos added)."""

    def encode_batch(self, texts: Sequence[str], add_eos: bool = False, num_threads: int = 1) -> list:
        """Token ids of each text as int32 NumPy arrays ``[len_i]``, with eos appended if ``add_eos``."""

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; the reserved ids are dropped."""

    def serialized(self) -> bytes:
        """The model's bytes (what the class's ``from_serialized`` takes), e.g. to ship to worker processes."""

    def metadata(self) -> dict[str, Any]:
        """The sidecar record (:func:`tokenizer_metadata`)."""


def looks_like_json(data: bytes) -> bool:
    """True for the bytes of a ``tokenizer.json`` (a JSON object), False for a SentencePiece model."""
    return data.lstrip()[:1] == b"{"


def tokenizer_metadata(tok: Tokenizer) -> dict[str, Any]:
    """A tokenizer's sidecar record: the reserved ids and sizes, and the model's ``sha256``."""
    return {
        "model": os.path.abspath(tok.source) if os.path.exists(tok.source) else tok.source,
        "vocab_size": tok.vocab_size,
        "num_pieces": tok.num_pieces,
        "pad_id": tok.pad_id,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "mask_id": tok.mask_id,
        "unk_id": tok.unk_id,
        "appended": list(tok.appended),
        "sha256": tok.sha256,
    }


def tokenizer_repr(tok: Tokenizer) -> str:
    return (
        f"{type(tok).__name__}({tok.source!r}, vocab_size={tok.vocab_size}, pad={tok.pad_id}, bos={tok.bos_id}, "
        f"eos={tok.eos_id}, mask={tok.mask_id})"
    )


def write_tokenizer_sidecar(tokenizer: Tokenizer, path: str, inputs: Optional[list[dict[str, Any]]] = None) -> None:
    """Writes ``tokenizer.metadata()`` as JSON to ``path`` (temp name, then rename).

    ``inputs``: what the data was made of (one record per input, see
    :mod:`card_megatron.data.preprocess`), stored under the key ``"inputs"``.
    """
    meta = tokenizer.metadata()
    if inputs is not None:
        meta["inputs"] = inputs
    atomic_write(path, json.dumps(meta, indent=2, sort_keys=True) + "\n")
