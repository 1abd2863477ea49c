"""The C++ sample index against NumPy / pure-Python references written from the definitions."""

import numpy as np
import pytest

from card_megatron.data import index as idx

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


# --------------------------------------------------------------------------- references


def mix_int(z: int) -> int:
    """SplitMix64 finaliser on Python ints, straight from docs/design.md."""
    z = (z + GOLDEN) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


class RefRng:
    """Draw t = mix(key + t * golden); bounded draws by Lemire's multiply-shift rejection."""

    def __init__(self, key: int) -> None:
        self.state = key & M64

    def next(self) -> int:
        r = mix_int(self.state)
        self.state = (self.state + GOLDEN) & M64
        return r

    def bounded(self, n: int) -> int:
        m = self.next() * n
        if (m & M64) < n:
            threshold = ((1 << 64) - n) % n
            while (m & M64) < threshold:
                m = self.next() * n
        return m >> 64


def ref_shuffle(values: list, key: int) -> list:
    a = list(values)
    rng = RefRng(key)
    for i in range(len(a) - 1, 0, -1):
        j = rng.bounded(i + 1)
        a[i], a[j] = a[j], a[i]
    return a


def epoch_key(key: int, e: int) -> int:
    return mix_int(key ^ e)


def ref_document_index(begin: int, end: int, epochs: int, key: int) -> np.ndarray:
    out = []
    for e in range(epochs):
        out += ref_shuffle(list(range(begin, end)), epoch_key(key, e))
    return np.array(out, dtype=np.int64)


def ref_sample_index(sizes: np.ndarray, document_index: np.ndarray, L: int, n: int) -> np.ndarray:
    """Boundary i = (position, offset) of stream token i*L, located by binary search."""
    lengths = sizes[document_index].astype(np.int64)
    ends = np.cumsum(lengths)
    tokens = np.arange(n + 1, dtype=np.int64) * L
    pos = np.searchsorted(ends, tokens, side="right")
    offset = tokens - (ends[pos] - lengths[pos])
    return np.stack([pos, offset], axis=1)


def ref_blend(weights: list, size: int) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    served = [0] * len(w)
    d_index, d_sample = [], []
    for k in range(size):
        gaps = [w[d] * (k + 1) - served[d] for d in range(len(w))]
        best = int(np.argmax(gaps))  # argmax returns the first maximum: lowest index on ties
        d_index.append(best)
        d_sample.append(served[best])
        served[best] += 1
    return np.array(d_index), np.array(d_sample)


# --------------------------------------------------------------------------- generator


def test_splitmix64_known_value_and_reference():
    # Vigna's splitmix64.c seeded with 0 first returns 0xE220A8397B1DCDAF.
    assert int(idx.splitmix64(np.zeros(1, np.uint64))[0]) == 0xE220A8397B1DCDAF
    rng = np.random.default_rng(0)
    z = np.concatenate(
        [rng.integers(0, 2**64 - 1, size=1000, dtype=np.uint64, endpoint=True), np.array([0, 1, M64], np.uint64)]
    )
    cpp = idx.splitmix64(z)
    np.testing.assert_array_equal(cpp, idx.splitmix64_np(z))
    assert [int(x) for x in cpp[:50]] == [mix_int(int(x)) for x in z[:50]]


@pytest.mark.parametrize("seed", [0, 1234, -7, 2**63 + 5])
@pytest.mark.parametrize("split", [0, 1, 2])
def test_noise_seeds_bit_exact(seed, split):
    cpp = idx.noise_seeds(seed, split, 500, start=1000)
    ids = np.arange(1000, 1500, dtype=np.uint64)
    np.testing.assert_array_equal(cpp, idx.noise_seeds_np(seed, split, ids))
    s = seed & M64
    expected = [mix_int(mix_int(mix_int(s) ^ split) ^ k) for k in range(1000, 1010)]
    assert [int(x) for x in cpp[:10]] == expected
    assert cpp.dtype == np.uint64


def test_noise_seeds_differ_by_split_and_seed():
    a, b, c = idx.noise_seeds(1, 0, 100), idx.noise_seeds(1, 1, 100), idx.noise_seeds(2, 0, 100)
    assert len(np.unique(np.concatenate([a, b, c]))) == 300


# --------------------------------------------------------------------------- document index


@pytest.mark.parametrize("begin,end,epochs", [(0, 1, 1), (3, 40, 3), (10, 10, 2), (0, 257, 2)])
def test_document_index_matches_reference(begin, end, epochs):
    key = 987654321
    got = idx.build_document_index(begin, end, epochs, key)
    np.testing.assert_array_equal(got, ref_document_index(begin, end, epochs, key))
    for e in range(epochs):  # each epoch is a permutation of the range
        chunk = got[e * (end - begin) : (e + 1) * (end - begin)]
        np.testing.assert_array_equal(np.sort(chunk), np.arange(begin, end))


def test_document_index_deterministic_and_epochs_differ():
    a = idx.build_document_index(0, 1000, 2, 42)
    np.testing.assert_array_equal(a, idx.build_document_index(0, 1000, 2, 42))
    assert not np.array_equal(a[:1000], a[1000:])
    assert not np.array_equal(a, idx.build_document_index(0, 1000, 2, 43))


def test_document_index_64bit_ids():
    begin = 2**31 + 5
    got = idx.build_document_index(begin, begin + 50, 1, 7)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, ref_document_index(begin, begin + 50, 1, 7))
    assert idx.build_document_index(0, 50, 1, 7).dtype == np.int32


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("L", [1, 7, 64])
def test_sample_index_matches_reference(L):
    rng = np.random.default_rng(L)
    sizes = rng.integers(0, 30, size=400).astype(np.int32)  # includes empty documents
    sizes[[0, 5, -1]] = 0
    doc = idx.build_document_index(0, 400, 3, 11)
    total = int(sizes[doc].sum())
    n = (total - 1) // L
    got = idx.build_sample_index(sizes, doc, L, n)
    assert got.shape == (n + 1, 2)
    np.testing.assert_array_equal(got, ref_sample_index(sizes, doc, L, n))
    # int64 document indices give the same boundaries
    np.testing.assert_array_equal(idx.build_sample_index(sizes, doc.astype(np.int64), L, n), got)


def test_sample_index_equals_megatron():
    helpers = pytest.importorskip("megatron.core.datasets.helpers")
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 200, size=2000).astype(np.int32)
    epochs, L = 2, 128
    doc = idx.build_document_index(0, 2000, epochs, 5)
    tokens_per_epoch = int(sizes.sum())
    n = (epochs * tokens_per_epoch - 1) // L
    theirs = helpers.build_sample_idx(sizes, doc, L, epochs, tokens_per_epoch, True, True)
    np.testing.assert_array_equal(idx.build_sample_index(sizes, doc, L, n), theirs)


def test_sample_index_too_few_tokens():
    sizes = np.array([5, 5], np.int32)
    doc = np.array([0, 1], np.int32)
    idx.build_sample_index(sizes, doc, 3, 3)  # tokens 0..9 cover boundaries 0,3,6,9
    with pytest.raises(ValueError, match="too few"):
        idx.build_sample_index(sizes, doc, 3, 4)


def test_epochs_and_epoch_starts():
    rng = np.random.default_rng(1)
    for _ in range(200):
        T, L, n = int(rng.integers(1, 5000)), int(rng.integers(1, 300)), int(rng.integers(0, 400))
        E = idx.num_epochs_for(T, L, n)
        assert (E * T - 1) // L >= n and (E == 1 or ((E - 1) * T - 1) // L < n)
        starts = idx.epoch_sample_starts(T, L, E)
        assert starts[0] == 0 and starts[-1] == (E * T - 1) // L and np.all(np.diff(starts) >= 0)
        for e in range(E):  # sample i is in the epoch holding its first token i*L
            i = np.arange(starts[e], starts[e + 1])
            assert np.all(i * L // T == e)


# --------------------------------------------------------------------------- shuffle and blend


def test_shuffle_index_matches_reference():
    starts = np.array([0, 37, 37, 120, 121], np.int64)
    key = 2024
    got = idx.build_shuffle_index(starts, key)
    assert got.dtype == np.uint32
    expected = []
    for e in range(len(starts) - 1):
        expected += ref_shuffle(list(range(starts[e], starts[e + 1])), epoch_key(key, e))
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, idx.build_shuffle_index(starts, key))


@pytest.mark.parametrize("weights", [[1.0], [0.7, 0.3], [5, 1, 1, 3], [1 / 3, 1 / 3, 1 / 3]])
def test_blend_matches_reference(weights):
    size = 3000
    d_index, d_sample = idx.build_blend_index(weights, size)
    ref_d, ref_s = ref_blend(weights, size)
    np.testing.assert_array_equal(d_index, ref_d)
    np.testing.assert_array_equal(d_sample, ref_s)
    assert d_index.dtype == np.uint8 and d_sample.dtype == np.int64
    w = np.asarray(weights) / np.sum(weights)
    counts = np.bincount(d_index, minlength=len(w))
    assert np.all(np.abs(counts - w * size) <= 1.0)  # greedy rule tracks the weights to one sample
    for d in range(len(w)):  # each shard's samples are taken in order 0, 1, 2, ...
        np.testing.assert_array_equal(d_sample[d_index == d], np.arange(counts[d]))


def test_blend_many_datasets_int16():
    d_index, _ = idx.build_blend_index(np.ones(300), 900)
    assert d_index.dtype == np.int16
    assert np.all(np.bincount(d_index, minlength=300) == 3)


def test_split_document_ranges():
    assert idx.split_document_ranges("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert idx.split_document_ranges("1,0,0", 10) == [(0, 10), (10, 10), (10, 10)]
    assert idx.split_document_ranges("2,1,1", 7) == [(0, 4), (4, 5), (5, 7)]
    with pytest.raises(ValueError, match="data.split"):
        idx.parse_split("1,2")
