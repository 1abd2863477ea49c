"""The sample index over token shards and its noise seeds.

Typed wrappers over the C++ indexer (``csrc/sample_index.cpp``) and a NumPy reference of
the noise-seed generator.

How one split's sample stream is made, for sequence length L (samples of L+1 tokens):

* Each shard's documents are split by document into train/valid/test ranges
  (``data.split``, e.g. "969,30,1"; :func:`split_document_ranges`).
* **Epochs.** A split with T tokens needs E = ceil((N*L + 1) / T) epochs for N samples.
  The document index holds E copies of the split's document ids, each shuffled on its
  own (key derived from seed, split, shard and epoch).
* **Packing.** Sample i covers tokens [i*L, i*L + L] of the concatenation of those
  documents, across document boundaries; consecutive samples share one token. The
  sample index stores (position in the document index, offset) of token i*L, the same
  layout as Megatron's ``GPTDataset``. Every sample that fits in the E epochs is kept.
* **Shuffling.** The shuffle index permutes the samples within each epoch (a sample
  belongs to the epoch its first token lies in), so each epoch is seen whole before the
  next begins.
* **Blending.** With several shards the split's stream position k is served by shard
  ``dataset_index[k]`` (its ``dataset_sample_index[k]``-th sample), chosen greedily as the
  shard most under-served after this sample: argmax_d w_d * (k + 1) - served_d.
* **Noise seeds.** Position k of the split's final (blended, shuffled) stream gets

      noise_seed(seed, split, k) = mix(mix(mix(seed) ^ split) ^ k),   split 0/1/2 = train/valid/test

  where mix is the SplitMix64 finaliser (Steele, Lea and Flood 2014; docs/design.md
  "Noise"), all arithmetic mod 2^64::

      mix(z): z = z + 0x9E3779B97F4A7C15
              z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
              z = (z ^ (z >> 27)) * 0x94D049BB133111EB
              return z ^ (z >> 31)

  The seeds depend on nothing but (seed, split, k): a sample's corruption is the same
  whatever the ranks, workers or restarts. They are computed in C++ and stored beside
  the index; :func:`splitmix64_np` and :func:`noise_seeds_np` are the NumPy reference.
  The shuffles use the same generator as a stream (draw t = mix(key + t*0x9E37...)),
  bounded by Lemire's multiply-shift rejection, in a Fisher-Yates shuffle from the end.

The arrays of one split are cached by :mod:`card_megatron.data.cache` under a key that
hashes everything they depend on (:func:`describe_split`: :data:`FORMAT_VERSION`, shard
fingerprints, blend weights, split weights, L, seed, sample count).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from card_megatron import _indexer
from card_megatron.config import parse_split

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}
MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# Distinguish the shuffle keys from each other and from the noise seeds.
_PURPOSE_DOCUMENTS = 0x646F63756D656E74  # "document"
_PURPOSE_SAMPLES = 0x73616D706C657321  # "samples!"


# --------------------------------------------------------------------------- generator


def splitmix64_np(z: np.ndarray) -> np.ndarray:
    """NumPy reference of mix(z) (uint64 in, uint64 out, any shape)."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def noise_seeds_np(seed: int, split: int, ids: np.ndarray) -> np.ndarray:
    """NumPy reference of noise_seed(seed, split, k) for every k in ``ids`` (uint64, shape of ids)."""
    base = splitmix64_np(splitmix64_np(np.uint64(seed & MASK64)) ^ np.uint64(split))
    return splitmix64_np(base ^ np.asarray(ids, dtype=np.uint64))


def splitmix64(z: np.ndarray) -> np.ndarray:
    """mix(z) in C++ (uint64 [n] -> uint64 [n])."""
    return _indexer.splitmix64(np.ascontiguousarray(z, dtype=np.uint64))


def noise_seeds(seed: int, split: int, count: int, start: int = 0) -> np.ndarray:
    """uint64 [count]: noise_seed(seed, split, k) for k in [start, start + count), in C++."""
    return _indexer.noise_seeds(seed & MASK64, split, start, count)


def shuffle_key(seed: int, split: int, dataset: int, purpose: int) -> int:
    """The 64-bit key of one shard's document (or sample) shuffles within one split."""
    z = splitmix64_np(np.uint64(seed & MASK64)) ^ np.uint64(purpose)
    z = splitmix64_np(splitmix64_np(z) ^ np.uint64(split))
    return int(splitmix64_np(z ^ np.uint64(dataset)))


# --------------------------------------------------------------------------- index pieces


def build_document_index(doc_begin: int, doc_end: int, num_epochs: int, key: int) -> np.ndarray:
    """int32|int64 [num_epochs * (doc_end - doc_begin)]: per epoch, a shuffle of [doc_begin, doc_end)."""
    return _indexer.build_document_index(doc_begin, doc_end, num_epochs, key & MASK64)


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_length: int, num_samples: int) -> np.ndarray:
    """int32|int64 [num_samples + 1, 2]: (document-index position, offset) of token i*L.

    ``sizes`` is int32 [num_documents]; sample i is read from boundary i to boundary i+1
    inclusive (L+1 tokens). Raises ValueError if the documents hold too few tokens.
    """
    return _indexer.build_sample_index(sizes, document_index, seq_length, num_samples)


def build_shuffle_index(epoch_starts: np.ndarray, key: int) -> np.ndarray:
    """uint32|int64 [epoch_starts[-1]]: sample ids shuffled within each epoch's range."""
    return _indexer.build_shuffle_index(np.asarray(epoch_starts, dtype=np.int64), key & MASK64)


def build_blend_index(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8|int16 [size] shard of each stream position, int64 [size] sample within that shard)."""
    return _indexer.build_blend_index(np.asarray(weights, dtype=np.float64), size)


def split_document_ranges(split: str, num_documents: int) -> list[tuple[int, int]]:
    """[(begin, end)] document ranges of train, valid and test, in proportion to the weights."""
    weights = parse_split(split)
    total = sum(weights)
    bounds = [0]
    for i in range(3):
        bounds.append(int(round(sum(weights[: i + 1]) / total * num_documents)))
    bounds[-1] = num_documents
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def num_epochs_for(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Smallest E >= 1 with (E*T - 1) // L >= num_samples (the +1 is the shared last token)."""
    if tokens_per_epoch <= 0:
        raise ValueError("cannot build samples from documents holding no tokens")
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def epoch_sample_starts(tokens_per_epoch: int, seq_length: int, num_epochs: int) -> np.ndarray:
    """int64 [E+1]: first sample of each epoch (its first token lies in the epoch), then the total."""
    total = (num_epochs * tokens_per_epoch - 1) // seq_length
    starts = [min(-(-e * tokens_per_epoch // seq_length), total) for e in range(num_epochs)]
    return np.array(starts + [total], dtype=np.int64)


@dataclass
class ShardSplit:
    """One shard's part of a split: its document sizes and document range."""

    name: str  # for messages: the shard prefix
    sizes: np.ndarray  # int32 [num_documents of the whole shard]
    doc_begin: int
    doc_end: int


def build_split_arrays(
    shards: Sequence[ShardSplit],
    weights: Sequence[float],
    seq_length: int,
    seed: int,
    split: str,
    num_samples: int,
) -> dict[str, np.ndarray]:
    """Every array of one split's sample stream of ``num_samples`` samples.

    Returns ``noise_seeds`` uint64 [N]; with several shards ``dataset_index`` [N] and
    ``dataset_sample_index`` int64 [N]; and for each shard d that serves samples,
    ``d{d}_document_index``, ``d{d}_sample_index`` [n_d+1, 2], ``d{d}_shuffle_index``.
    """
    split_id = SPLIT_IDS[split]
    arrays: dict[str, np.ndarray] = {"noise_seeds": noise_seeds(seed, split_id, num_samples)}
    if len(shards) == 1:
        counts = [num_samples]
    else:
        dataset_index, dataset_sample_index = build_blend_index(weights, num_samples)
        arrays["dataset_index"] = dataset_index
        arrays["dataset_sample_index"] = dataset_sample_index
        counts = np.bincount(dataset_index, minlength=len(shards)).tolist()
    for d, (shard, count) in enumerate(zip(shards, counts)):
        if count == 0:
            continue
        tokens = int(shard.sizes[shard.doc_begin : shard.doc_end].sum(dtype=np.int64))
        if tokens == 0:
            raise ValueError(
                f"{shard.name}: the {split} split (documents {shard.doc_begin}..{shard.doc_end} under "
                f"data.split) holds no tokens, but {count} {split} samples were requested from it"
            )
        if tokens < seq_length + 1:  # every sample would repeat the split's few tokens, epoch after epoch
            raise ValueError(
                f"{shard.name}: the {split} split (documents {shard.doc_begin}..{shard.doc_end} under data.split) "
                f"holds {tokens} tokens, fewer than one sample of model.seq_length + 1 = {seq_length + 1} tokens: "
                f"lower model.seq_length, or give the {split} split more documents (data.split)"
            )
        num_epochs = num_epochs_for(tokens, seq_length, count)
        starts = epoch_sample_starts(tokens, seq_length, num_epochs)
        doc_key = shuffle_key(seed, split_id, d, _PURPOSE_DOCUMENTS)
        document_index = build_document_index(shard.doc_begin, shard.doc_end, num_epochs, doc_key)
        sample_index = build_sample_index(shard.sizes, document_index, seq_length, int(starts[-1]))
        shuffle_index = build_shuffle_index(starts, shuffle_key(seed, split_id, d, _PURPOSE_SAMPLES))
        arrays[f"d{d}_document_index"] = document_index
        arrays[f"d{d}_sample_index"] = sample_index
        arrays[f"d{d}_shuffle_index"] = shuffle_index
        logger.info(
            "%s %s: %d documents, %d tokens, %d epoch(s), %d samples of %d+1 tokens (%d used)",
            shard.name, split, shard.doc_end - shard.doc_begin, tokens, num_epochs,
            int(starts[-1]), seq_length, count,
        )  # fmt: skip
    return arrays


def describe_split(
    split: str,
    seq_length: int,
    seed: int,
    split_weights: Sequence[float],
    num_samples: int,
    datasets: Sequence[tuple[float, str, int, int]],
) -> dict:
    """The cache description of one split: (weight, fingerprint, doc_begin, doc_end) per shard."""
    return {
        "format_version": FORMAT_VERSION,
        "split": split,
        "seq_length": int(seq_length),
        "seed": int(seed) & MASK64,
        "split_weights": [float(w) for w in split_weights],
        "num_samples": int(num_samples),
        "datasets": [
            {"weight": float(w), "fingerprint": fp, "doc_begin": int(b), "doc_end": int(e)} for w, fp, b, e in datasets
        ],
    }


__all__ = [
    "FORMAT_VERSION", "SPLITS", "SPLIT_IDS", "ShardSplit", "build_blend_index", "build_document_index",
    "build_sample_index", "build_shuffle_index", "build_split_arrays",
    "describe_split", "epoch_sample_starts", "noise_seeds",
    "noise_seeds_np", "num_epochs_for", "shuffle_key", "split_document_ranges",
    "splitmix64", "splitmix64_np",
]  # fmt: skip
