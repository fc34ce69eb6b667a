"""Residual-stream recording: what each decoder layer's attention and FFN add to the stream, on prefill only.

For layer l the recorder hands ``on_layer(l, x, d_attn, d_ffn)`` to a callback, where ``x`` is the stream entering
the layer (recorded there, never derived from the previous layer, since e.g. Qwen3-VL's DeepStack adds visual
features between layers; on the layer's device), ``d_attn`` the attention update and ``d_ffn`` the FFN update as the
family's adapter defines them (post-module norms included for sandwich-norm families). The stream entering the FFN is
``x + d_attn``. Tensors are passed on as soon as the FFN has run and are not kept, so at most one layer's
activations are alive at a time beyond what the forward pass holds anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from lmms_lostattn.compat import internals
from lmms_lostattn.families.base import FamilyAdapter

LayerCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def _tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def record_residuals(
    layers: nn.ModuleList, adapter: FamilyAdapter, on_layer: LayerCallback, active: Callable[[], bool]
) -> Iterator[None]:
    """Call ``on_layer`` for every decoder layer of each forward pass where ``active()`` is true (prefill)."""
    with ExitStack() as stack:
        for index, layer in enumerate(layers):
            seen: dict[str, torch.Tensor] = {}
            attn_update, ffn_update = adapter.update_modules(layer)

            def before_layer(module: nn.Module, args: tuple, kwargs: dict, seen: dict = seen) -> None:
                if active():
                    seen["x"] = internals.forward_input(module, args, kwargs, "hidden_states")

            def after_attention(module: nn.Module, args: tuple, output: Any, seen: dict = seen) -> None:
                if active():
                    seen["attn"] = _tensor(output)

            def after_ffn(module: nn.Module, args: tuple, output: Any, seen: dict = seen, index: int = index) -> None:
                if active():
                    update = seen.pop("attn")
                    # accelerate (device_map=auto) moves a layer's input to the layer's device inside its forward,
                    # after the pre-hook: on a layer that starts a new device the recorded input is still elsewhere
                    on_layer(index, seen.pop("x").to(update.device), update, _tensor(output))

            stack.callback(layer.register_forward_pre_hook(before_layer, with_kwargs=True).remove)
            stack.callback(attn_update.register_forward_hook(after_attention).remove)
            stack.callback(ffn_update.register_forward_hook(after_ffn).remove)
        yield
