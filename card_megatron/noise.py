"""The counter-based noise generator (SplitMix64) in vectorised torch int64 arithmetic.

One generator serves the data (the noise seed of every sample), the objectives (all
randomness of a sample's corruption is a pure function of its noise seed; ``docs/design.md``,
"Noise") and sampling (``inference/sampling.py``: the uniform of each drawn token), so a
sample is corrupted, and a sequence sampled, identically whatever the batch it sits in, the
number of ranks or the parallel layout. The same generator is written in C++ (the data
indexer) and in NumPy (``data/index.py``, the test reference); the three agree bit for bit.

Public API: :func:`mix`, :func:`uniform` (counters shared by the batch, or one row per
sequence), :func:`unit_float`, :func:`derive_seeds`, :func:`noise_seeds`, :func:`weyl_uniform`
and the stream offsets below.

torch has no uint64 arithmetic that we can rely on, so 64-bit words are held in int64
with the same bits. Addition and multiplication wrap modulo 2^64 in two's complement,
which is exactly the unsigned result; ``>>`` on int64 is arithmetic, so the logical
shift is emulated by masking off the sign-extended high bits.

Counter layout (one 64-bit counter space per noise seed, split into streams so that
changing L or the block size never moves another stream's draws):

* stream 0, ``T_STREAM + b``: the noise level t of block ``b``. Objectives with one t
  per sequence (CARD, MDLM) use ``b = 0``, i.e. counter 0.
* stream 1, ``POSITION_STREAM + i``: the key of input position ``i`` (0-based), used to
  decide whether position ``i`` is masked.
* stream 2, ``EVAL_OFFSET_STREAM + b``: the random offset of the stratified t's of the
  evaluation passes (block ``b``).
* stream 4, ``VARIANT_STREAM``: the per-sample draw of a masking variant (CARD's
  ``objective.strict_tail_fraction``: a strict tail where it falls below the fraction).
* evaluation pass ``k`` draws its masks from the derived seed
  ``mix(seed ^ mix(EVAL_SEED_STREAM + k))``.
"""

from __future__ import annotations

import torch

__all__ = [
    "T_STREAM",
    "POSITION_STREAM",
    "EVAL_OFFSET_STREAM",
    "EVAL_SEED_STREAM",
    "VARIANT_STREAM",
    "WEYL_OFFSET",
    "mix",
    "uniform",
    "unit_float",
    "derive_seeds",
    "noise_seeds",
    "weyl_uniform",
]

_U64 = 1 << 64


def _to_int64(u: int) -> int:
    """The int64 value holding the bits of the unsigned 64-bit integer ``u``."""
    u &= _U64 - 1
    return u - _U64 if u >= 1 << 63 else u


_GOLDEN = _to_int64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio
_MUL1 = _to_int64(0xBF58476D1CE4E5B9)
_MUL2 = _to_int64(0x94D049BB133111EB)

T_STREAM = 0
POSITION_STREAM = 1 << 32
EVAL_OFFSET_STREAM = 2 << 32
EVAL_SEED_STREAM = 3 << 32
VARIANT_STREAM = 4 << 32

# u0 of the low-discrepancy (Weyl) sequence t_k = frac(u0 + k * 0.6180339887498949):
# u0 = 0.5, held as the 64-bit fixed-point fraction 2^63.
WEYL_OFFSET = _to_int64(1 << 63)


def _shift_right_logical(z: torch.Tensor, k: int) -> torch.Tensor:
    """``z >> k`` on the unsigned bits of int64 ``z`` (0 < k < 64)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser, elementwise on an int64 tensor of any shape (same shape out)."""
    if z.dtype != torch.int64:
        raise TypeError(f"noise.mix expects an int64 tensor, got {z.dtype}")
    z = z + _GOLDEN
    z = (z ^ _shift_right_logical(z, 30)) * _MUL1
    z = (z ^ _shift_right_logical(z, 27)) * _MUL2
    return z ^ _shift_right_logical(z, 31)


def unit_float(z: torch.Tensor) -> torch.Tensor:
    """The top 53 bits of int64 ``z`` (any shape) as float64 in [0, 1): ``(z >> 11) * 2^-53``."""
    return _shift_right_logical(z, 11).to(torch.float64) * (2.0**-53)


def uniform(noise_seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Uniform draws in [0, 1): ``(mix(seed ^ mix(c)) >> 11) * 2^-53``.

    noise_seeds: int64 [B] (uint64 bits); counters: int64 [n] (the same counters for every
    seed) or [B, n] (row b for seed b). Returns float64 [B, n] on the device of ``noise_seeds``.
    """
    if (
        noise_seeds.dim() != 1
        or counters.dim() not in (1, 2)
        or (counters.dim() == 2 and counters.shape[0] != noise_seeds.shape[0])
    ):
        raise ValueError(
            f"noise.uniform expects noise_seeds [B] and counters [n] or [B, n], got shapes "
            f"{tuple(noise_seeds.shape)} and {tuple(counters.shape)}"
        )
    mixed = mix(counters.to(device=noise_seeds.device, dtype=torch.int64))
    if mixed.dim() == 1:
        mixed = mixed[None, :]
    return unit_float(mix(noise_seeds.to(torch.int64)[:, None] ^ mixed))


def derive_seeds(noise_seeds: torch.Tensor, index: int) -> torch.Tensor:
    """Independent per-sample seeds for evaluation pass ``index``: int64 [B] -> int64 [B]."""
    salt = mix(torch.tensor([EVAL_SEED_STREAM + index], dtype=torch.int64, device=noise_seeds.device))
    return mix(noise_seeds.to(torch.int64) ^ salt)


def noise_seeds(seed: int, split: int, sample_ids: torch.Tensor) -> torch.Tensor:
    """``mix(mix(mix(seed) ^ split) ^ k)`` for each sample id k: int64 [B] -> int64 [B].

    The data indexer precomputes these in C++; this torch version is for tests and
    ad-hoc use (e.g. corrupting hand-made batches the way the training data would be).
    """
    device = sample_ids.device
    base = mix(mix(torch.tensor([_to_int64(seed)], dtype=torch.int64, device=device)) ^ split)
    return mix(base ^ sample_ids.to(torch.int64))


def weyl_uniform(indices: torch.Tensor) -> torch.Tensor:
    """Low-discrepancy draws ``frac(0.5 + k * 0.6180339887498949)`` for int64 indices k.

    Computed exactly in 64-bit fixed point (the golden-ratio increment is
    0x9E3779B97F4A7C15 / 2^64), so the value depends on k only and stays exact for
    any k. Returns float64 of the shape of ``indices``, in [0, 1).
    """
    return unit_float(indices.to(torch.int64) * _GOLDEN + WEYL_OFFSET)
