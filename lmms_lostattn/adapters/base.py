"""The declarative description of an architecture family: where things are, nothing that runs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn
from transformers import PretrainedConfig

from lmms_lostattn.spec import FamilyPreset

_VISUAL_TOKEN_ATTRS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


@dataclass(frozen=True)
class FamilyAdapter:
    """Where an LVLM family keeps its decoder layers, attention, MLP and visual tokens.

    ``layer_style`` says how a decoder layer adds its updates to the residual stream: ``pre_norm``
    (Llama/Qwen: Y = X + attn(norm X) + mlp(norm H)) or ``sandwich`` (Gemma: post-module norms before each add).
    """

    family: str
    model_types: tuple[str, ...]
    layer_style: str = "pre_norm"
    attention: str = "self_attn"
    mlp: str = "mlp"
    qkv: tuple[str, str, str] = ("q_proj", "k_proj", "v_proj")
    paper_presets: Mapping[str, FamilyPreset] = field(default_factory=dict)

    def preset(self, config: PretrainedConfig) -> FamilyPreset:
        """The paper's defaults for this model type (the family's generic default when the paper had none)."""
        return self.paper_presets.get(config.model_type, FamilyPreset())

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The language decoder's layers, in order."""
        return model.get_decoder().layers

    def visual_token_ids(self, config: PretrainedConfig) -> tuple[int, ...]:
        """Token ids that stand for image or video patches in ``input_ids``."""
        ids = {getattr(config, name) for name in _VISUAL_TOKEN_ATTRS if isinstance(getattr(config, name, None), int)}
        if not ids:
            raise ValueError(
                f"lostattn: {config.model_type} config names no image token id "
                f"(looked for {', '.join(_VISUAL_TOKEN_ATTRS)})"
            )
        return tuple(sorted(ids))

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attention)

    def update_modules(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The modules whose outputs are the attention and FFN updates actually added to the residual stream."""
        if self.layer_style == "sandwich":
            return layer.post_attention_layernorm, layer.post_feedforward_layernorm
        return self.attention_module(layer), getattr(layer, self.mlp)
