"""card_megatron/noise.py against an independent NumPy uint64 reference, bit for bit."""

import numpy as np
import pytest
import torch

from card_megatron import noise

GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def np_mix(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = z + GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def np_uniform(seeds: np.ndarray, counters: np.ndarray) -> np.ndarray:
    z = np_mix(seeds[:, None] ^ np_mix(counters)[None, :])
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def as_u64(x: torch.Tensor) -> np.ndarray:
    return x.numpy().view(np.uint64)


def random_int64(rng: np.random.Generator, n: int) -> torch.Tensor:
    bits = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    edges = np.array([0, 1, 2**63 - 1, 2**63, 2**64 - 1, 0x9E3779B97F4A7C15], dtype=np.uint64)
    return torch.from_numpy(np.concatenate([edges, bits]).view(np.int64))


def test_mix_matches_numpy_uint64():
    z = random_int64(np.random.default_rng(0), 5000)
    assert (z < 0).any() and (z > 0).any()
    np.testing.assert_array_equal(as_u64(noise.mix(z)), np_mix(as_u64(z)))


def test_mix_known_splitmix64_value():
    # First output of SplitMix64 seeded with 0 (the generator's published test value).
    assert int(as_u64(noise.mix(torch.tensor([0])))[0]) == 0xE220A8397B1DCDAF


def test_uniform_matches_numpy_bit_exact():
    rng = np.random.default_rng(1)
    seeds = random_int64(rng, 200)
    counters = torch.cat([torch.arange(0, 70), random_int64(rng, 30), torch.tensor([noise.POSITION_STREAM + 5])])
    got = noise.uniform(seeds, counters)
    want = np_uniform(as_u64(seeds), as_u64(counters))
    assert got.dtype == torch.float64 and got.shape == (seeds.shape[0], counters.shape[0])
    np.testing.assert_array_equal(got.numpy(), want)
    assert float(got.min()) >= 0.0 and float(got.max()) < 1.0


def test_uniform_with_per_row_counters_matches_numpy_bit_exact():
    """Counters [B, n] (one row per seed: the sampling draws) against the reference row by row."""
    rng = np.random.default_rng(4)
    seeds = random_int64(rng, 14)  # 6 edge values + 14 random: 20 seeds
    counters = random_int64(rng, 20 * 7)[: 20 * 7].reshape(20, 7)
    got = noise.uniform(seeds, counters)
    want = np.stack([np_uniform(as_u64(seeds[b : b + 1]), as_u64(counters[b]))[0] for b in range(20)])
    assert got.dtype == torch.float64 and got.shape == (20, 7)
    np.testing.assert_array_equal(got.numpy(), want)
    with pytest.raises(ValueError, match="counters"):
        noise.uniform(seeds, counters[:3])


def test_uniform_is_roughly_uniform():
    u = noise.uniform(torch.arange(100, dtype=torch.int64), torch.arange(1000, dtype=torch.int64)).flatten()
    hist = torch.histc(u.float(), bins=10, min=0, max=1)
    expected = u.numel() / 10
    assert ((hist - expected).abs() < 5 * expected**0.5).all()


def test_noise_seeds_match_numpy_reference():
    ids = torch.arange(0, 1000, dtype=torch.int64) * 7919
    for seed, split in ((1234, 0), (2**64 - 3, 1), (0, 2)):
        ref = np_mix(np_mix(np_mix(np.array([seed], dtype=np.uint64)) ^ np.uint64(split)) ^ as_u64(ids))
        np.testing.assert_array_equal(as_u64(noise.noise_seeds(seed, split, ids)), ref)


def test_derive_seeds_matches_reference_and_differs_per_pass():
    seeds = random_int64(np.random.default_rng(2), 100)
    d0, d1 = noise.derive_seeds(seeds, 0), noise.derive_seeds(seeds, 1)
    salt = np_mix(np.array([noise.EVAL_SEED_STREAM + 1], dtype=np.uint64))
    np.testing.assert_array_equal(as_u64(d1), np_mix(as_u64(seeds) ^ salt))
    assert not torch.equal(d0, d1) and not torch.equal(d0, seeds)


def test_weyl_uniform_is_the_golden_ratio_sequence():
    k = torch.arange(0, 100000, dtype=torch.int64)
    got = noise.weyl_uniform(k).numpy()
    want = np.mod(0.5 + np.arange(100000, dtype=np.float64) * 0.6180339887498949, 1.0)
    diff = np.abs(got - want)
    diff = np.minimum(diff, 1.0 - diff)  # wrap-around near 0/1
    assert diff.max() < 1e-9
    assert got.min() >= 0.0 and got.max() < 1.0
    # Low discrepancy: any 100 consecutive ids cover all 10 deciles.
    assert len(np.unique(np.floor(got[12345:12445] * 10))) == 10


def test_mix_rejects_non_int64():
    with pytest.raises(TypeError):
        noise.mix(torch.zeros(3, dtype=torch.int32))
