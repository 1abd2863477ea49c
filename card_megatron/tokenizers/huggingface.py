"""Hugging Face ``tokenizer.json`` tokenizers (the ``tokenizers`` library, local files only).

:class:`HuggingFaceTokenizer` implements :class:`card_megatron.tokenizers.base.Tokenizer`
(reserved ids, ``encode_batch``, ``decode``, ``metadata``, ``serialized``), so preprocessing,
training and generation take either; :func:`card_megatron.tokenizers.load_tokenizer` returns one
for a file that holds JSON. Nothing is ever fetched from the hub.

Reserved ids, the same way every time for the same file. They must be ids that no text can
produce, so only *special* added tokens are adopted:

* each of mask, eos, bos, pad is the first of these names that the file holds as a special added
  token (``"special": true`` in ``added_tokens``) and that its model does not produce when it
  encodes the name itself as text: mask ``<mask>``; eos ``</s>``, ``<|endoftext|>``,
  ``<|end_of_text|>``, ``<eos>``; bos ``<s>``, ``<|begin_of_text|>``, ``<bos>``; pad ``<pad>``,
  ``<|padding|>``, ``[PAD]``. The same name as an ordinary vocabulary word, or as an added token
  with ``"special": false``, is text like any other and is not adopted (issue 21: such a
  ``<mask>`` made every literal "<mask>" in the corpus a mask id);
* a role left without one gets a new special token, in the order mask, eos, bos, pad, with the
  ids after the vocabulary (``num_pieces``, ``num_pieces + 1``, ...), named ``<mask>``, ``</s>``,
  ``<s>``, ``<pad>``, or ``<card_megatron_ROLE>`` when the file already has that name as text
  (then ``<card_megatron_ROLE_1>``, ... while taken); ``vocab_size`` counts them and
  ``appended`` lists their roles.

Special tokens are never produced by encoding text (``encode_special_tokens``: the literal
string ``"<mask>"`` is encoded as ordinary text), so the mask id only enters a sequence when
the diffusion objective puts it there, as with SentencePiece control symbols. ``sha256`` is
of the file's bytes; :meth:`hf_json` is the tokenizer with the added tokens, as exported.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from card_megatron.tokenizers.base import tokenizer_metadata, tokenizer_repr

MASK_TOKEN = "<mask>"
_CANDIDATES = {
    "mask": (MASK_TOKEN,),
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"),
    "bos": ("<s>", "<|begin_of_text|>", "<bos>"),
    "pad": ("<pad>", "<|padding|>", "[PAD]"),
}
_ADDED_NAME = {"mask": MASK_TOKEN, "eos": "</s>", "bos": "<s>", "pad": "<pad>"}
_UNK = ("<unk>", "[UNK]", "<|unk|>")


def _text_makes(hf, name: str, token_id: int) -> bool:
    """Whether encoding ``name`` as text (alone, after a space, after a letter) yields ``token_id``:
    a special token whose content the model itself also spells out cannot be reserved."""
    return any(token_id in hf.encode(text, add_special_tokens=False).ids for text in (name, " " + name, "a" + name))


def _fresh_name(role: str, vocab: dict[str, int]) -> str:
    """The name of the token appended for ``role``: its usual name unless the vocabulary has it."""
    names = itertools.chain(
        (_ADDED_NAME[role], f"<card_megatron_{role}>"), (f"<card_megatron_{role}_{k}>" for k in itertools.count(1))
    )
    return next(n for n in names if n not in vocab)


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
        hf.encode_special_tokens = True  # text never produces a special token, "<mask>" included
        special = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        ids: dict[str, int] = {}
        appended: list[str] = []
        for role, names in _CANDIDATES.items():
            found = next((special[n] for n in names if n in special and not _text_makes(hf, n, special[n])), None)
            if found is None:
                expected = self.num_pieces + len(appended)
                name = _fresh_name(role, vocab)
                vocab[name] = expected
                hf.add_special_tokens([AddedToken(name, special=True, normalized=False)])
                found = hf.token_to_id(name)
                if found != expected:  # the library assigns the next id; anything else breaks reproducibility
                    raise ValueError(f"{source}: adding {name!r} gave id {found}, expected {expected}")
                appended.append(role)
            ids[role] = found
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
        return {"kind": self.kind, **tokenizer_metadata(self)}

    def __repr__(self) -> str:
        return tokenizer_repr(self)
