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
from lmms_lostattn.intervention.attention import rows_of, set_rows
from lmms_lostattn.intervention.prompt import PromptTracker
from lmms_lostattn.intervention.selection import Selector


def noise_delta_hook(
    layer: int,
    sigma: float,
    prompts: PromptTracker,
    selector: Selector,
    recording_errors: Callable[[], AbstractContextManager[None]],
) -> Callable[..., Any]:
    """Forward hook replacing the attention update of edited rows by Gaussian noise with the same per-token RMS; the
    noise is drawn for the rows the step's selection computes only (``attn_rows=last``: the last rows)."""

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        with recording_errors():
            state = prompts.state
            delta = output[0] if isinstance(output, tuple) else output
            device = delta.device  # the layer's, which may not be the prompt state's
            selection = selector.selection(delta.shape[1], state.length, device)
            if selection is None:  # no row of this step is edited
                return output
            block = delta[:, None]  # (B, 1, Q, D): the selection's rows along dim 2
            learned = block if selection.needed is None else rows_of(block, selection.needed)
            relative = (selection.query_abs - state.first_real.to(device)[:, None])[:, :, None]  # (B, Qs, 1)
            units = torch.arange(delta.shape[-1], device=device).view(1, 1, -1)
            noise = rng.normal(state.sample_key.to(device).view(-1, 1, 1), layer, relative, units, 4)[:, None]
            rms = learned.float().pow(2).mean(dim=-1, keepdim=True).sqrt()
            noise = noise * (sigma * rms / noise.pow(2).mean(dim=-1, keepdim=True).sqrt())
            rows = torch.where(selection.rows[:, None, :, None], noise.to(delta.dtype), learned)
            if selection.needed is None:
                replaced = rows
            else:
                replaced = block.clone()
                set_rows(replaced, selection.needed, rows)
            replaced = replaced[:, 0]
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
