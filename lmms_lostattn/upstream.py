"""The upstream internals the mechanism relies on, each named in one place and checked, and the tested versions.

transformers changes its internals between minor releases (5.24 renamed the forward's KV-cache argument
``past_key_values`` to ``cache`` and stopped passing an all-ones ``attention_mask``), and a moved internal must
read as one clear error naming it, never as a wrong number. So:

* :func:`internal` imports every transformers name the mechanism uses; a missing one is an :class:`UpstreamError`
  naming it and the installed version, at import time;
* :func:`forward_cache` finds the KV cache of a model forward under the names the tested releases use
  (:data:`KV_CACHE_KWARGS`) and refuses a cache passed under any other name;
* :func:`check_model` checks, before a scope attaches anything, what the scope needs of a live model;
* :data:`CONTACT_POINTS` are small behavioural checks of the same internals (the tests run each one, and
  ``lostattn doctor`` runs them in a user's environment);
* :func:`version_problems` compares the installed versions with the ranges this package declares (its own
  metadata, i.e. ``pyproject.toml``), and :func:`require_tested_versions` refuses to start outside them.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, requires, version
from types import SimpleNamespace
from typing import Any

from packaging.requirements import Requirement

DISTRIBUTION = "lmms-lostattn"
ALLOW_UNTESTED = "LOSTATTN_ALLOW_UNTESTED"  # set to 1 to run outside the tested ranges (a warning instead)
# The name a model forward takes its KV cache under: ``cache`` from transformers 5.24 (``past_key_values`` is still
# accepted there, deprecated), ``past_key_values`` before. A cache under any other name is refused.
KV_CACHE_KWARGS = ("cache", "past_key_values")


class UpstreamError(RuntimeError):
    """An upstream package is outside the tested range or moved an internal the package relies on."""


def installed(package: str) -> str | None:
    """The installed version of ``package``, or None."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


@functools.cache
def tested_requirements() -> tuple[Requirement, ...]:
    """The package's own runtime requirements (the bounds in ``pyproject.toml``), extras left out."""
    try:
        lines = requires(DISTRIBUTION) or []
    except PackageNotFoundError as error:
        raise UpstreamError(
            f"{DISTRIBUTION} is not installed (pip install .), so its tested ranges are unknown"
        ) from error
    return tuple(req for req in map(Requirement, lines) if req.marker is None or "extra" not in str(req.marker))


def tested_range(package: str) -> str:
    """The declared range of ``package`` (e.g. ``>=5.23,<5.25``), or ``any`` when it is not a dependency."""
    for req in tested_requirements():
        if req.name.lower().replace("_", "-") == package.lower().replace("_", "-"):
            return str(req.specifier) or "any"
    return "any"


def drift(package: str, contact: str, expected: str) -> UpstreamError:
    """The error for an internal that moved: the contact point, the version found, what was expected."""
    found = installed(package) or "not installed"
    return UpstreamError(
        f"lmms-lostattn: {contact} ({package} {found}) has moved: expected {expected}. Tested {package} "
        f"{tested_range(package)}; run `lostattn doctor` for the whole environment."
    )


def version_problems() -> list[str]:
    """One line per declared dependency whose installed version is missing or outside its declared range."""
    problems = []
    for req in tested_requirements():
        found = installed(req.name)
        if found is None:
            problems.append(f"{req.name} is not installed (need {req.specifier or 'any version'})")
        elif not req.specifier.contains(found, prereleases=True):
            problems.append(f"{req.name} {found} is installed; lmms-lostattn is tested with {req.name}{req.specifier}")
    return problems


@functools.cache
def require_tested_versions() -> None:
    """Refuse to start outside the tested ranges (before any model loads); ``LOSTATTN_ALLOW_UNTESTED=1`` turns the
    refusal into a warning."""
    problems = version_problems()
    if not problems:
        return
    fix = "pip install " + " ".join(f"'{req}'" for req in tested_requirements() if req.specifier)
    message = "; ".join(problems) + f". Install the tested versions ({fix}), or run `lostattn doctor`."
    if os.environ.get(ALLOW_UNTESTED) == "1":
        warnings.warn(f"lmms-lostattn: running outside the tested versions: {message}", stacklevel=2)
        return
    raise UpstreamError(f"lmms-lostattn: {message} ({ALLOW_UNTESTED}=1 runs anyway, untested.)")


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


# -- contact points --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContactPoint:
    """One upstream internal and a quick behavioural check of it (``check`` raises with what it found)."""

    name: str
    package: str
    check: Callable[[], None]

    def problem(self) -> str | None:
        """None when the check passes, else a line naming the contact point, the version and what went wrong."""
        try:
            self.check()
        except Exception as error:  # any failure of an upstream call is the finding
            found = installed(self.package) or "not installed"
            return f"{self.name} ({self.package} {found}): {type(error).__name__}: {error}"
        return None


def expect(condition: bool, what: str) -> None:
    """A contact point's check: ``what`` was found where ``condition`` was expected."""
    if not condition:
        raise AssertionError(what)


def _attention_interfaces() -> None:
    import lmms_lostattn.scope as scope

    functions = internal("transformers.modeling_utils", "ALL_ATTENTION_FUNCTIONS")
    masks = internal("transformers.masking_utils", "ALL_MASK_ATTENTION_FUNCTIONS")
    for name, (original, _, mask) in scope.KERNELS.items():
        expect(functions.get_interface(name, None) is not None, f"AttentionInterface does not return {name!r}")
        # create_causal_mask skips masks for keys missing from _global_mapping (the mask would arrive as None)
        expect(masks._global_mapping.get(name) is mask, f"AttentionMaskInterface has no mask function for {name!r}")
        expect(masks._global_mapping.get(original) is mask, f"{original!r} no longer uses {mask.__name__}")


def _random_qkv() -> tuple[Any, Any, Any]:
    """float64 query ``(2, 4, 5, 8)`` and key, value ``(2, 2, 5, 8)``: four query heads on two KV heads."""
    import torch

    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn((2, heads, 5, 8), generator=generator, dtype=torch.float64) for heads in (4, 2, 2))


def _repeat_kv() -> None:
    import torch

    repeat_kv = internal("transformers.integrations.sdpa_attention", "repeat_kv")
    _, key, _ = _random_qkv()
    expect(
        torch.equal(repeat_kv(key, 2), key.repeat_interleave(2, dim=1)), "repeat_kv(x, n) != x.repeat_interleave(n, 1)"
    )


def _sdpa_attention_forward() -> None:
    """Called as the model files call it, with no mask: causal attention, output ``(B, Q, H, D)``."""
    import torch
    from torch import nn

    sdpa_attention_forward = internal("transformers.integrations.sdpa_attention", "sdpa_attention_forward")
    query, key, value = _random_qkv()
    module = nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    out, _ = sdpa_attention_forward(module, query, key, value, None, dropout=0.0, scaling=0.5)
    key, value = key.repeat_interleave(2, dim=1), value.repeat_interleave(2, dim=1)
    scores = (query @ key.transpose(-1, -2)) * 0.5
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    expected = (scores.softmax(-1) @ value).transpose(1, 2)
    expect(
        out.shape == expected.shape, f"output shape {tuple(out.shape)}, expected (B, Q, H, D) {tuple(expected.shape)}"
    )
    expect(torch.allclose(out, expected, atol=1e-10), "output differs from causal softmax attention")


def _dynamic_cache() -> None:
    import torch

    cache = internal("transformers.cache_utils", "DynamicCache")()
    states = torch.zeros(1, 2, 3, 4)
    cache.update(states, states, 0)
    expect(cache.get_seq_length() == 3, f"get_seq_length() == {cache.get_seq_length()} after caching 3 positions")


def _text_sub_config() -> None:
    from lmms_lostattn.scope import text_config_key

    model = SimpleNamespace(config=internal("transformers", "LlavaConfig")())
    expect(text_config_key(model) == "text_config", f"text sub-config key {text_config_key(model)!r}")


def _tiny_causal_lm() -> Any:
    """A one-layer random-weight Llama of width 16 (no tokenizer), to see what ``generate`` passes its forward."""
    import torch

    config = internal("transformers", "LlamaConfig")(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return internal("transformers", "LlamaForCausalLM")(config).eval()


def _generate_calls() -> None:
    """``generate`` runs a prefill, then decoding steps whose forward gets the cache under a known name holding
    every earlier position."""
    import torch

    model = _tiny_causal_lm()
    calls: list[tuple[int, int | None]] = []

    def record(module: Any, args: tuple, kwargs: dict) -> None:
        cache = forward_cache(kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls.append((ids.shape[1], None if cache is None else cache.get_seq_length()))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    expect(calls[0][0] == 4 and not calls[0][1], f"first forward {calls[0]}, expected the 4-token prompt, no cache")
    expect(
        calls[1:] == [(1, 4), (1, 5)],
        f"decoding steps (input length, cached length) {calls[1:]}, expected [(1, 4), (1, 5)]",
    )


CONTACT_POINTS: tuple[ContactPoint, ...] = (
    ContactPoint(
        "transformers.AttentionInterface / AttentionMaskInterface registration", "transformers", _attention_interfaces
    ),
    ContactPoint(
        "transformers.integrations.sdpa_attention.sdpa_attention_forward", "transformers", _sdpa_attention_forward
    ),
    ContactPoint("transformers.integrations.sdpa_attention.repeat_kv", "transformers", _repeat_kv),
    ContactPoint("transformers.cache_utils.DynamicCache.get_seq_length", "transformers", _dynamic_cache),
    ContactPoint("PretrainedConfig.get_text_config / sub_configs", "transformers", _text_sub_config),
    ContactPoint("GenerationMixin.generate: prefill, then forwards with the KV cache", "transformers", _generate_calls),
)
