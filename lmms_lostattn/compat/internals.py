"""The upstream internals the mechanism relies on, each looked up by name in one place.

* :func:`internal` imports a name of an upstream package; a missing one is an
  :class:`~lmms_lostattn.compat.versions.UpstreamError` naming it and the installed version, at import time;
* :func:`forward_cache` finds the KV cache of a model forward under the names the tested releases use
  (:data:`KV_CACHE_KWARGS`) and refuses a cache passed under any other name;
* :func:`check_model` checks, before a scope attaches anything, what the scope needs of a live model.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Mapping
from typing import Any

from lmms_lostattn.compat.versions import drift

# The name a model forward takes its KV cache under: ``cache`` from transformers 5.24 (``past_key_values`` is still
# accepted there, deprecated), ``past_key_values`` before. A cache under any other name is refused.
KV_CACHE_KWARGS = ("cache", "past_key_values")


def internal(module: str, name: str) -> Any:
    """``module.name`` of an upstream package, or an :class:`UpstreamError` naming it."""
    package = module.split(".")[0]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise drift(package, f"{module}.{name}", "it to exist") from error


# -- model forwards ----------------------------------------------------------------------------------------------


def forward_cache(kwargs: Mapping[str, Any]) -> Any | None:
    """The KV cache a model forward was called with (None: no cache, a new prompt or a recomputation)."""
    cache_class = internal("transformers.cache_utils", "Cache")
    given = [name for name in KV_CACHE_KWARGS if kwargs.get(name) is not None]
    stray = [name for name, value in kwargs.items() if name not in KV_CACHE_KWARGS and isinstance(value, cache_class)]
    if stray or len(given) > 1:
        where = ", ".join(stray or given)
        raise drift(
            "transformers",
            "the model forward's KV-cache argument",
            f"one cache under one of {KV_CACHE_KWARGS}, got {where}",
        )
    if not given:
        return None
    cache = kwargs[given[0]]
    if not callable(getattr(cache, "get_seq_length", None)):
        raise drift("transformers", f"{type(cache).__name__}.get_seq_length", "the cache to count its positions")
    return cache


def forward_input(module: Any, args: tuple, kwargs: Mapping[str, Any], name: str) -> Any:
    """The tensor ``module``'s forward was called with as ``name=`` or as its first positional argument (what a
    forward pre-hook with ``with_kwargs=True`` sees), or an :class:`UpstreamError` naming the module."""
    import torch

    value = kwargs[name] if name in kwargs else (args[0] if args else None)
    if not isinstance(value, torch.Tensor):
        raise drift("transformers", f"{type(module).__name__}.forward", f"its input as {name}= or first argument")
    return value


def _module_of(obj: Any) -> Any:
    return sys.modules[type(obj).__module__]


def check_model(model: Any, attention_modules: list[Any], eager: bool) -> None:
    """What a scope needs of a live model: a forward that takes a KV cache under a known name,
    ``set_attn_implementation``, and (for the eager kernel) ``eager_attention_forward`` in each attention module's
    model file."""
    parameters = inspect.signature(model.forward).parameters
    if not any(name in parameters for name in KV_CACHE_KWARGS):
        raise drift(
            "transformers",
            f"{type(model).__name__}.forward",
            f"a KV-cache parameter named one of {KV_CACHE_KWARGS}; it takes {', '.join(parameters)}",
        )
    if not callable(getattr(model, "set_attn_implementation", None)):
        raise drift("transformers", f"{type(model).__name__}.set_attn_implementation", "the method to exist")
    if eager:
        for module in attention_modules:
            if not callable(getattr(_module_of(module), "eager_attention_forward", None)):
                raise drift(
                    "transformers",
                    f"{type(module).__module__}.eager_attention_forward",
                    "the model file's eager kernel",
                )
