"""Hugging Face ``tokenizer.json`` tokenizers (the ``tokenizers`` library, local files only).

:class:`HuggingFaceTokenizer` has the interface of :class:`card_megatron.tokenizer.Tokenizer`
(reserved ids, ``encode_batch``, ``decode``, ``metadata``, ``serialized``), so preprocessing,
training and generation take either; :meth:`card_megatron.tokenizer.Tokenizer.load` returns one
for a file that holds JSON. Nothing is ever fetched from the hub.

Reserved ids, the same way every time for the same file:

* each of mask, eos, bos, pad is the first of these tokens the vocabulary (added tokens
  included) has: mask ``<mask>``; eos ``</s>``, ``<|endoftext|>``, ``<|end_of_text|>``,
  ``<eos>``; bos ``<s>``, ``<|begin_of_text|>``, ``<bos>``; pad ``<pad>``, ``<|padding|>``, ``[PAD]``;
* those it lacks are added as special tokens, in the order mask, eos, bos, pad, named
  ``<mask>``, ``</s>``, ``<s>``, ``<pad>``, with the ids after the vocabulary
  (``num_pieces``, ``num_pieces + 1``, ...); ``vocab_size`` counts them. ``appended`` lists them.

Special tokens are never produced by encoding text (``encode_special_tokens``: the literal
string ``"<mask>"`` is encoded as ordinary text), so the mask id only enters a sequence when
the diffusion objective puts it there, as with SentencePiece control symbols. ``sha256`` is
of the file's bytes; :meth:`hf_json` is the tokenizer with the added tokens, as exported.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

MASK_TOKEN = "<mask>"
_CANDIDATES = {
    "mask": (MASK_TOKEN,),
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"),
    "bos": ("<s>", "<|begin_of_text|>", "<bos>"),
    "pad": ("<pad>", "<|padding|>", "[PAD]"),
}
_ADDED_NAME = {"mask": MASK_TOKEN, "eos": "</s>", "bos": "<s>", "pad": "<pad>"}
_UNK = ("<unk>", "[UNK]", "<|unk|>")


def looks_like_json(data: bytes) -> bool:
    """True for the bytes of a ``tokenizer.json`` (a JSON object), False for a SentencePiece model."""
    return data.lstrip()[:1] == b"{"


class HuggingFaceTokenizer:
    """A ``tokenizers.Tokenizer`` plus the pad/bos/eos/mask ids card_megatron uses (module docstring)."""

    kind = "huggingface"

    def __init__(self, data: bytes, source: str) -> None:
        try:
            from tokenizers import AddedToken
            from tokenizers import Tokenizer as _HF
        except ImportError:
            raise ValueError(
                f"{source}: a tokenizer.json needs the tokenizers library (pip install tokenizers, or make setup)"
            ) from None
        try:
            text = data.decode("utf-8")
            json.loads(text)
            hf = _HF.from_str(text)
        except Exception as e:  # UnicodeDecodeError, JSONDecodeError, tokenizers' Exception
            raise ValueError(f"{source} is not a valid Hugging Face tokenizer.json ({type(e).__name__}: {e})") from None
        self.hf = hf
        self.source = source
        self._data = data
        vocab = hf.get_vocab(with_added_tokens=True)
        self.num_pieces: int = hf.get_vocab_size(with_added_tokens=True)
        if self.num_pieces <= 0:
            raise ValueError(f"{source} is not a valid Hugging Face tokenizer.json (empty vocabulary)")
        ids: dict[str, int] = {}
        appended: list[str] = []
        for role, names in _CANDIDATES.items():
            found = next((vocab[n] for n in names if n in vocab), None)
            if found is None:
                expected = self.num_pieces + len(appended)
                hf.add_special_tokens([AddedToken(_ADDED_NAME[role], special=True, normalized=False)])
                found = hf.token_to_id(_ADDED_NAME[role])
                if found != expected:  # the library assigns the next id; anything else breaks reproducibility
                    raise ValueError(f"{source}: adding {_ADDED_NAME[role]!r} gave id {found}, expected {expected}")
                appended.append(role)
            ids[role] = found
        hf.encode_special_tokens = True  # text never produces a special token, "<mask>" included
        self.mask_id, self.eos_id, self.bos_id, self.pad_id = ids["mask"], ids["eos"], ids["bos"], ids["pad"]
        self.unk_id: int = next((vocab[n] for n in _UNK if n in vocab), -1)
        self.appended: tuple[str, ...] = tuple(appended)
        self.vocab_size: int = self.num_pieces + len(appended)
        self.sha256: str = hashlib.sha256(data).hexdigest()
        self._special = {self.pad_id, self.bos_id, self.eos_id, self.mask_id}

    # -- construction ---------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "HuggingFaceTokenizer":
        """Loads a local ``tokenizer.json``; ValueError naming the file if missing or unparsable."""
        path = os.fspath(path)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer model not found: {path}")
        with open(path, "rb") as f:
            return cls(f.read(), path)

    @classmethod
    def from_serialized(cls, data: bytes, source: str = "<bytes>") -> "HuggingFaceTokenizer":
        return cls(data, source)

    def serialized(self) -> bytes:
        """The file's bytes (what :meth:`from_serialized` takes)."""
        return self._data

    def hf_json(self) -> str:
        """The tokenizer as ``tokenizer.json`` text, with the appended special tokens."""
        return self.hf.to_str()

    # -- encoding -------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos or template tokens added)."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], add_eos: bool = False, num_threads: int = 1) -> list:
        """Token ids of each text as int32 NumPy arrays ``[len_i]``, with eos appended if ``add_eos``."""
        encodings = self.hf.encode_batch_fast(list(texts), add_special_tokens=False)
        tail = [self.eos_id] if add_eos else []
        return [np.array(e.ids + tail, dtype=np.int32) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; reserved ids (pad/bos/eos/mask) are dropped."""
        keep = [int(i) for i in ids if int(i) not in self._special and 0 <= int(i) < self.vocab_size]
        return self.hf.decode(keep, skip_special_tokens=True)

    def metadata(self) -> dict[str, Any]:
        """The reserved ids and sizes, and the file's ``sha256``, as written to the ``.tokenizer.json`` sidecar."""
        from card_megatron.tokenizer import tokenizer_metadata

        return {"kind": self.kind, **tokenizer_metadata(self)}

    def __repr__(self) -> str:
        from card_megatron.tokenizer import tokenizer_repr

        return tokenizer_repr(self)
