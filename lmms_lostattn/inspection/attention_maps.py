"""The last prompt token's attention over the image patches, per decoder layer, learned and as the model ran it.

One float32 eager forward pass with ``output_attentions`` gives the learned weights; under an intervention a second
pass inside :func:`~lmms_lostattn.intervention.scope.intervene` gives the weights the model ran with (the eager kernel
returns the edited weights for edited rows). Only families whose image tokens are one per vision patch in row-major
order (``FamilyAdapter.patch_prior_types``; a leading class token is kept apart) can be laid back on the image.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, PretrainedConfig

from lmms_lostattn.config.spec import Intervention, InterventionSpec, SpecError
from lmms_lostattn.config.values import parse_layers
from lmms_lostattn.families import FamilyAdapter, UnsupportedFamilyError, adapter_for, adapters
from lmms_lostattn.intervention.attention import EditedAttention
from lmms_lostattn.intervention.scope import Scope, intervene


@dataclass(frozen=True)
class LayerMap:
    """One decoder layer's attention of the last prompt token over the image, ``(grid_h, grid_w)`` per patch.

    ``learned``/``edited``: mean over heads (``edited`` is ``None`` without an intervention); ``band_*``: mean over
    the heads the intervention edited on the last prompt token in this layer (``band_heads``), ``None`` when it edits
    every head or none here. ``class_token``: mean-over-heads mass on the class token (learned, edited), 0 without
    one; a map's sum plus its class-token mass is the attention mass on the image tokens.
    """

    layer: int
    learned: np.ndarray
    edited: np.ndarray | None = None
    band_heads: tuple[int, ...] = ()
    band_learned: np.ndarray | None = None
    band_edited: np.ndarray | None = None
    class_token: tuple[float, float | None] = (0.0, None)


@dataclass
class Inspector:
    """A loaded model ready for :meth:`maps`: its processor, family adapter and resolved intervention."""

    model: nn.Module
    processor: Any
    adapter: FamilyAdapter
    intervention: Intervention
    layers: tuple[int, ...]  # the decoder layers to show

    def seen_image(self, image: Image.Image) -> Image.Image:
        """``image`` as the model sees it, the patch grid's image: the processor's resize and crop, its normalisation
        undone (a wide photo loses its sides to the crop; the maps lie on what is left)."""
        processor = self.processor.image_processor
        pixels = processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"][0].float()
        if getattr(processor, "do_normalize", False):
            mean, std = (torch.tensor(values).view(-1, 1, 1) for values in (processor.image_mean, processor.image_std))
            pixels = pixels * std + mean
        scale = processor.rescale_factor if getattr(processor, "do_rescale", False) else 1.0  # pixels = value * scale
        return Image.fromarray((pixels / scale).clamp(0, 255).round().byte().permute(1, 2, 0).numpy())

    def inputs(self, image: Image.Image, question: str) -> dict[str, torch.Tensor]:
        """The processor's tensors for one image followed by ``question``, through the chat template."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return self.processor(images=[image.convert("RGB")], text=[prompt], return_tensors="pt")

    def maps(self, image: Image.Image, question: str, layers: Sequence[int]) -> list[LayerMap]:
        """Per layer of ``layers``, the learned and (under an intervention) edited maps of the last prompt token."""
        inputs = self.inputs(image, question)
        ids = set(self.adapter.visual_token_ids(self.model.config))
        visual = torch.tensor([int(token) in ids for token in inputs["input_ids"][0]]).nonzero().flatten()
        grid = patch_grid(self.model.config)
        patches = grid[0] * grid[1]
        drops_first = self.adapter.drops_first_vision_token(self.model.config)  # SigLIP's first patch: shown at 0
        if visual.numel() not in (patches - drops_first, patches, patches + 1):
            raise SpecError(
                f"lostattn show: the prompt holds {visual.numel()} image tokens for a {grid[0]}x{grid[1]} patch grid "
                f"(expected {patches}, or one more with the class token); give one image per prompt"
            )
        learned = last_row_attention(self.model, inputs)
        edited, band = None, {}
        if self.intervention.mode != "none":
            images = self.processor.image_processor
            mean_std = (images.image_mean, images.image_std)  # what attn=complexity undoes to see the image
            with (
                intervene(self.model, self.intervention, self.adapter, image_mean_std=mean_std) as scope,
                _recording_heads(scope) as band,
            ):
                edited = last_row_attention(self.model, inputs)
                scope.raise_pending()
        out = []
        for layer in layers:
            heads = band.get(layer, ())
            banded = 0 < len(heads) < learned[layer].shape[0]
            learned_map, learned_cls = image_map(learned[layer], visual, grid)
            edited_map, edited_cls = image_map(edited[layer], visual, grid) if edited is not None else (None, None)
            out.append(
                LayerMap(
                    layer=layer,
                    learned=learned_map,
                    edited=edited_map,
                    band_heads=heads if banded else (),
                    band_learned=image_map(learned[layer][list(heads)], visual, grid)[0] if banded else None,
                    band_edited=image_map(edited[layer][list(heads)], visual, grid)[0] if banded else None,
                    class_token=(learned_cls, edited_cls),
                )
            )
        return out


def patch_grid(config: PretrainedConfig) -> tuple[int, int]:
    """The vision tower's ``(rows, columns)`` of patches."""
    vision = config.vision_config
    size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    side = size // vision.patch_size
    return side, side


def check_one_token_per_patch(config: PretrainedConfig) -> FamilyAdapter:
    """The checkpoint's adapter, or a :class:`SpecError` when its image tokens are not one per vision patch."""
    adapter = adapter_for(config)
    if config.model_type not in adapter.patch_prior_types:
        supported = ", ".join(f"{t} ({a.family})" for a in adapters() for t in a.patch_prior_types)
        raise SpecError(
            f"lostattn show: {config.model_type} (family {adapter.family}) does not make one image token per vision "
            f"patch in row-major order (merged patches, tiles or pooling), so its attention cannot be laid back on "
            f"the image; supported model types: {supported}"
        )
    return adapter


def load(pretrained: str | Path, model_args: Mapping[str, object], layers: object = "all") -> Inspector:
    """Resolve ``model_args`` (the plugin's ``attn*`` arguments) and ``layers`` (``attn_layers`` syntax, the layers
    to show) and refuse what cannot be shown, before the weights load; then the model (float32, eager attention) and
    its processor."""
    try:
        config = AutoConfig.from_pretrained(pretrained)
    except ValueError as error:  # transformers knows no such model type
        raise UnsupportedFamilyError(f"lostattn show: {pretrained}: {str(error).splitlines()[0]}") from None
    adapter = check_one_token_per_patch(config)
    intervention = adapter.resolve(config, InterventionSpec.from_model_args(model_args))
    shown = parse_layers(layers, config.get_text_config().num_hidden_layers, arg="--layers")
    model = AutoModelForImageTextToText.from_pretrained(pretrained, dtype=torch.float32, attn_implementation="eager")
    return Inspector(model.eval(), AutoProcessor.from_pretrained(pretrained), adapter, intervention, shown)


def last_row_attention(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per decoder layer, the ``(H, K)`` eager attention weights of the last prompt token (first sample)."""
    with torch.no_grad():
        output = model(**inputs, output_attentions=True, use_cache=False)
    return [weights[0, :, -1].float() for weights in output.attentions]


def image_map(row: torch.Tensor, visual: torch.Tensor, grid: tuple[int, int]) -> tuple[np.ndarray, float]:
    """``(H, K)`` weights -> the mean over heads on the image patches as a ``(rows, columns)`` grid, and the mean
    mass on a leading class token (0 without one); a first patch the model dropped (one token short) holds 0."""
    on_image = row[:, visual].mean(dim=0)
    cls = 0.0
    if on_image.numel() == grid[0] * grid[1] + 1:
        cls, on_image = float(on_image[0]), on_image[1:]
    elif on_image.numel() == grid[0] * grid[1] - 1:
        on_image = torch.cat([on_image.new_zeros(1), on_image])
    return on_image.reshape(grid).numpy(), cls


class _HeadRecorder(EditedAttention):
    """The scope's edited path, unchanged, that also notes per edited layer which heads it edited on the last row."""

    def __init__(self, base: EditedAttention, band: dict[int, tuple[int, ...]]) -> None:
        super().__init__(base.intervention, base.prompts, base.selector)
        self.band = band
        self.layer = -1

    def attend(self, passthrough: Any, module: nn.Module, layer: int, *call: Any) -> Any:
        self.layer = layer
        return super().attend(passthrough, module, layer, *call)

    def _edited_heads(
        self, scores: torch.Tensor, allowed: torch.Tensor, selection: Any, step: dict[str, Any]
    ) -> torch.Tensor | None:
        heads = super()._edited_heads(scores, allowed, selection, step)
        # the last prompt token is the last key of a forward without cache; it may not be among the computed rows
        # (attn_rows=image computes the image rows only), and then no head is edited on it
        (found,) = (selection.query_abs[0] == selection.key_abs[-1]).nonzero(as_tuple=True)
        edited = torch.zeros(scores.shape[1], dtype=torch.bool)
        if found.numel():
            row = int(found[0])
            edited = step["entries"][0, :, row].any(dim=-1).expand(scores.shape[1])  # the row has an edited key
            if heads is not None:  # (B, H, Qs|1, 1): per row for head bands, one for every row for listed heads
                edited = edited & heads[0, :, min(row, heads.shape[2] - 1), 0]
        self.band[self.layer] = tuple(int(h) for h in edited.nonzero().flatten())
        return heads


@contextmanager
def _recording_heads(scope: Scope) -> Iterator[dict[int, tuple[int, ...]]]:
    """While open, ``scope``'s edited path records the edited heads of each layer into the yielded dict."""
    band: dict[int, tuple[int, ...]] = {}
    base = scope.attention
    scope.attention = _HeadRecorder(base, band)
    try:
        yield band
    finally:
        scope.attention = base
