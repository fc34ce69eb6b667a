"""The two noise modes of the paper's Table 1: ``noise_delta`` replaces the attention update of the edited rows by
Gaussian noise of the same per-token RMS (a forward hook on the module whose output the layer adds to the residual
stream: the attention module, or a sandwich-norm layer's post-attention norm); ``noise_qkv`` redraws the q/k/v
projection weights as N(mean(W), (sigma*std(W))^2), restored bit for bit on exit."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

from lmms_lostattn.config.spec import Intervention
from lmms_lostattn.families.base import FamilyAdapter
from lmms_lostattn.intervention import rng
from lmms_lostattn.intervention.prompt import PromptTracker
from lmms_lostattn.intervention.selection import Selector


def noise_delta_hook(
    layer: int,
    sigma: float,
    prompts: PromptTracker,
    selector: Selector,
    recording_errors: Callable[[], AbstractContextManager[None]],
) -> Callable[..., Any]:
    """Forward hook replacing the attention update of edited rows by Gaussian noise with the same per-token RMS."""

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        with recording_errors():
            state = prompts.state
            delta = output[0] if isinstance(output, tuple) else output
            device = delta.device  # the layer's, which may not be the prompt state's
            positions = state.positions(delta.shape[1])
            rows = selector.edited_rows(positions).to(device)
            relative = (positions[None, :] - state.first_real[:, None]).to(device)[:, :, None]
            units = torch.arange(delta.shape[-1], device=device).view(1, 1, -1)
            noise = rng.normal(state.sample_key.to(device).view(-1, 1, 1), layer, relative, units, 4)
            rms = delta.float().pow(2).mean(dim=-1, keepdim=True).sqrt()
            noise = noise * (sigma * rms / noise.pow(2).mean(dim=-1, keepdim=True).sqrt())
            replaced = torch.where(rows[:, :, None], noise.to(delta.dtype), delta)
            return (replaced, *output[1:]) if isinstance(output, tuple) else replaced

    return hook


@contextmanager
def noise_qkv(layers: Sequence[nn.Module], adapter: FamilyAdapter, intervention: Intervention) -> Iterator[None]:
    """Replace q/k/v projection weights of the edited layers by N(mean(W), (sigma*std(W))^2); restore on exit."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for index in intervention.layers:
            attention = adapter.attention_module(layers[index])
            for name in adapter.qkv:
                weight = getattr(attention, name).weight
                saved.append((weight, weight.detach().to("cpu", copy=True)))
                generator = torch.Generator().manual_seed(rng.stable_key(intervention.seed, "noise_qkv", index, name))
                mean, std = weight.float().mean(), weight.float().std()
                draw = torch.randn(weight.shape, generator=generator) * (intervention.sigma * std.cpu()) + mean.cpu()
                with torch.no_grad():
                    weight.copy_(draw.to(weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)
