"""Counter-based random numbers per sample: every draw is a pure function of (seed, sample id,
stream, restart, counter), never of the batch a sample shares, the device's generator state or
the order of the calls.

The mixer is splitmix64's finaliser.  `mix` computes it on Python integers (the host-side seeds of
per-sample torch generators); `keys`/`bits` compute the same function on int64 tensors (two's
complement wrap-around for the products, masked shifts for the logical right shifts), so one
[B, n] draw is a handful of elementwise ops on any device.
"""
from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def _signed(v: int) -> int:
    """The int64 whose bits are the unsigned 64-bit `v`."""
    return v - (1 << 64) if v >= 1 << 63 else v


def _fmix(h: int) -> int:
    h = ((h ^ (h >> 30)) * _M1) & _MASK64
    h = ((h ^ (h >> 27)) * _M2) & _MASK64
    return h ^ (h >> 31)


def mix(*keys: int) -> int:
    """A 63-bit seed from integer keys (host side)."""
    h = _GOLDEN
    for k in keys:
        h = (h ^ (int(k) & _MASK64)) & _MASK64
        h = _fmix((h + _GOLDEN) & _MASK64)
    return h >> 1


def _shr(h: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (h >> n) & ((1 << (64 - n)) - 1)


def _fmix_t(h: torch.Tensor) -> torch.Tensor:
    h = (h ^ _shr(h, 30)) * _signed(_M1)
    h = (h ^ _shr(h, 27)) * _signed(_M2)
    return h ^ _shr(h, 31)


def _absorb(h: torch.Tensor, k) -> torch.Tensor:
    k = _signed(int(k) & _MASK64) if not isinstance(k, torch.Tensor) else k
    return _fmix_t((h ^ k) + _signed(_GOLDEN))


def keys(seed: int, ids: torch.Tensor, *stream: int) -> torch.Tensor:
    """[B] int64 keys: mix(seed, ids[i], *stream) >> 0 for each row (bit-equal to `mix` but for the
    final shift, which `uniform` does not need)."""
    h = torch.full(ids.shape, _signed(_GOLDEN), dtype=torch.int64, device=ids.device)
    h = _absorb(h, seed)
    h = _absorb(h, ids.to(torch.int64))
    for s in stream:
        h = _absorb(h, s)
    return h


def bits(key: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """64 random bits for each (key, counter) pair, broadcast: e.g. key [B, 1], counter [n]."""
    return _absorb(key, counter)


def uniform(key: torch.Tensor, n: int, offset: int = 0) -> torch.Tensor:
    """[B, n] float32 uniform in [0, 1) from 24-bit draws at counters offset..offset+n-1."""
    c = torch.arange(offset, offset + n, device=key.device, dtype=torch.int64)
    return _shr(bits(key[:, None], c[None, :]), 40).to(torch.float32) * (2.0 ** -24)


def normal(key: torch.Tensor, n: int, offset: int = 0) -> torch.Tensor:
    """[B, n] float32 standard normal (Box-Muller on two uniform streams)."""
    u1 = uniform(key, n, offset)
    u2 = uniform(key, n, offset + n)
    return torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos((2 * torch.pi) * u2)


def scale_int(u: torch.Tensor, high: int) -> torch.Tensor:
    """Uniform draws u in [0, 1) to int64 uniform in [0, high] (inclusive); in float64, where
    u * (high + 1) is exact for the 24-bit draws."""
    return torch.clamp((u.double() * (high + 1)).long(), max=high)


def integers(key: torch.Tensor, high: int, counter: int) -> torch.Tensor:
    """[B] int64 uniform in [0, high] (inclusive) at one counter."""
    return scale_int(uniform(key, 1, counter)[:, 0], high)


def signs(key: torch.Tensor, n: int, offset: int = 0) -> torch.Tensor:
    """[B, n] float32 in {-1, +1}, each with probability 1/2."""
    return torch.where(uniform(key, n, offset) < 0.5, -1.0, 1.0)
