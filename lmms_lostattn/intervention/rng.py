"""Counter-based random numbers: a value is a pure function of its coordinates, never of call order.

Every random draw in the package is ``uniform(key, *coordinates)`` where the key mixes the seed, the sample
identity and the layer, and the coordinates are head, positions counted from the sample's first non-padding
token, and so on. Results therefore do not depend on batch size or composition, padding, rank or KV-cache use.
The mixer is the 32-bit "lowbias32" integer hash, run in int64 so it works on every device and dtype.
"""

from __future__ import annotations

import hashlib

import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mix(x: torch.Tensor | int) -> torch.Tensor | int:
    """lowbias32 of 32-bit values: Python ints, or int64 tensors (products wrap; the low 32 bits stay exact)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def stable_key(*parts: object) -> int:
    """A 32-bit key from any printable parts (seed, sample id, layer, stream name), stable across processes."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def uniform(key: torch.Tensor | int, *coords: torch.Tensor | int) -> torch.Tensor:
    """Uniform draws in (0, 1], float32 (1 where (h + 1/2) / 2^32 rounds up, probability 2^-24), broadcast over
    ``key`` and ``coords`` (int64 tensors or ints; an int coordinate is mixed on the host)."""
    state = torch.as_tensor(key, dtype=torch.int64) & _MASK32
    for coord in coords:
        if not isinstance(coord, int):
            coord = torch.as_tensor(coord, dtype=torch.int64, device=state.device)
        state = _mix(state ^ _mix((coord + _GOLDEN) & _MASK32))
    return state.double().add_(0.5).div_(2**32).float()


def normal(key: torch.Tensor | int, *coords: torch.Tensor | int) -> torch.Tensor:
    """Standard normal draws (Box-Muller on two independent uniform streams), float32, broadcast like ``uniform``."""
    u1 = uniform(key, *coords, 1)
    u2 = uniform(key, *coords, 2)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)
