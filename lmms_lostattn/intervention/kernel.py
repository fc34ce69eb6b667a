"""The ``lostattn`` attention functions and how a model's language decoder is routed through them.

transformers looks attention functions up by name (``config._attn_implementation``) in its ``AttentionInterface``.
:func:`register_kernels` registers ``lostattn`` (standing in for sdpa) and ``lostattn_eager`` (for eager) when a
scope opens; :func:`route_attention` points the language decoder (only; the vision tower keeps its own) at the one
that stands in for its implementation, and back on exit. The functions pass every call through to the original
kernel unless the attention module carries an edit (:func:`editing`, set and removed by the scope), so layers that
are not edited run exactly as before.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lmms_lostattn.compat.internals import internal
from lmms_lostattn.compat.versions import drift
from lmms_lostattn.intervention.prompt import InterventionError

AttentionInterface = internal("transformers", "AttentionInterface")
AttentionMaskInterface = internal("transformers.masking_utils", "AttentionMaskInterface")
sdpa_mask = internal("transformers.masking_utils", "sdpa_mask")
eager_mask = internal("transformers.masking_utils", "eager_mask")
sdpa_attention_forward = internal("transformers.integrations.sdpa_attention", "sdpa_attention_forward")

EDIT_ATTRIBUTE = "lostattn_edit"  # on an edited attention module while a scope is open: its edited path


def eager_passthrough(module: nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model file's own eager attention (what transformers runs for ``attn_implementation="eager"``)."""
    return sys.modules[type(module).__module__].eager_attention_forward(module, *args, **kwargs)


# Attention implementations we can stand in for: our key -> (original key, pass-through kernel, mask function).
KERNELS: dict[str, tuple[str, Callable[..., Any], Callable[..., Any]]] = {
    "lostattn": ("sdpa", sdpa_attention_forward, sdpa_mask),
    "lostattn_eager": ("eager", eager_passthrough, eager_mask),
}


ROUTABLE = tuple(original for original, _, _ in KERNELS.values())  # the implementations an edit can run on


def _make_attention(passthrough: Callable[..., Any]) -> Callable[..., Any]:
    def lostattn_attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        edit = getattr(module, EDIT_ATTRIBUTE, None)
        if edit is None:
            return passthrough(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        return edit(passthrough, module, query, key, value, attention_mask, dropout, scaling, kwargs)

    return lostattn_attention


_FUNCTIONS = {name: _make_attention(kernel) for name, (_, kernel, _) in KERNELS.items()}


def register_kernels() -> None:
    """Register the ``lostattn`` functions and their mask functions with transformers (idempotent). They stay
    registered after a scope closes, where nothing routes a model to them."""
    for name, (_, _, mask) in KERNELS.items():
        AttentionInterface.register(name, _FUNCTIONS[name])
        AttentionMaskInterface.register(name, mask)


def _of_layer(edit: Callable[..., Any], layer: int) -> Callable[..., Any]:
    """``edit`` with the decoder layer index put after the kernel and the module, as the attention function calls it."""

    def edited(passthrough: Callable[..., Any], module: nn.Module, *call: Any) -> Any:
        return edit(passthrough, module, layer, *call)

    return edited


@contextmanager
def editing(modules: Mapping[int, nn.Module], edit: Callable[..., Any]) -> Iterator[None]:
    """Give each attention module (by decoder layer index) its edited path for the block, as
    ``edit(passthrough, module, layer, query, key, value, mask, dropout, scaling, kwargs)``; removed on exit."""
    try:
        for layer, module in modules.items():
            setattr(module, EDIT_ATTRIBUTE, _of_layer(edit, layer))
        yield
    finally:
        for module in modules.values():
            if hasattr(module, EDIT_ATTRIBUTE):
                delattr(module, EDIT_ATTRIBUTE)


def text_config_key(model: nn.Module) -> str:
    """The sub-config name of the language decoder (``text_config`` for every family seen so far)."""
    config = model.config
    text = config.get_text_config()
    return next((name for name in config.sub_configs if getattr(config, name, None) is text), "")


@contextmanager
def route_attention(model: nn.Module) -> Iterator[None]:
    """Route the language decoder (only) through ``lostattn``; restore the original implementation on exit."""
    register_kernels()
    text_key = text_config_key(model)
    original = model.config.get_text_config()._attn_implementation or "sdpa"
    ours = next((name for name, (orig, _, _) in KERNELS.items() if orig == original), None)
    if ours is None:
        raise InterventionError(
            f"lostattn: attention interventions need the language model on one of {', '.join(ROUTABLE)}; "
            f"it uses attn_implementation={original!r} (give attn_implementation=sdpa)"
        )
    model.set_attn_implementation({text_key: ours})
    routed = model.config.get_text_config()._attn_implementation
    if routed != ours:
        model.set_attn_implementation({text_key: original})
        raise drift(
            "transformers",
            "PreTrainedModel.set_attn_implementation",
            f"set_attn_implementation({{{text_key!r}: {ours!r}}}) to route the language model, it uses {routed!r}",
        )
    try:
        yield
    finally:
        model.set_attn_implementation({text_key: original})
