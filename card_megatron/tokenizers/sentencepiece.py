"""SentencePiece tokenizer with the reserved ids CARD needs: pad, bos, eos and ``<mask>``.

A model trained here (:func:`train_tokenizer`) reserves ``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2,
``</s>`` 3 and the control symbol ``<mask>`` 4. Control symbols are never produced by
encoding text (not even the literal string ``"<mask>"``), so the mask id only ever enters a
sequence when the diffusion objective puts it there. For an existing model without a
``<mask>`` control symbol the mask id is appended after the vocabulary (``mask_id ==
piece count``) and ``vocab_size`` counts it; a missing pad/bos/eos is appended the same way.

``card_megatron.tokenizers.load_tokenizer`` loads either this or a Hugging Face ``tokenizer.json``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import sentencepiece as spm

from card_megatron.fileio import atomic_write
from card_megatron.tokenizers.base import looks_like_json, tokenizer_metadata, tokenizer_repr

logger = logging.getLogger(__name__)

MASK_PIECE = "<mask>"
# Longest training sentence; SentencePiece silently drops sentences over max_sentence_length
# (4192 bytes by default), so longer lines are cut into pieces of at most this many characters.
_MAX_TRAIN_SENTENCE_CHARS = 1024


class SentencePieceTokenizer:
    """A SentencePiece model plus the pad/bos/eos/mask ids the rest of card_megatron uses
    (:class:`card_megatron.tokenizers.base.Tokenizer`).

    Use :meth:`load` (a ``.model`` file) or :meth:`from_serialized` (its bytes).
    """

    def __init__(self, processor: spm.SentencePieceProcessor, source: str) -> None:
        self.sp = processor
        self.source = source
        self.num_pieces: int = processor.get_piece_size()
        next_id = self.num_pieces
        appended: list[str] = []

        mask = processor.piece_to_id(MASK_PIECE)
        if 0 <= mask < self.num_pieces and processor.id_to_piece(mask) == MASK_PIECE and processor.is_control(mask):
            self.mask_id = mask
        else:
            if 0 <= mask < self.num_pieces and processor.id_to_piece(mask) == MASK_PIECE:
                logger.warning(
                    "%s: piece %s is not a control symbol (text could produce it); appending a separate mask id",
                    source,
                    MASK_PIECE,
                )
            self.mask_id = next_id
            next_id += 1
            appended.append("mask")

        def reserved(model_id: int, name: str) -> int:
            nonlocal next_id
            if model_id >= 0:
                return model_id
            appended.append(name)
            next_id += 1
            return next_id - 1

        self.eos_id: int = reserved(processor.eos_id(), "eos")
        self.bos_id: int = reserved(processor.bos_id(), "bos")
        self.pad_id: int = reserved(processor.pad_id(), "pad")
        self.unk_id: int = processor.unk_id()
        self.appended: tuple[str, ...] = tuple(appended)
        self.vocab_size: int = next_id
        self._model_eos = processor.eos_id() >= 0
        # What identifies the model (two models of one size differ here): sha256 of its serialized proto.
        self.sha256: str = hashlib.sha256(processor.serialized_model_proto()).hexdigest()

    # -- construction ---------------------------------------------------------------
    @classmethod
    def load(cls, model_path: str | os.PathLike) -> "SentencePieceTokenizer":
        """Loads a SentencePiece ``.model`` file; ValueError naming the file if missing or corrupt."""
        path = os.fspath(model_path)
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer model not found: {path}")
        with open(path, "rb") as f:
            data = f.read()
        return cls.from_serialized(data, source=path)

    @classmethod
    def from_serialized(cls, data: bytes, source: str = "<bytes>") -> "SentencePieceTokenizer":
        """Builds a tokenizer from the bytes of a ``.model`` file; ValueError naming ``source`` for
        anything else (a ``tokenizer.json`` included: ``tokenizers.tokenizer_from_serialized`` takes both)."""
        if looks_like_json(data):
            raise ValueError(f"{source} is a Hugging Face tokenizer.json, not a SentencePiece model")
        processor = spm.SentencePieceProcessor()
        try:
            processor.load_from_serialized_proto(data)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with its own text
            raise ValueError(f"{source} is not a valid SentencePiece model ({e})") from None
        if processor.get_piece_size() <= 0:
            raise ValueError(f"{source} is not a valid SentencePiece model (empty vocabulary)")
        return cls(processor, source)

    def serialized(self) -> bytes:
        """The model's bytes (what :meth:`from_serialized` takes), e.g. to ship to worker processes."""
        return self.sp.serialized_model_proto()

    # -- encoding -------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos added)."""
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str], add_eos: bool = False, num_threads: int = 1) -> list:
        """Token ids of each text as int32 NumPy arrays ``[len_i]``, with eos appended if ``add_eos``."""
        import numpy as np

        ids = self.sp.encode(
            list(texts), return_type="numpy", num_threads=num_threads, add_eos=add_eos and self._model_eos
        )
        if add_eos and not self._model_eos:
            eos = np.array([self.eos_id], dtype=np.int32)
            ids = [np.concatenate([x, eos]) for x in ids]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; reserved ids (pad/bos/eos/mask, appended or not) are dropped."""
        special = {self.pad_id, self.bos_id, self.eos_id, self.mask_id}
        keep = [int(i) for i in ids if int(i) not in special and 0 <= int(i) < self.num_pieces]
        return self.sp.decode(keep)

    def metadata(self) -> dict[str, Any]:
        """The reserved ids and sizes, and the model's ``sha256``, as written to the ``.tokenizer.json`` sidecar."""
        return tokenizer_metadata(self)

    def __repr__(self) -> str:
        return tokenizer_repr(self)


def _training_sentences(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.splitlines():
            line = line.rstrip()
            while len(line) > _MAX_TRAIN_SENTENCE_CHARS:
                cut = line.rfind(" ", _MAX_TRAIN_SENTENCE_CHARS // 2, _MAX_TRAIN_SENTENCE_CHARS)
                cut = cut if cut > 0 else _MAX_TRAIN_SENTENCE_CHARS
                yield line[:cut]
                line = line[cut:]
            if line.strip():
                yield line


def sample_sentences(texts: Iterable[str], max_sentences: int, seed: int = 0) -> list[str]:
    """A deterministic uniform sample (reservoir) of at most ``max_sentences`` lines of ``texts``, in input order."""
    if max_sentences <= 0:
        raise ValueError(f"max_sentences ({max_sentences}) must be positive")
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    for n, sentence in enumerate(_training_sentences(texts)):
        if n < max_sentences:
            reservoir.append((n, sentence))
        else:
            j = rng.randrange(n + 1)
            if j < max_sentences:
                reservoir[j] = (n, sentence)
    reservoir.sort()
    return [s for _, s in reservoir]


def train_tokenizer(
    texts: Iterable[str],
    model_path: str,
    vocab_size: int,
    model_type: str = "unigram",
    max_sentences: int = 1_000_000,
    seed: int = 0,
) -> SentencePieceTokenizer:
    """Trains a SentencePiece model on a bounded, deterministic sample of ``texts``; saves it at ``model_path``.

    Reserved ids: pad 0, unk 1, bos 2, eos 3, ``<mask>`` 4 (control symbol). Byte fallback keeps
    every input encodable; whitespace and newlines survive a decode round trip. ``vocab_size``
    is a target: a corpus too small for it gives a smaller vocabulary.
    """
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"tokenizer model type {model_type!r} must be unigram or bpe")
    min_vocab = 256 + 5 + 1  # byte pieces + reserved + at least one learned piece
    if vocab_size < min_vocab:
        raise ValueError(
            f"vocab size ({vocab_size}) must be at least {min_vocab} (256 byte-fallback pieces + 5 reserved ids)"
        )
    sentences = sample_sentences(texts, max_sentences, seed)
    if not sentences:
        raise ValueError("no text to train the tokenizer on")
    logger.info("training a %s SentencePiece model (vocab %d) on %d sentences", model_type, vocab_size, len(sentences))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        control_symbols=[MASK_PIECE],
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=0.9995,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,  # one thread: the trained model is the same on every machine and run
        minloglevel=2,
    )
    atomic_write(model_path, model.getvalue())
    tok = SentencePieceTokenizer.from_serialized(model.getvalue(), source=model_path)
    assert tok.mask_id == 4 and tok.pad_id == 0 and tok.eos_id == 3, tok
    return tok
