"""How one argument's value is read: names and numbers, head selections and layer lists, each refused with a
:class:`SpecError` naming the argument, the value and what is accepted."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

_LAYER_ITEM = re.compile(r"^(-?\d+)$|^(\d+)-(\d+)$|^(-?\d+)?:(-?\d+)?$", re.ASCII)
_HEAD_BAND = re.compile(r"^p(\d*\.?\d+)-(\d*\.?\d+)$", re.ASCII)


class SpecError(ValueError):
    """A plugin argument has a bad value or makes no sense with the others."""


def refusal(arg: str, value: object, accepted: str) -> SpecError:
    """The error for ``arg=value``, naming what is accepted."""
    return SpecError(f"lostattn: {arg}={value!r} is not valid; accepted: {accepted}")


def check_ascii(arg: str, value: object) -> None:
    """Every value of the plugin's arguments is ASCII text: ``²`` or ``١`` pass ``str.isdigit`` and Python's
    ``int``, and crash lmms-eval's argument parser."""
    if isinstance(value, str) and not value.isascii():
        raise refusal(arg, value, "ASCII text (digits 0-9; see the argument's accepted values)")


def choice(arg: str, value: object, choices: tuple[str, ...]) -> str:
    """One of ``choices``, in any case and with spaces around it."""
    text = str(value).strip().lower()
    if text not in choices:
        raise refusal(arg, value, " | ".join(choices))
    return text


def number_value(arg: str, value: object, kind: type, accepted: str) -> Any:
    """A finite number of ``kind`` (an int given as a whole float too; never a bool)."""
    if isinstance(value, bool):
        raise refusal(arg, value, accepted)
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise refusal(arg, value, accepted) from None
    if kind is int and isinstance(value, float) and value != number:
        raise refusal(arg, value, accepted)
    if number != number or number in (float("inf"), float("-inf")):
        raise refusal(arg, value, accepted)
    return number


def list_text(value: object) -> str:
    """Normalise a list-valued argument: ``[1,2]``, ``"1,2"``, ``1;2`` and ``1 2`` all become ``1,2`` (and a whole
    float, as lmms-eval's argument parser reads ``-1``, its integer); a list or tuple item by item (JSON values)."""
    if isinstance(value, list | tuple):
        return ",".join(list_text(item) for item in value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip().strip("'\"").strip("[]()")
    return ",".join(part for part in re.split(r"[,;\s]+", text) if part)


@dataclass(frozen=True)
class HeadSelection:
    """Which heads are edited: all of them, an explicit list, or the SAP percentile band ``pA-B``."""

    kind: str  # "all" | "indices" | "band"
    indices: tuple[int, ...] = ()
    band: tuple[float, float] = (0.0, 1.0)

    def describe(self) -> str:
        if self.kind == "indices":
            return ",".join(map(str, self.indices))
        if self.kind == "band":  # each bound exactly, positional, as parse_heads reads it back
            return "p" + "-".join(f"{Decimal(repr(bound)).normalize():f}" for bound in self.band)
        return "all"


def rank_quantile(rank: Any, num_heads: int) -> Any:
    """SAP's rank quantile of a head, ``rank / (H - 1)`` (0 for a single head); ``rank`` an int or a tensor."""
    return rank / max(num_heads - 1, 1)


def parse_heads(value: object) -> HeadSelection:
    """Parse ``all``, ``p0.3-0.9`` or ``0,5,7`` (syntax only; the range is checked by :meth:`resolve`)."""
    text = list_text(value).lower()
    accepted = "all | pA-B with 0 <= A <= B <= 1 (e.g. p0.3-0.9) | head indices (e.g. 0,5,7)"
    if text == "all":
        return HeadSelection("all")
    band = _HEAD_BAND.match(text)
    if band:
        low, high = float(band.group(1)), float(band.group(2))
        if not 0.0 <= low <= high <= 1.0:
            raise refusal("attn_heads", value, accepted)
        return HeadSelection("band", band=(low, high))
    items = text.split(",")
    if not text or not all(item.isascii() and item.isdigit() for item in items):
        raise refusal("attn_heads", value, accepted)
    return HeadSelection("indices", indices=tuple(sorted({int(item) for item in items})))


_LAYERS_SYNTAX = "all | an index | A-B (inclusive) | Python slice like -6: or 1: | a list like 18,19,20"


def check_layers_syntax(value: object) -> str:
    """The normalised ``attn_layers`` text, or a :class:`SpecError` if it is not one of the accepted forms."""
    text = list_text(value).lower()
    if text != "all" and not all(_LAYER_ITEM.match(item) for item in text.split(",")):
        raise refusal("attn_layers", value, _LAYERS_SYNTAX)
    return text


def parse_layers(value: object, num_layers: int, arg: str = "attn_layers") -> tuple[int, ...]:
    """Parse ``all``, ``18``, ``1-31`` (inclusive), ``18,19,20``, ``-6:`` or ``2:10`` (Python slices) into indices.

    Every index and slice bound must lie inside the model (a slice bound may also be ``num_layers``): ``-40:`` on
    a 32-layer model is an error, not ``all``. ``arg``: the argument the errors name.
    """
    accepted = f"{_LAYERS_SYNTAX}; this model has layers 0-{num_layers - 1}"
    try:
        text = check_layers_syntax(value)
    except SpecError:
        raise refusal(arg, value, accepted) from None
    if text == "all":
        return tuple(range(num_layers))
    chosen: set[int] = set()
    for item in text.split(","):
        single, first, last, start, stop = _LAYER_ITEM.match(item).groups()
        if single is not None:
            index = int(single)
            if not -num_layers <= index < num_layers:
                raise refusal(arg, value, accepted)
            chosen.add(index % num_layers)
        elif first is not None:
            low, high = int(first), int(last)
            if low > high or high >= num_layers:
                raise refusal(arg, value, accepted)
            chosen.update(range(low, high + 1))
        else:
            begin, end = (int(bound) if bound else None for bound in (start, stop))
            if any(bound is not None and not -num_layers <= bound <= num_layers for bound in (begin, end)):
                raise refusal(arg, value, accepted)
            span = range(num_layers)[begin:end]
            if not span:
                raise refusal(arg, value, accepted)
            chosen.update(span)
    return tuple(sorted(chosen))
