"""Token shards: C++ writer and reader round trips, Megatron interop both ways, corruption, merge."""

import os
import pickle
import struct

import numpy as np
import pytest

from card_megatron.data.shards import (
    ShardWriter,
    TokenShard,
    merge_shards,
    shard_fingerprint,
    token_dtype,
)

try:
    from megatron.core.datasets import indexed_dataset as megatron_idx
except ImportError:  # the interop tests need megatron-core; the rest do not
    megatron_idx = None
needs_megatron = pytest.mark.skipif(megatron_idx is None, reason="megatron-core is not installed")


def random_docs(rng, n, vocab, max_len=50):
    return [rng.integers(0, vocab, size=rng.integers(1, max_len)) for _ in range(n)]


def write_docs(prefix, docs, vocab_size, batch=7):
    with ShardWriter(str(prefix), vocab_size=vocab_size) as w:
        for i in range(0, len(docs), batch):  # several documents per call, like the tool
            part = docs[i : i + batch]
            w.add_documents(np.concatenate(part), np.array([len(d) for d in part]))
    return str(prefix)


def megatron_write(prefix, docs, dtype, split_first=False):
    import torch

    b = megatron_idx.IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for i, d in enumerate(docs):
        if split_first and i == 0 and len(d) > 2:  # a document of two sequences
            b.add_item(torch.from_numpy(d[:2].astype(np.int64)))
            b.add_item(torch.from_numpy(d[2:].astype(np.int64)))
            b.end_document()
        else:
            b.add_document(torch.from_numpy(d.astype(np.int64)), [len(d)])
    b.finalize(str(prefix) + ".idx")
    return str(prefix)


@pytest.mark.parametrize(
    "vocab_size, dtype", [(1000, np.uint16), (65499, np.uint16), (65500, np.int32), (200_000, np.int32)]
)
def test_round_trip(tmp_path, vocab_size, dtype):
    rng = np.random.default_rng(vocab_size)
    docs = random_docs(rng, 60, vocab_size)
    docs[3] = np.array([vocab_size - 1, 0])  # extremes of the range
    prefix = write_docs(tmp_path / "s", docs, vocab_size)
    assert token_dtype(vocab_size) == dtype
    s = TokenShard(prefix)
    assert s.dtype == dtype and len(s) == len(docs) and s.num_documents == len(docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(s[i], d)
    np.testing.assert_array_equal(s[-1], docs[-1])
    lengths = np.array([len(d) for d in docs])
    np.testing.assert_array_equal(s.sequence_lengths, lengths)
    np.testing.assert_array_equal(
        s.sequence_pointers, np.concatenate([[0], np.cumsum(lengths)[:-1]]) * np.dtype(dtype).itemsize
    )
    np.testing.assert_array_equal(s.document_indices, np.arange(len(docs) + 1))
    assert s.num_tokens == lengths.sum()
    s.check_consistency()
    with pytest.raises(IndexError):
        s[len(docs)]
    s2 = pickle.loads(pickle.dumps(s))
    assert len(pickle.dumps(s)) < 200 and len(s2) == len(s)
    np.testing.assert_array_equal(s2[5], docs[5])
    # no temporaries left next to the shard
    assert sorted(os.listdir(tmp_path)) == ["s.bin", "s.idx"]


@needs_megatron
def test_index_bytes_identical_to_megatron(tmp_path):
    rng = np.random.default_rng(0)
    for vocab, dtype in [(500, np.uint16), (100_000, np.int32)]:
        docs = random_docs(rng, 40, vocab)
        ours = write_docs(tmp_path / f"ours{vocab}", docs, vocab)
        theirs = megatron_write(tmp_path / f"theirs{vocab}", docs, dtype)
        for ext in (".bin", ".idx"):
            assert open(ours + ext, "rb").read() == open(theirs + ext, "rb").read()


@needs_megatron
def test_megatron_reads_ours(tmp_path):
    rng = np.random.default_rng(1)
    for vocab in (800, 70_000):
        docs = random_docs(rng, 30, vocab)
        prefix = write_docs(tmp_path / f"o{vocab}", docs, vocab)
        ds = megatron_idx.IndexedDataset(prefix)
        assert len(ds) == len(docs)
        for i, d in enumerate(docs):
            np.testing.assert_array_equal(ds[i], d)
        np.testing.assert_array_equal(ds.document_indices, np.arange(len(docs) + 1))


@needs_megatron
def test_we_read_megatron(tmp_path):
    rng = np.random.default_rng(2)
    for vocab, dtype in [(800, np.uint16), (70_000, np.int32)]:
        docs = random_docs(rng, 30, vocab)
        prefix = megatron_write(tmp_path / f"m{vocab}", docs, dtype, split_first=True)
        s = TokenShard(prefix)
        ref = megatron_idx.IndexedDataset(prefix)
        assert s.dtype == dtype and len(s) == len(ref) == len(docs) + 1
        for i in range(len(ref)):
            np.testing.assert_array_equal(s[i], ref[i])
        np.testing.assert_array_equal(s.document_indices, ref.document_indices)
        np.testing.assert_array_equal(np.concatenate([s[0], s[1]]), docs[0])
        s.check_consistency()


def test_truncated_and_foreign_files(tmp_path):
    rng = np.random.default_rng(3)
    prefix = write_docs(tmp_path / "s", random_docs(rng, 20, 300), 300)
    bin_bytes = open(prefix + ".bin", "rb").read()
    idx_bytes = open(prefix + ".idx", "rb").read()

    def corrupt(bin_data=bin_bytes, idx_data=idx_bytes):
        p = str(tmp_path / "c")
        open(p + ".bin", "wb").write(bin_data)
        open(p + ".idx", "wb").write(idx_data)
        return p

    cases = [  # (bin bytes, idx bytes, expected message)
        (bin_bytes[:-2], idx_bytes, "c.bin is truncated"),
        (bin_bytes + b"\0\0", idx_bytes, "c.bin is longer"),
        (bin_bytes, idx_bytes[:-8], "c.idx is truncated"),
        (bin_bytes, idx_bytes[:20], "c.idx is truncated"),
        (bin_bytes, b"PK\x03\x04" + bytes(range(200)), "c.idx is not a Megatron MMIDIDX"),
        (bin_bytes, b"", "c.idx is not a Megatron MMIDIDX"),
        (bin_bytes, idx_bytes[:9] + struct.pack("<Q", 2) + idx_bytes[17:], "version 2"),
        (bin_bytes, idx_bytes[:17] + bytes([6]) + idx_bytes[18:], "dtype code 6"),
    ]
    for bin_data, idx_data, message in cases:
        with pytest.raises(ValueError, match=message):
            TokenShard(corrupt(bin_data, idx_data))
    assert len(TokenShard(corrupt())) == 20  # the pristine bytes still read
    with pytest.raises(ValueError, match="not found"):
        TokenShard(str(tmp_path / "missing"))


def test_writer_errors_and_abort(tmp_path):
    prefix = str(tmp_path / "w")
    with pytest.raises(RuntimeError):
        with ShardWriter(prefix, vocab_size=100) as w:
            w.add_document([1, 2, 3])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []  # aborted: temporaries deleted, nothing final
    w = ShardWriter(prefix, vocab_size=100)
    with pytest.raises(ValueError, match="lengths sum"):
        w.add_documents(np.array([1, 2, 3]), np.array([2]))
    with pytest.raises(ValueError, match="out of range"):
        w.add_document([70_000])
    w.abort()
    assert os.listdir(tmp_path) == []
    write_docs(prefix, [np.array([1, 2])], 100)
    with pytest.raises(ValueError, match="already exists"):
        ShardWriter(prefix, vocab_size=100)
    with ShardWriter(prefix, vocab_size=100, overwrite=True) as w:
        w.add_document([5, 6, 7])
    np.testing.assert_array_equal(TokenShard(prefix)[0], [5, 6, 7])


def test_empty_shard(tmp_path):
    with ShardWriter(str(tmp_path / "e"), vocab_size=100):
        pass
    s = TokenShard(str(tmp_path / "e"))
    assert len(s) == 0 and s.num_tokens == 0 and s.num_documents == 0


@needs_megatron
def test_merge(tmp_path):
    rng = np.random.default_rng(4)
    a_docs, b_docs, c_docs = (random_docs(rng, n, 900) for n in (10, 15, 5))
    a = write_docs(tmp_path / "a", a_docs, 900)
    b = write_docs(tmp_path / "b", b_docs, 900)
    c = megatron_write(tmp_path / "c", c_docs, np.uint16, split_first=True)  # 2 sequences in doc 0
    out = str(tmp_path / "m")
    stats = merge_shards([a, b, c], out)
    m = TokenShard(out)
    seqs = [TokenShard(p)[i] for p in (a, b, c) for i in range(len(TokenShard(p)))]
    assert len(m) == len(seqs) == stats.num_sequences == 10 + 15 + 6
    for i, s in enumerate(seqs):
        np.testing.assert_array_equal(m[i], s)
    expected_docs = np.concatenate([np.arange(0, 26), 25 + TokenShard(c).document_indices[1:]])
    np.testing.assert_array_equal(m.document_indices, expected_docs)
    assert m.num_documents == stats.num_documents == 30
    m.check_consistency()
    # Megatron's reader agrees
    ds = megatron_idx.IndexedDataset(out)
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds[i], m[i])
    # a small block size streams in many pieces with the same result
    out2 = str(tmp_path / "m2")
    with ShardWriter(out2, dtype=np.uint16) as w:
        for p in (a, b, c):
            w.add_shard(p, block_tokens=17)
    assert open(out2 + ".bin", "rb").read() == open(out + ".bin", "rb").read()
    assert open(out2 + ".idx", "rb").read() == open(out + ".idx", "rb").read()

    d = write_docs(tmp_path / "d", random_docs(rng, 3, 100_000), 100_000)  # int32
    with pytest.raises(ValueError, match="different dtypes"):
        merge_shards([a, d], str(tmp_path / "x"))
    with pytest.raises(ValueError, match="already exists"):
        merge_shards([a, b], out)
    assert not os.path.exists(str(tmp_path / "x.bin"))


def test_fingerprint(tmp_path):
    rng = np.random.default_rng(5)
    docs = random_docs(rng, 10, 500)
    p = write_docs(tmp_path / "f", docs, 500)
    f1 = shard_fingerprint(p)
    assert shard_fingerprint(p) == f1
    write_docs_over = docs[:9] + [docs[9][::-1]]  # same sizes, different content
    with ShardWriter(p, vocab_size=500, overwrite=True) as w:
        for d in write_docs_over:
            w.add_document(d)
    assert shard_fingerprint(p) != f1
    with pytest.raises(ValueError, match="not found"):
        shard_fingerprint(str(tmp_path / "nope"))
