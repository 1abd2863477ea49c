"""Tokenizers: one protocol, two implementations, one loader.

* :class:`Tokenizer` (``base.py``): the interface the rest of card_megatron uses (reserved ids,
  ``encode_batch``, ``decode``, ``metadata``, ``serialized``);
* :class:`SentencePieceTokenizer` (``sentencepiece.py``): a SentencePiece ``.model``, and
  :func:`train_tokenizer`, which trains one with the reserved ids CARD needs;
* :class:`HuggingFaceTokenizer` (``huggingface.py``): a local Hugging Face ``tokenizer.json``;
* :func:`load_tokenizer`: either, told apart by the file's content, so ``data.tokenizer_model``
  and a checkpoint's ``tokenizer.model`` may hold either format.
"""

from __future__ import annotations

import os
from typing import Optional

from card_megatron.tokenizers.base import (
    Tokenizer,
    looks_like_json,
    tokenizer_metadata,
    write_tokenizer_sidecar,
)
from card_megatron.tokenizers.huggingface import HuggingFaceTokenizer
from card_megatron.tokenizers.sentencepiece import MASK_PIECE, SentencePieceTokenizer, train_tokenizer

__all__ = [
    "HuggingFaceTokenizer",
    "MASK_PIECE",
    "SentencePieceTokenizer",
    "TOKENIZER_TYPES",
    "Tokenizer",
    "load_tokenizer",
    "tokenizer_from_serialized",
    "tokenizer_metadata",
    "train_tokenizer",
    "write_tokenizer_sidecar",
]

# Megatron's names of the two kinds (``--tokenizer-type``), which are also the class names here.
TOKENIZER_TYPES = (SentencePieceTokenizer.__name__, HuggingFaceTokenizer.__name__)


def tokenizer_from_serialized(data: bytes, source: str = "<bytes>") -> Tokenizer:
    """The tokenizer of a ``.model`` file's bytes, or of a ``tokenizer.json``'s (a JSON object)."""
    if looks_like_json(data):
        return HuggingFaceTokenizer.from_serialized(data, source)
    return SentencePieceTokenizer.from_serialized(data, source)


def load_tokenizer(path: str | os.PathLike, tokenizer_type: Optional[str] = None) -> Tokenizer:
    """Loads a SentencePiece ``.model`` file or a Hugging Face ``tokenizer.json`` (told apart by content).

    With ``tokenizer_type`` (one of :data:`TOKENIZER_TYPES`) the file must be of that kind. ValueError
    naming the file when it is missing, corrupt or of the other kind.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"tokenizer model not found: {path}")
    with open(path, "rb") as f:
        tok = tokenizer_from_serialized(f.read(), source=path)
    if tokenizer_type is not None and tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"--tokenizer-type {tokenizer_type!r}: expected one of {', '.join(TOKENIZER_TYPES)}")
    if tokenizer_type is not None and type(tok).__name__ != tokenizer_type:
        what = "a Hugging Face tokenizer.json" if isinstance(tok, HuggingFaceTokenizer) else "a SentencePiece model"
        raise ValueError(f"--tokenizer-type {tokenizer_type}, but {path} is {what}")
    return tok
