"""The image priors (``attn=vision_attention|complexity``) on a live model: computed from the vision tower's pass
over each image (:mod:`lmms_lostattn.intervention.priors` has the formulas) and laid on the prompt's image tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from lmms_lostattn.compat.internals import forward_input
from lmms_lostattn.families.base import FamilyAdapter
from lmms_lostattn.intervention import priors
from lmms_lostattn.intervention.prompt import InterventionError, PromptState, PromptTracker


def prior_hook(
    prompts: PromptTracker,
    model: nn.Module,
    adapter: FamilyAdapter,
    mode: str,
    image_mean_std: tuple[Sequence[float], Sequence[float]] | None,
    recording_errors: Callable[[], AbstractContextManager[None]],
) -> torch.utils.hooks.RemovableHandle:
    """A hook on the vision tower that computes each image's prior when the tower runs (before the prefill or in
    it) and hands it to the tracker's next prompt, over the patches the model keeps; the tower's own kernel and
    outputs stay as they are."""
    tower, last_attention = adapter.vision_modules(model)
    drops_first = adapter.drops_first_vision_token(model.config)

    if mode == "vision_attention":
        patches = (tower.config.image_size // tower.config.patch_size) ** 2

        def attention_prior(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            with recording_errors():
                hidden = forward_input(module, args, kwargs, "hidden_states")
                tokens = hidden.shape[1]
                if tokens not in (patches, patches + 1):
                    raise InterventionError(
                        f"lostattn: attn={mode}: {type(tower).__name__} ran over {tokens} tokens for {patches} "
                        f"patches; the prior needs {patches}, or {patches + 1} with a class token first"
                    )
                first = 1 if tokens == patches + 1 or drops_first else 0
                weights = priors.eager_attention_weights(module, hidden)
                prompts.pending_priors.append(priors.vision_attention_prior(weights, first))

        return last_attention.register_forward_pre_hook(attention_prior, with_kwargs=True)
    if image_mean_std is None:
        raise InterventionError(
            "lostattn: attn=complexity needs the image processor's image_mean and image_std to see the image the "
            "model sees (intervene(..., image_mean_std=(mean, std)))"
        )
    mean, std = (torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1) for values in image_mean_std)
    patch = tower.config.patch_size

    def complexity_prior(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        with recording_errors():
            pixels = forward_input(module, args, kwargs, "pixel_values").float()
            images = pixels * std.to(pixels.device) + mean.to(pixels.device)
            grid = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)
            tokens = output[0].shape[1]  # the tower's last hidden state: a class token first, or the patches alone
            first = 1 if drops_first and tokens == grid[0] * grid[1] else 0  # a first patch the model never sees
            prompts.pending_priors.append(priors.complexity_prior(images, grid, first))

    return tower.register_forward_hook(complexity_prior, with_kwargs=True)


def prior_at(state: PromptState, keys: range, device: torch.device, mode: str) -> torch.Tensor:
    """``(B, K)`` image-prior values at a block's key positions (0 off the image patches)."""
    if state.prior is None:
        state.prior = _lay_priors(state, mode)
    prior = torch.nn.functional.pad(state.prior, (0, max(keys.stop - state.prior.shape[1], 0)))
    return prior[:, keys.start : keys.stop].to(device)


def _lay_priors(state: PromptState, mode: str) -> torch.Tensor:
    """The prompt's per-image priors laid on its image tokens: image i of the batch (row-major, as the model
    scatters image features) covers the i-th run of tokens; a leading class token gets no prior mass."""
    if not state.prior_parts:
        raise InterventionError(
            f"lostattn: attn={mode} needs the vision tower's pass over this prompt's images, and none ran "
            "(image features given precomputed, or no pixel values)"
        )
    laid_priors = torch.cat(state.prior_parts).to(state.is_visual.device)
    visual = state.is_visual[:, : state.prompt_len]
    positions = visual.flatten().nonzero().flatten()
    images, patches = laid_priors.shape
    per_image = positions.numel() // images
    if per_image * images != positions.numel() or per_image not in (patches, patches + 1):
        raise InterventionError(
            f"lostattn: attn={mode}: the prompt has {positions.numel()} image tokens for {images} image(s) of "
            f"{patches} vision patches; it needs {patches} tokens per image ({patches + 1} with the class token)"
        )
    if per_image == patches + 1:
        laid_priors = torch.cat([laid_priors.new_zeros(images, 1), laid_priors], dim=1)
    laid = torch.zeros(visual.numel(), device=laid_priors.device)
    laid[positions] = laid_priors.flatten().float()
    return laid.view(visual.shape)
