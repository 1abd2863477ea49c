"""Datasets of packed samples over token shards (docs/design.md "Data -> training").

``build_datasets`` opens the shards named by ``data.data_path``, builds (or loads from
the cache) the sample index of each split (see :mod:`card_megatron.data.index`), and
returns one :class:`PackedDataset` per split. ``dataset[k]`` is the k-th sample of the
split's global stream: its L+1 tokens, its noise seed and ``k`` itself.

The dataset needs two things from a shard: ``sequence_lengths`` (int32; each sequence is
a document, as in Megatron's ``GPTDataset``) and a token accessor reading ``length``
tokens of one document from ``offset``: ``shard.get(doc, offset, length)`` where the
reader has it, else ``shard[doc][offset:offset + length]``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from card_megatron.config import DataConfig, parse_split
from card_megatron.data import cache as data_cache
from card_megatron.data import index as idx
from card_megatron.data.shards import TokenShard, shard_fingerprint
from card_megatron.fileio import file_sha256

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- shard access


def open_shard(prefix: str) -> TokenShard:
    """The token shard at ``prefix`` (``prefix.bin`` / ``prefix.idx``); ValueError if missing."""
    for ext in (".bin", ".idx"):
        if not os.path.exists(prefix + ext):
            raise ValueError(f"data.data_path: token shard file {prefix + ext} not found")
    return TokenShard(prefix)


def _token_reader(shard: TokenShard) -> Callable[[int, int, int], np.ndarray]:
    """``read(document, offset, length)``: ``length`` tokens of a shard's document from ``offset``."""
    return lambda doc, offset, length: shard[doc][offset : offset + length]


def parse_data_path(data_path: str) -> list[tuple[float, str]]:
    """[(normalised weight, prefix)] from "prefix" or "w1 prefix1 w2 prefix2 ..."."""
    parts = data_path.split()
    if not parts:
        raise ValueError("data.data_path is empty: give a shard prefix or 'w1 prefix1 w2 prefix2 ...'")
    if len(parts) == 1:
        return [(1.0, parts[0])]
    if len(parts) % 2:
        raise ValueError(f"data.data_path ({data_path!r}): expected pairs 'weight prefix', got {len(parts)} words")
    pairs = []
    for w, prefix in zip(parts[0::2], parts[1::2]):
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(f"data.data_path ({data_path!r}): weight {w!r} is not a number") from None
        if not weight > 0:
            raise ValueError(f"data.data_path ({data_path!r}): weight {w!r} of {prefix} must be positive")
        pairs.append((weight, prefix))
    total = sum(w for w, _ in pairs)
    return [(w / total, p) for w, p in pairs]


class _Shards:
    """The shard readers of a blend, opened lazily in each process (DataLoader workers)."""

    def __init__(self, prefixes: Sequence[str]) -> None:
        self.prefixes = list(prefixes)
        self._readers: Optional[list[Callable[[int, int, int], np.ndarray]]] = None
        self._sizes: Optional[list[np.ndarray]] = None

    def open(self) -> None:
        shards = [open_shard(p) for p in self.prefixes]
        self._readers = [_token_reader(s) for s in shards]
        self._sizes = [np.asarray(s.sequence_lengths) for s in shards]

    @property
    def readers(self) -> list[Callable[[int, int, int], np.ndarray]]:
        if self._readers is None:
            self.open()
        return self._readers  # type: ignore[return-value]

    @property
    def sizes(self) -> list[np.ndarray]:
        if self._sizes is None:
            self.open()
        return self._sizes  # type: ignore[return-value]

    def __getstate__(self) -> dict:
        return {"prefixes": self.prefixes, "_readers": None, "_sizes": None}


# --------------------------------------------------------------------------- dataset


class PackedDataset(torch.utils.data.Dataset):
    """One split's sample stream: ``dataset[k]`` for global sample id k in [0, len).

    Returns ``{"tokens": int64 [L+1], "noise_seed": np.int64 (the uint64 bits),
    "sample_id": k}``. The index arrays are memory-mapped from the cache entry.
    """

    def __init__(
        self,
        shards: _Shards,
        entry_dir: Optional[str],
        seq_length: int,
        num_samples: int,
        split: str,
        arrays: Optional[dict[str, np.ndarray]] = None,
    ) -> None:
        self.shards = shards
        self.entry_dir = entry_dir
        self.seq_length = seq_length
        self.num_samples = num_samples
        self.split = split
        self._arrays = arrays

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The memory-mapped index arrays (see :func:`card_megatron.data.index.build_split_arrays`)."""
        if self._arrays is None:
            self._arrays = data_cache.load_entry(self.entry_dir) if self.entry_dir else {}
        return self._arrays

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = None  # memory maps are reopened, not pickled, in workers
        return state

    def __len__(self) -> int:
        return self.num_samples

    def locate(self, k: int) -> tuple[int, int]:
        """(shard, packed sample id within that shard's index) of stream position k."""
        a = self.arrays
        if "dataset_index" in a:
            d, j = int(a["dataset_index"][k]), int(a["dataset_sample_index"][k])
        else:
            d, j = 0, k
        return d, int(a[f"d{d}_shuffle_index"][j])

    def __getitem__(self, k: int) -> dict[str, Any]:
        k = int(k)
        if not 0 <= k < self.num_samples:
            raise IndexError(f"sample id {k} out of range for the {self.split} split of {self.num_samples} samples")
        a = self.arrays
        d, s = self.locate(k)
        documents = a[f"d{d}_document_index"]
        bounds = a[f"d{d}_sample_index"]
        read = self.shards.readers[d]
        p0, o0 = int(bounds[s, 0]), int(bounds[s, 1])
        p1, o1 = int(bounds[s + 1, 0]), int(bounds[s + 1, 1])
        tokens = np.empty(self.seq_length + 1, dtype=np.int64)
        if p0 == p1:
            tokens[:] = read(int(documents[p0]), o0, o1 - o0 + 1)
        else:
            sizes = self.shards.sizes[d]
            doc = int(documents[p0])
            n = int(sizes[doc]) - o0
            tokens[:n] = read(doc, o0, n)
            filled = n
            for p in range(p0 + 1, p1):
                doc = int(documents[p])
                n = int(sizes[doc])
                tokens[filled : filled + n] = read(doc, 0, n)
                filled += n
            tokens[filled:] = read(int(documents[p1]), 0, o1 + 1)
            assert filled + o1 + 1 == self.seq_length + 1, "sample index and document sizes disagree"
        seed = a["noise_seeds"][k : k + 1].view(np.int64)[0]
        return {"tokens": tokens, "noise_seed": seed, "sample_id": k}


def collate(items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Stacks samples: ``tokens`` LongTensor [B, L+1], ``noise_seeds`` [B], ``sample_ids`` [B]."""
    return {
        "tokens": torch.from_numpy(np.stack([it["tokens"] for it in items]).astype(np.int64, copy=False)),
        "noise_seeds": torch.tensor(np.array([it["noise_seed"] for it in items], dtype=np.int64)),
        "sample_ids": torch.tensor([int(it["sample_id"]) for it in items], dtype=torch.int64),
    }


# --------------------------------------------------------------------------- building


def _warn_without_eod(prefix: str, shard_sizes: np.ndarray, read: Callable, eod: int) -> None:
    checked = ends_with_eod = 0
    for doc in range(min(len(shard_sizes), 64)):
        n = int(shard_sizes[doc])
        if n == 0:
            continue
        checked += 1
        ends_with_eod += int(read(doc, n - 1, 1)[0]) == eod
        if checked == 16:
            break
    if checked and not ends_with_eod:
        logger.warning(
            "%s: none of the first %d documents ends with the end-of-document token %d; packed samples "
            "will run documents together without a separator", prefix, checked, eod,
        )  # fmt: skip


def require_sidecar(prefix: str, allow_missing: bool, flag: str, tokenizer_source: str = "the tokenizer") -> bool:
    """True when shard ``prefix`` has its tokenizer sidecar. Without one: a warning when ``allow_missing``,
    else ValueError naming the shard and ``flag``, the setting that accepts it."""
    from card_megatron.data.preprocess import sidecar_for

    if sidecar_for(prefix) is not None:
        return True
    if not allow_missing:
        raise ValueError(
            f"{prefix} has no tokenizer sidecar ({{output prefix}}.tokenizer.json, written by "
            f"tools/preprocess_data.py): nothing says that {tokenizer_source} made it, and any tokenizer of the "
            f"same size would read it. Put the sidecar back beside the shard, or accept the shard as it is "
            f"with {flag}"
        )
    logger.warning(
        "%s has no tokenizer sidecar ({output prefix}.tokenizer.json): cannot check that %s made it (accepted by %s)",
        prefix,
        tokenizer_source,
        flag,
    )
    return False


def check_same_tokenizer(
    prefix: str, tokenizer: Any, allow_missing: bool = False, flag: str = "data.allow_missing_sidecar=true"
) -> None:
    """Raises ValueError if the shard's sidecar names another tokenizer than ``tokenizer`` (their sha256
    differ); warns when the sidecar predates the hash. Without a sidecar, :func:`require_sidecar`."""
    from card_megatron.data.preprocess import sidecar_for

    if not require_sidecar(prefix, allow_missing, flag, f"data.tokenizer_model ({tokenizer.source})"):
        return
    sidecar = sidecar_for(prefix)
    try:
        with open(sidecar) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{sidecar}: cannot read the tokenizer sidecar of {prefix} ({e})") from None
    saved = meta.get("sha256")
    if saved is None:
        logger.warning(
            "%s predates tokenizer hashes: cannot check that data.tokenizer_model (%s) made %s",
            sidecar,
            tokenizer.source,
            prefix,
        )
    elif saved != tokenizer.sha256:
        raise ValueError(
            f"{prefix} was tokenized with {meta.get('model', '?')} (sha256 {saved[:16]}..., says {sidecar}), but "
            f"data.tokenizer_model is {tokenizer.source} (sha256 {tokenizer.sha256[:16]}...): set "
            "data.tokenizer_model to the tokenizer that made the shard, or re-tokenize the data with this one"
        )
    else:
        roles = ("mask_id", "eos_id", "bos_id", "pad_id")
        then = {r: meta.get(r) for r in roles if r in meta}
        now = {r: getattr(tokenizer, r) for r in then}
        if then != now:  # same file, other reserved ids: made before they had to be special tokens (issue 21)
            raise ValueError(
                f"{prefix} was tokenized with the reserved ids {then} (says {sidecar}), but {tokenizer.source}, the "
                f"same file, now gives {now}: a tokenizer.json's reserved ids are only special tokens since "
                "issue 21 (docs/interop.md); re-tokenize the data"
            )


def _check_token_ids(prefix: str, fingerprint: str, tokenizer: Any, cache_dir: str, lock_timeout_s: float) -> None:
    """Raises ValueError if the shard holds an id outside ``tokenizer``'s vocabulary. The shard's
    largest id is computed once and cached beside the sample index, keyed by the fingerprint."""

    def build() -> dict[str, np.ndarray]:
        tokens = open_shard(prefix).tokens
        return {"max_token_id": np.array([int(tokens.max()) if len(tokens) else -1], dtype=np.int64)}

    description = {"format_version": idx.FORMAT_VERSION, "max_token_id_of": fingerprint}
    arrays, _ = data_cache.load_or_build(cache_dir, "tokens", description, build, lock_timeout_s)
    max_id = int(arrays["max_token_id"][0])
    if max_id >= tokenizer.vocab_size:
        raise ValueError(
            f"{prefix}.bin holds token id {max_id}, outside the vocabulary of data.tokenizer_model "
            f"{tokenizer.source} ({tokenizer.vocab_size} ids, 0..{tokenizer.vocab_size - 1}): the shard was made "
            "with another tokenizer; set data.tokenizer_model to it, or re-tokenize the data with this one"
        )


def build_datasets(
    data_cfg: DataConfig,
    seq_length: int,
    seed: int,
    num_samples: Mapping[str, int],
    tokenizer_eod: Optional[int] = None,
    *,
    tokenizer: Any = None,
    lock_timeout_s: float = 3600.0,
    valid_seed: Optional[int] = None,
) -> dict[str, PackedDataset]:
    """One :class:`PackedDataset` per split ("train", "valid", "test").

    ``num_samples`` gives each split's sample count (a missing split gets 0: an empty
    dataset, nothing built); more than one epoch is built where needed. The indices are
    cached in ``data_cfg.cache_dir`` (None = ``{first prefix}_index_cache``); every process
    may call this at once: one builds, the others wait up to ``lock_timeout_s`` and load.
    With ``tokenizer_eod`` given, warns if the shards' documents do not end with it. With
    ``tokenizer`` (a :class:`~card_megatron.tokenizers.Tokenizer`) given, raises ValueError naming
    the shard when it holds ids outside the vocabulary or its sidecar names another tokenizer.
    ``valid_seed`` (none = ``seed``) seeds the valid and test splits (shuffles and noise seeds), so
    runs of different seeds can validate on the same samples.
    """
    unknown = set(num_samples) - set(idx.SPLITS)
    if unknown:
        raise ValueError(f"num_samples: unknown split(s) {sorted(unknown)}; expected train, valid, test")
    if seq_length < 1:
        raise ValueError(f"seq_length ({seq_length}) must be >= 1")
    blend = parse_data_path(data_cfg.data_path)
    split_weights = parse_split(data_cfg.split)
    prefixes = [p for _, p in blend]
    shards = _Shards(prefixes)
    shards.open()  # now: a missing file is reported before anything else
    fingerprints = [shard_fingerprint(p) for p in prefixes]
    all_ranges = [idx.split_document_ranges(data_cfg.split, len(sizes)) for sizes in shards.sizes]
    if tokenizer_eod is not None:
        for prefix, sizes, read in zip(prefixes, shards.sizes, shards.readers):
            _warn_without_eod(prefix, sizes, read, tokenizer_eod)
    cache_dir = data_cache.default_cache_dir(prefixes[0], data_cfg.cache_dir)
    if tokenizer is not None:
        for prefix, fingerprint in zip(prefixes, fingerprints):
            check_same_tokenizer(prefix, tokenizer, data_cfg.allow_missing_sidecar)
            _check_token_ids(prefix, fingerprint, tokenizer, cache_dir, lock_timeout_s)

    datasets: dict[str, PackedDataset] = {}
    for s, split in enumerate(idx.SPLITS):
        n = int(num_samples.get(split, 0))
        if n < 0:
            raise ValueError(f"num_samples[{split!r}] ({n}) must be >= 0")
        if n == 0:
            datasets[split] = PackedDataset(shards, None, seq_length, 0, split)
            continue
        ranges = [r[s] for r in all_ranges]
        split_seed = seed if split == "train" or valid_seed is None else valid_seed
        description = idx.describe_split(
            split, seq_length, split_seed, split_weights, n,
            [(w, fp, b, e) for (w, _), fp, (b, e) in zip(blend, fingerprints, ranges)],
        )  # fmt: skip
        parts = [idx.ShardSplit(p, sizes, b, e) for p, sizes, (b, e) in zip(prefixes, shards.sizes, ranges)]
        build = functools.partial(
            idx.build_split_arrays, parts, [w for w, _ in blend], seq_length, split_seed, split, n
        )
        start = time.monotonic()
        arrays, entry = data_cache.load_or_build(cache_dir, split, description, build, lock_timeout_s)
        seconds = time.monotonic() - start
        logger.info("%s split: %d samples of %d+1 tokens ready in %.2f s", split, n, seq_length, seconds)
        datasets[split] = PackedDataset(shards, entry, seq_length, n, split, arrays)
    return datasets


def data_identity(data_path: str) -> dict[str, dict[str, Any]]:
    """What identifies the data of ``data.data_path`` by content, per shard prefix: the ``.bin`` size,
    the ``.idx``'s sha256 (every document's length) and the sha256 of the inputs the sidecar records
    (None without a sidecar). A checkpoint stores it and a resume compares it
    (:func:`data_identity_changes`): other files under the same paths are refused, a copy is not."""

    from card_megatron.data.preprocess import sidecar_for
    from card_megatron.data.shards import bin_path, idx_path

    out: dict[str, dict[str, Any]] = {}
    for _, prefix in parse_data_path(data_path):
        try:
            size = os.path.getsize(bin_path(prefix))
            idx_sha256 = file_sha256(idx_path(prefix))
        except OSError as e:
            raise ValueError(f"token shard {prefix}: cannot read it ({e})") from None
        inputs = None
        sidecar = sidecar_for(prefix)
        if sidecar is not None:
            try:
                with open(sidecar) as f:
                    inputs = [i.get("sha256") for i in json.load(f).get("inputs", [])]
            except (OSError, ValueError, AttributeError) as e:
                raise ValueError(f"{sidecar}: cannot read the tokenizer sidecar of {prefix} ({e})") from None
        out[prefix] = {"bin_bytes": size, "idx_sha256": idx_sha256, "inputs_sha256": inputs}
    return out


def data_identity_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """One line per shard prefix whose :func:`data_identity` differs from the saved one, naming what differs."""
    names = {"bin_bytes": ".bin size", "idx_sha256": ".idx sha256", "inputs_sha256": "sha256 of its inputs (sidecar)"}
    changes = []
    for prefix in sorted(set(saved) & set(now)):
        diffs = [
            f"{names.get(k, k)} {_short(saved[prefix].get(k))} -> {_short(now[prefix].get(k))}"
            for k in names
            if saved[prefix].get(k) != now[prefix].get(k)
        ]
        if diffs:
            changes.append(f"the data {prefix} holds other files under the same path: {'; '.join(diffs)}")
    return changes


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) > 16:
        return value[:16] + "..."
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return repr(value)
