"""The two ways the host glue reaches into a harness where it has no hook: a name swapped for the length of a block
(and restored), and a harness function wrapped once per process by a wrapper that passes through unless its
arguments carry a lostattn model or results (all per-run state travels in those arguments)."""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from lmms_lostattn.compat.internals import internal
from lmms_lostattn.compat.versions import drift

_WRAPPED = "__lostattn_wrapper__"


@contextmanager
def swapped(owners: Iterable[Any], name: str, replacement: Callable[[Any], Any]) -> Iterator[None]:
    """Set ``owner.name = replacement(original)`` on each owner (a module or class) for the block; restored on
    exit."""
    originals = [(owner, getattr(owner, name)) for owner in owners]
    try:
        for owner, original in originals:
            setattr(owner, name, replacement(original))
        yield
    finally:
        for owner, original in originals:
            setattr(owner, name, original)


def argument(function: Callable[..., Any], name: str, args: tuple, kwargs: dict[str, Any]) -> Any:
    """What a call ``function(*args, **kwargs)`` passes its parameter ``name`` (its default where the call leaves it
    out)."""
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments[name]


def wrap_once(module: str, name: str, wrapper: Callable[..., Any]) -> None:
    """Replace ``module.name`` (a function, or ``Class.method`` as ``name``) by ``wrapper(original, *args,
    **kwargs)``; a second call for the same wrapper does nothing."""
    owner_name, _, attribute = name.rpartition(".")
    owner = internal(module, owner_name) if owner_name else importlib.import_module(module)
    if not hasattr(owner, attribute):
        raise drift(module.split(".")[0], f"{module}.{name}", "it to exist")
    original = getattr(owner, attribute)
    if getattr(original, _WRAPPED, None) is wrapper:
        return

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return wrapper(original, *args, **kwargs)

    setattr(wrapped, _WRAPPED, wrapper)
    setattr(owner, attribute, wrapped)
