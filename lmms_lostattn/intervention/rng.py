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


def coordinate(coord: torch.Tensor | int) -> torch.Tensor | int:
    """What a coordinate contributes to a draw, lowbias32((c + 0x9E3779B9) mod 2^32) (an int64 tensor, or an int
    mixed on the host): a pure function of the coordinate, so a caller drawing at the same coordinates again (every
    layer of a prompt at the same head and key positions) works it out once and passes it to :func:`uniform_at`."""
    return _mix((coord + _GOLDEN) & _MASK32)


def _fold(key: torch.Tensor | int, mixed: tuple[torch.Tensor | int, ...]) -> torch.Tensor:
    """The 32-bit state after folding each mixed coordinate into ``key``: h <- lowbias32(h xor m)."""
    state = torch.as_tensor(key, dtype=torch.int64) & _MASK32
    for value in mixed:
        state = _mix(state ^ value)
    return state


def _unit(state: torch.Tensor) -> torch.Tensor:
    """(h + 1/2) / 2^32 in float32."""
    return state.double().add_(0.5).div_(2**32).float()


def _mixed(key: torch.Tensor | int, coords: tuple[torch.Tensor | int, ...]) -> tuple[torch.Tensor | int, ...]:
    """:func:`coordinate` of each coordinate, tensors as int64 on ``key``'s device."""
    device = torch.as_tensor(key).device
    return tuple(
        coordinate(c if isinstance(c, int) else torch.as_tensor(c, dtype=torch.int64, device=device)) for c in coords
    )


def uniform_at(key: torch.Tensor | int, *mixed: torch.Tensor | int) -> torch.Tensor:
    """:func:`uniform` at coordinates already passed through :func:`coordinate`."""
    return _unit(_fold(key, mixed))


def uniform(key: torch.Tensor | int, *coords: torch.Tensor | int) -> torch.Tensor:
    """Uniform draws in (0, 1], float32 (1 where (h + 1/2) / 2^32 rounds up, probability 2^-24), broadcast over
    ``key`` and ``coords`` (int64 tensors or ints; an int coordinate is mixed on the host)."""
    return uniform_at(key, *_mixed(key, coords))


def normal_at(key: torch.Tensor | int, *mixed: torch.Tensor | int) -> torch.Tensor:
    """:func:`normal` at coordinates already passed through :func:`coordinate`."""
    state = _fold(key, mixed)  # the two streams are the coordinates followed by 1 and by 2
    u1, u2 = (_unit(_mix(state ^ coordinate(stream))) for stream in (1, 2))
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)


def normal(key: torch.Tensor | int, *coords: torch.Tensor | int) -> torch.Tensor:
    """Standard normal draws (Box-Muller on two independent uniform streams: the coordinates followed by 1 and by 2),
    float32, broadcast like ``uniform``."""
    return normal_at(key, *_mixed(key, coords))
