"""build_datasets, the cache, the sampler and collate, on small shards written to a temp dir."""

import errno
import logging
import multiprocessing as mp
import os
import pickle
import time

import numpy as np
import pytest
import torch

from card_megatron.config import DataConfig
from card_megatron.data import cache as data_cache
from card_megatron.data import index as idx
from card_megatron.data.dataset import build_datasets, collate
from card_megatron.data.sampler import MicroBatchSampler


def write_shard(prefix: str, docs: list) -> None:
    """A Megatron MMIDIDX shard (the project's format) with one sequence per document."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d in docs:
        builder.add_document(np.asarray(d, dtype=np.uint16), [len(d)])
    builder.finalize(prefix + ".idx")


def random_docs(rng, n, low=0, high=1000, mean_len=40, eod=None):
    docs = []
    for _ in range(n):
        d = list(rng.integers(low, high, size=int(rng.integers(1, 2 * mean_len))))
        if eod is not None:
            d.append(eod)
        docs.append(d)
    return docs


@pytest.fixture
def shard(tmp_path):
    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "corpus_text_document")
    docs = random_docs(rng, 300, eod=1)
    write_shard(prefix, docs)
    return prefix, docs


def cfg_for(data_path, cache_dir, split="8,1,1"):
    return DataConfig(data_path=data_path, split=split, cache_dir=str(cache_dir))


def reference_tokens(ds, docs_by_shard, k):
    """Sample k rebuilt from the definition: shard d's document stream, tokens [s*L, s*L+L]."""
    a = ds.arrays
    d = int(a["dataset_index"][k]) if "dataset_index" in a else 0
    j = int(a["dataset_sample_index"][k]) if "dataset_index" in a else k
    s = int(a[f"d{d}_shuffle_index"][j])
    stream = np.concatenate([docs_by_shard[d][int(i)] for i in a[f"d{d}_document_index"]])
    L = ds.seq_length
    return d, stream[s * L : s * L + L + 1]


def test_samples_equal_concatenated_documents_beyond_one_epoch(shard, tmp_path):
    prefix, docs = shard
    L = 16
    train_docs = docs[: idx.split_document_ranges("8,1,1", len(docs))[0][1]]
    one_epoch = (sum(len(d) for d in train_docs) - 1) // L
    n = {"train": 2 * one_epoch + 5, "valid": 10}  # train needs 3 epochs
    out = build_datasets(cfg_for(prefix, tmp_path / "cache"), L, seed=5, num_samples=n)
    train, valid, test = out["train"], out["valid"], out["test"]
    assert len(train) == n["train"] and len(valid) == 10 and len(test) == 0
    assert len(train.arrays["d0_document_index"]) == 3 * len(train_docs)
    for ds, split in ((train, 0), (valid, 1)):
        b, e = idx.split_document_ranges("8,1,1", len(docs))[split]
        for k in range(len(ds)):
            item = ds[k]
            _, ref = reference_tokens(ds, [docs], k)
            assert item["tokens"].dtype == np.int64 and item["tokens"].shape == (L + 1,)
            np.testing.assert_array_equal(item["tokens"], ref)
            assert item["sample_id"] == k
            expected_seed = idx.noise_seeds_np(5, split, np.array([k]))[0]
            assert np.int64(item["noise_seed"]).view(np.uint64) == expected_seed
        # the split only reads its own documents
        assert set(ds.arrays["d0_document_index"].tolist()) == set(range(b, e))
    # every sample of the first two epochs is used exactly once
    used = np.sort(train.arrays["d0_shuffle_index"][: len(train)])
    assert len(np.unique(used)) == len(train)
    with pytest.raises(IndexError):
        train[len(train)]


def test_blended_datasets(tmp_path):
    rng = np.random.default_rng(1)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    docs_a, docs_b = random_docs(rng, 200, 0, 1000), random_docs(rng, 100, 5000, 6000)
    write_shard(a, docs_a)
    write_shard(b, docs_b)
    L, n = 8, 600
    out = build_datasets(cfg_for(f"0.7 {a} 0.3 {b}", tmp_path / "cache", "1,0,0"), L, 3, {"train": n})
    ds = out["train"]
    from_b = 0
    for k in range(n):
        d, ref = reference_tokens(ds, [docs_a, docs_b], k)
        tokens = ds[k]["tokens"]
        np.testing.assert_array_equal(tokens, ref)
        assert np.all(tokens >= 5000) == (d == 1) and np.all(tokens < 1000) == (d == 0)
        from_b += d
    assert abs(from_b - 0.3 * n) <= 1


def test_determinism_and_cache_keys(shard, tmp_path, monkeypatch):
    prefix, _ = shard
    n = {"train": 200, "valid": 20, "test": 5}
    first = build_datasets(cfg_for(prefix, tmp_path / "c1"), 16, 9, n)
    other = build_datasets(cfg_for(prefix, tmp_path / "c2"), 16, 9, n)  # fresh build, same inputs
    for split in n:
        assert os.path.basename(first[split].entry_dir) == os.path.basename(other[split].entry_dir)
        for name, arr in first[split].arrays.items():
            np.testing.assert_array_equal(arr, other[split].arrays[name])

    def no_build(*args, **kwargs):
        raise AssertionError("the cache should have been hit")

    monkeypatch.setattr(idx, "build_split_arrays", no_build)
    hit = build_datasets(cfg_for(prefix, tmp_path / "c1"), 16, 9, n)
    assert hit["train"].entry_dir == first["train"].entry_dir
    np.testing.assert_array_equal(hit["train"][7]["tokens"], first["train"][7]["tokens"])
    for changed in ((17, 9, n), (16, 10, n), (16, 9, dict(n, train=201))):
        with pytest.raises(AssertionError, match="cache should have been hit"):
            build_datasets(cfg_for(prefix, tmp_path / "c1"), *changed)
    with pytest.raises(AssertionError, match="cache should have been hit"):
        build_datasets(cfg_for(prefix, tmp_path / "c1", split="7,2,1"), 16, 9, n)


def test_changed_shard_is_rebuilt(shard, tmp_path):
    prefix, docs = shard
    cfg = cfg_for(prefix, tmp_path / "cache")
    before = build_datasets(cfg, 16, 1, {"train": 50})["train"]
    st = os.stat(prefix + ".bin")
    os.utime(prefix + ".bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touch
    touched = build_datasets(cfg, 16, 1, {"train": 50})["train"]
    assert touched.entry_dir != before.entry_dir
    new_docs = [list(reversed(d)) for d in docs[:-1]]  # different content and document count
    write_shard(prefix, new_docs)
    changed = build_datasets(cfg, 16, 1, {"train": 50})["train"]
    assert changed.entry_dir not in (before.entry_dir, touched.entry_dir)
    for k in range(50):
        np.testing.assert_array_equal(changed[k]["tokens"], reference_tokens(changed, [new_docs], k)[1])


def _build_in_child(prefix, cache_dir, marker_dir, queue):
    original = idx.build_split_arrays

    def slow_build(*args, **kwargs):
        open(os.path.join(marker_dir, f"built-{os.getpid()}"), "w").close()
        time.sleep(1.0)  # long enough that the other process must wait on the lock
        return original(*args, **kwargs)

    idx.build_split_arrays = slow_build
    ds = build_datasets(cfg_for(prefix, cache_dir, "1,0,0"), 16, 2, {"train": 300})["train"]
    queue.put({name: np.asarray(arr).copy() for name, arr in ds.arrays.items()})


def test_concurrent_build_one_builds_other_waits(shard, tmp_path):
    prefix, _ = shard
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_build_in_child, args=(prefix, str(tmp_path / "cache"), str(tmp_path), queue))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len([f for f in os.listdir(tmp_path) if f.startswith("built-")]) == 1
    assert results[0].keys() == results[1].keys()
    for name in results[0]:
        np.testing.assert_array_equal(results[0][name], results[1][name])


def test_lock_timeout_is_clear(tmp_path):
    lock = str(tmp_path / "x.lock")
    with data_cache.exclusive_lock(lock, 1.0):
        with pytest.raises(TimeoutError, match="x.lock"):
            with data_cache.exclusive_lock(lock, 0.2):
                pass
    with data_cache.exclusive_lock(lock, 0.2):  # released: a leftover lock file does not block
        pass


def test_user_errors(shard, tmp_path):
    prefix, _ = shard
    with pytest.raises(ValueError, match="not found"):
        build_datasets(cfg_for(prefix + "_missing", tmp_path), 16, 1, {"train": 5})
    with pytest.raises(ValueError, match="holds no tokens"):
        build_datasets(cfg_for(prefix, tmp_path, "1,0,0"), 16, 1, {"train": 5, "valid": 5})
    with pytest.raises(ValueError, match="data.data_path"):
        build_datasets(cfg_for(f"1 {prefix} 2", tmp_path), 16, 1, {"train": 5})
    with pytest.raises(ValueError, match="unknown split"):
        build_datasets(cfg_for(prefix, tmp_path), 16, 1, {"training": 5})


def test_missing_eod_warns(tmp_path, caplog):
    rng = np.random.default_rng(2)
    prefix = str(tmp_path / "noeod")
    write_shard(prefix, random_docs(rng, 20, 10, 100))
    with caplog.at_level(logging.WARNING):
        build_datasets(cfg_for(prefix, tmp_path / "c", "1,0,0"), 8, 1, {"train": 4}, tokenizer_eod=1)
    assert "end-of-document" in caplog.text


def test_default_cache_dir(shard):
    prefix, _ = shard
    ds = build_datasets(DataConfig(data_path=prefix, split="1,0,0"), 8, 1, {"train": 4})["train"]
    assert os.path.dirname(ds.entry_dir) == f"{prefix}_index_cache"


# --------------------------------------------------------------------------- sampler


def rank_batches(total, consumed, mb, rank, dp):
    return list(MicroBatchSampler(total, consumed, mb, rank, dp))


@pytest.mark.parametrize("dp,mb", [(1, 4), (2, 2), (4, 1), (3, 2)])
def test_sampler_union_is_global_stream(dp, mb):
    total = 96
    per_rank = [rank_batches(total, 0, mb, r, dp) for r in range(dp)]
    # micro-batch m of rank r reads consumed + m*(mb*dp) + r*mb + [0, mb)
    for r in range(dp):
        for m, ids in enumerate(per_rank[r]):
            assert ids == list(range(m * mb * dp + r * mb, m * mb * dp + r * mb + mb))
    interleaved = [i for m in range(len(per_rank[0])) for r in range(dp) for i in per_rank[r][m]]
    assert interleaved == list(range(total))


def test_sampler_resume_with_other_dp_continues_stream():
    total, mb, accum = 120, 2, 3
    full = [i for b in rank_batches(total, 0, mb, 0, 1) for i in b]
    consumed = 2 * (mb * 2 * accum)  # two global steps at dp=2 (global batch 12)
    for dp in (1, 2, 3):
        rest = [rank_batches(total, consumed, mb, r, dp) for r in range(dp)]
        stream = [i for m in range(len(rest[0])) for r in range(dp) for i in rest[r][m]]
        assert stream == full[consumed:]


def test_sampler_validation():
    with pytest.raises(ValueError, match="data_parallel_rank"):
        MicroBatchSampler(10, 0, 1, 2, 2)
    with pytest.raises(ValueError, match="consumed_samples"):
        MicroBatchSampler(10, 11, 1, 0, 1)
    assert len(MicroBatchSampler(10, 0, 3, 0, 1)) == 3  # a partial micro-batch is dropped


def test_dataloader_ranks_see_same_global_samples(shard, tmp_path):
    prefix, _ = shard
    ds = build_datasets(cfg_for(prefix, tmp_path / "cache"), 16, 4, {"train": 48})["train"]

    def by_id(dp):
        seen = {}
        for r in range(dp):
            loader = torch.utils.data.DataLoader(
                ds, batch_sampler=MicroBatchSampler(48, 8, 2, r, dp), collate_fn=collate
            )
            for batch in loader:
                assert batch["tokens"].shape == (2, 17) and batch["tokens"].dtype == torch.int64
                assert batch["noise_seeds"].dtype == torch.int64 and batch["sample_ids"].dtype == torch.int64
                for t, s, k in zip(batch["tokens"], batch["noise_seeds"], batch["sample_ids"].tolist()):
                    seen[k] = (t.tolist(), int(s))
        return seen

    one, two = by_id(1), by_id(2)
    assert sorted(one) == list(range(8, 48)) and one == two
    for k, (_, s) in one.items():  # int64 carries the uint64 bits
        assert np.int64(s).view(np.uint64) == idx.noise_seeds_np(4, 0, np.array([k]))[0]


def test_dataset_pickles_for_workers(shard, tmp_path):
    prefix, _ = shard
    ds = build_datasets(cfg_for(prefix, tmp_path / "cache"), 16, 4, {"train": 20})["train"]
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 10_000  # paths, not array contents
    for k in (0, 19):
        np.testing.assert_array_equal(clone[k]["tokens"], ds[k]["tokens"])


@pytest.mark.slow  # runs tools/build_index.py
def test_offline_build_tool_fills_the_same_cache(shard, tmp_path, monkeypatch):
    import subprocess
    import sys

    prefix, _ = shard
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cache = str(tmp_path / "offline")
    cmd = [sys.executable, os.path.join(root, "tools", "build_index.py"), "--data-path", prefix, "--cache-dir",
           cache, "--seq-length", "16", "--seed", "3", "--train-samples", "40", "--valid-samples", "6",
           "data.split=8,1,1"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and cache in done.stdout

    def no_build(*args, **kwargs):
        raise AssertionError("the offline build should have filled the cache")

    monkeypatch.setattr(idx, "build_split_arrays", no_build)
    out = build_datasets(cfg_for(prefix, cache), 16, 3, {"train": 40, "valid": 6})
    assert len(out["train"]) == 40 and len(out["valid"]) == 6


def _tokenizer(vocab_size, sha256="a" * 64):
    """What build_datasets reads of a Tokenizer: its size, source and hash."""
    from types import SimpleNamespace

    return SimpleNamespace(vocab_size=vocab_size, source="/models/tok.model", sha256=sha256)


def test_token_ids_outside_the_vocabulary_are_refused(shard, tmp_path, caplog):
    """Ids over the vocabulary would crash in F.embedding (TP=1) or be zeroed silently (TP=2)."""
    prefix, docs = shard
    top = max(max(d) for d in docs)
    cfg = cfg_for(prefix, tmp_path / "cache")
    cfg.allow_missing_sidecar = True  # the shard has no sidecar (the next test refuses that)
    with pytest.raises(ValueError) as e:
        build_datasets(cfg, 16, 1, {"train": 10}, tokenizer=_tokenizer(500))
    assert f"{prefix}.bin holds token id {top}, outside the vocabulary" in str(e.value)
    assert "/models/tok.model (500 ids, 0..499)" in str(e.value)
    assert "no tokenizer sidecar" in caplog.text  # accepted by data.allow_missing_sidecar: a warning
    cached = [d for d in os.listdir(tmp_path / "cache") if d.startswith("tokens_") and not d.endswith(".lock")]
    assert len(cached) == 1  # the maximum is cached beside the sample index
    build_datasets(cfg, 16, 1, {"train": 10}, tokenizer=_tokenizer(top + 1))


def test_shard_without_a_sidecar_is_refused_unless_accepted(shard, tmp_path, caplog):
    """No sidecar: nothing says which tokenizer made the shard; refused naming the shard and the flag (issue 21)."""
    prefix, docs = shard
    cfg = cfg_for(prefix, tmp_path / "cache")
    with pytest.raises(ValueError) as e:
        build_datasets(cfg, 16, 1, {"train": 10}, tokenizer=_tokenizer(1024))
    assert f"{prefix} has no tokenizer sidecar" in str(e.value) and "data.allow_missing_sidecar=true" in str(e.value)
    cfg.allow_missing_sidecar = True
    with caplog.at_level(logging.WARNING):
        assert len(build_datasets(cfg, 16, 1, {"train": 10}, tokenizer=_tokenizer(1024))["train"]) == 10
    assert f"{prefix} has no tokenizer sidecar" in caplog.text


def test_split_smaller_than_one_sample_is_refused_naming_both_sizes(shard, tmp_path):
    """A validation split shorter than seq_length + 1 tokens would repeat its few tokens epoch after
    epoch (minutes of index building and a meaningless validation): refused with both sizes (issue 21)."""
    prefix, docs = shard
    cfg = cfg_for(prefix, tmp_path / "cache", split="298,2,0")  # the valid split: the last 2 documents
    tokens = sum(len(d) for d in docs[298:])
    with pytest.raises(ValueError) as e:
        build_datasets(cfg, tokens, 1, {"train": 4, "valid": 4})
    text = str(e.value)
    assert f"the valid split (documents 298..300 under data.split) holds {tokens} tokens" in text
    assert f"model.seq_length + 1 = {tokens + 1} tokens" in text
    assert len(build_datasets(cfg, tokens - 1, 1, {"train": 4, "valid": 4})["valid"]) == 4  # one sample fits


def test_shard_of_another_tokenizer_is_refused(shard, tmp_path, caplog):
    import json

    prefix, _ = shard
    sidecar = str(tmp_path / "corpus.tokenizer.json")  # {output_prefix}.tokenizer.json of corpus_text_document
    with open(sidecar, "w") as f:
        json.dump({"model": "/models/other.model", "vocab_size": 1024, "sha256": "b" * 64}, f)
    cfg = cfg_for(prefix, tmp_path / "cache")
    with pytest.raises(ValueError) as e:
        build_datasets(cfg, 16, 1, {"train": 10}, tokenizer=_tokenizer(1024))
    text = str(e.value)
    assert f"{prefix} was tokenized with /models/other.model" in text and sidecar in text
    assert "data.tokenizer_model is /models/tok.model" in text
    build_datasets(cfg, 16, 1, {"train": 10}, tokenizer=_tokenizer(1024, sha256="b" * 64))
    with open(sidecar, "w") as f:
        json.dump({"model": "/models/other.model", "vocab_size": 1024}, f)
    with caplog.at_level(logging.WARNING):
        build_datasets(cfg, 16, 1, {"train": 10}, tokenizer=_tokenizer(1024))
    assert "predates tokenizer hashes" in caplog.text


def test_broken_cache_entry_is_rebuilt_with_a_warning(shard, tmp_path, caplog):
    """A truncated or reshaped .npy of a cache entry is named in a warning and rebuilt (issue 14)."""
    prefix, docs = shard
    cfg = cfg_for(prefix, tmp_path / "cache")
    good = build_datasets(cfg, 16, 1, {"train": 50})["train"]
    expected = [np.array(good[k]["tokens"]) for k in range(50)]
    victim = os.path.join(good.entry_dir, "d0_sample_index.npy")
    for damage in ("truncate", "reshape"):
        if damage == "truncate":
            with open(victim, "r+b") as f:
                f.truncate(os.path.getsize(victim) // 2)
        else:
            np.save(victim, np.zeros((3, 2), dtype=np.int32))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            again = build_datasets(cfg, 16, 1, {"train": 50})["train"]
        assert any(victim in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records), caplog.text
        assert again.entry_dir == good.entry_dir
        for k in range(50):
            np.testing.assert_array_equal(again[k]["tokens"], expected[k])


def test_read_only_cache_suggests_cache_dir(shard, tmp_path, monkeypatch):
    """A cache that cannot be written (read-only dataset directory) names data.cache_dir (issue 14)."""
    prefix, _ = shard
    cache = tmp_path / "ro_cache"
    cache.mkdir()
    if os.geteuid() == 0:  # root ignores permissions: the file system says read-only instead

        def read_only(path, *args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

        monkeypatch.setattr(data_cache.os, "open", read_only)
    else:
        os.chmod(cache, 0o555)
    try:
        with pytest.raises(ValueError, match=r"ro_cache .*data\.cache_dir"):
            build_datasets(cfg_for(prefix, cache), 16, 1, {"train": 50})
    finally:
        os.chmod(cache, 0o755)


def test_valid_seed_gives_every_training_seed_the_same_validation(shard, tmp_path):
    """data.valid_seed: runs of train.seed 1 and 2 validate on the same samples (tokens and noise
    seeds) while their training streams differ; without it the validation follows train.seed."""
    prefix, _ = shard
    n = {"train": 60, "valid": 30, "test": 0}
    cfg = cfg_for(prefix, tmp_path / "cache")
    a = build_datasets(cfg, 16, 1, n, valid_seed=77)
    b = build_datasets(cfg, 16, 2, n, valid_seed=77)
    own = build_datasets(cfg, 16, 2, n)
    valid = [a["valid"][k] for k in range(30)]
    for k in range(30):
        np.testing.assert_array_equal(valid[k]["tokens"], b["valid"][k]["tokens"])
        assert valid[k]["noise_seed"] == b["valid"][k]["noise_seed"]
    assert any(not np.array_equal(a["train"][k]["tokens"], b["train"][k]["tokens"]) for k in range(60))
    assert any(not np.array_equal(valid[k]["tokens"], own["valid"][k]["tokens"]) for k in range(30))
