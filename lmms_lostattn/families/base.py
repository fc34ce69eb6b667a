"""The declarative description of an architecture family: where things are, nothing that runs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn
from transformers import PretrainedConfig

from lmms_lostattn.compat import versions
from lmms_lostattn.config.spec import (
    PRIOR_MODES,
    FamilyPreset,
    Intervention,
    InterventionSpec,
    SpecError,
    StatsConfig,
)

_VISUAL_TOKEN_ATTRS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
LAYER_STYLES = ("pre_norm", "sandwich", "parallel")
#: The vision towers whose output is one token per patch of a fixed grid (the image priors' layout)
PATCH_TOWERS = ("clip_vision_model", "siglip_vision_model")
#: The fields that describe a decoder layer; a vision-language model takes them from its language model's family
DECODER_FIELDS = ("layer_style", "layers", "attention", "mlp", "qkv")


@dataclass(frozen=True)
class FamilyAdapter:
    """Where a decoder family keeps its decoder layers, attention, MLP and visual tokens.

    ``layer_style`` says how a decoder layer adds its updates to the residual stream: ``pre_norm``
    (Llama/Qwen: Y = X + attn(norm X) + mlp(norm H)), ``sandwich`` (Gemma, OLMo-2: post-module norms before each
    add, whose outputs are the updates) or ``parallel`` (GPT-NeoX/Pythia: Y = X + attn(norm X) + mlp(norm' X), both
    read X; the statistics take the two updates in the order of the sum: the attention update on X -> X + dA, the
    FFN update on X + dA -> Y). ``images``: whether the family's prompts hold image tokens (False for text LLMs,
    where every token is text). ``layers``: the decoder's attribute holding its layers; ``qkv``: the query, key and
    value projections, or one fused projection (``noise_qkv`` needs them separate).
    ``patch_prior_types``: the model types whose image tokens are one per vision patch (with a tower of
    :data:`PATCH_TOWERS`), in the patch grid's row-major order (the class token first where the config keeps it), so
    the image priors of
    :mod:`lmms_lostattn.intervention.priors` map onto them; ``vision_tower`` and ``vision_layers`` locate the tower
    and its encoder layers (CLIP/SigLIP-style attention).
    """

    family: str
    model_types: tuple[str, ...]
    layer_style: str = "pre_norm"
    images: bool = True
    layers: str = "layers"
    attention: str = "self_attn"
    mlp: str = "mlp"
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    paper_presets: Mapping[str, FamilyPreset] = field(default_factory=dict)
    patch_prior_types: tuple[str, ...] = ()
    vision_tower: str = "model.vision_tower"
    # the tower's encoder layers, by release: transformers 5.24's CLIP/SigLIP vision models hold them directly
    vision_layers: tuple[str, ...] = ("encoder.layers", "vision_model.encoder.layers")

    def __post_init__(self) -> None:
        if self.layer_style not in LAYER_STYLES:
            raise ValueError(f"lostattn: {self.family}: layer_style={self.layer_style!r}; accepted: {LAYER_STYLES}")

    def preset(self, config: PretrainedConfig) -> FamilyPreset:
        """The paper's defaults for this model type (the family's generic default when the paper had none)."""
        return self.paper_presets.get(config.model_type, FamilyPreset())

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The language decoder's layers, in order."""
        return getattr(model.get_decoder(), self.layers)

    def visual_token_ids(self, config: PretrainedConfig) -> tuple[int, ...]:
        """Token ids that stand for image or video patches in ``input_ids``."""
        if not self.images:
            return ()
        ids = {getattr(config, name) for name in _VISUAL_TOKEN_ATTRS if isinstance(getattr(config, name, None), int)}
        if not ids:
            raise ValueError(
                f"lostattn: {config.model_type} config names no image token id "
                f"(looked for {', '.join(_VISUAL_TOKEN_ATTRS)})"
            )
        return tuple(sorted(ids))

    def check_mode(self, config: PretrainedConfig, mode: str) -> None:
        """Refuse, before the weights load, a mode this family cannot run (the image priors need one token per
        vision patch)."""
        if mode in PRIOR_MODES and not self.images:
            raise SpecError(
                f"lostattn: attn={mode} lays a prior over the image on the image tokens, and {config.model_type} is "
                "a text model without them; use an attention-weight mode with attn_keys=text|all (e.g. attn=uniform)"
            )
        if mode not in PRIOR_MODES:
            return
        tower = getattr(getattr(config, "vision_config", None), "model_type", None)
        if config.model_type not in self.patch_prior_types or tower not in PATCH_TOWERS:
            supported = ", ".join(self.patch_prior_types) or "none in this family"
            raise SpecError(
                f"lostattn: attn={mode} maps a prior over the vision patches onto the image tokens, which needs one "
                f"token per patch (model types: {supported}, with a vision tower of type {' or '.join(PATCH_TOWERS)}); "
                f"{config.model_type} with a {tower} tower produces its image tokens otherwise (merged patches, tiles, "
                "pooling or native resolution with row breaks). Use attn=gaussian or another mode."
            )

    def resolve(self, config: PretrainedConfig, spec: InterventionSpec) -> Intervention:
        """``spec`` resolved for the config's language model, with this family's paper preset, and checked
        (:meth:`check_intervention`): what the model will run, known before the weights load."""
        text = config.get_text_config()
        intervention = spec.resolve(text.num_hidden_layers, text.num_attention_heads, self.preset(config))
        self.check_intervention(config, intervention, spec.stats)
        return intervention

    def check_intervention(self, config: PretrainedConfig, intervention: Intervention, stats: StatsConfig) -> None:
        """Refuse, before the weights load, what this family cannot run: :meth:`check_mode`, image tokens a text
        model does not have, ``noise_qkv`` on a fused q/k/v projection, and ``attn_scale=scores`` on soft-capped
        scores."""
        self.check_mode(config, intervention.mode)
        if not self.images:
            asked = intervention.image_args()
            asked += [f"stats_groups={','.join(stats.groups)}"] if "image" in stats.groups else []
            if asked:
                raise SpecError(
                    f"lostattn: {', '.join(asked)} ask for image tokens, and {config.model_type} is a text model "
                    "without them; use attn_keys=text|all, attn_rows=last|text|all and stats_groups=all|text "
                    "(every attention-weight mode but identity edits image keys unless attn_keys is given)"
                )
        softcap = getattr(config.get_text_config(), "attn_logit_softcapping", None)
        if intervention.edits_weights and intervention.scale == "scores" and softcap:
            raise SpecError(
                "lostattn: attn_scale=scores is defined on plain scaled q.k scores; "
                f"{config.model_type} soft-caps them (attn_logit_softcapping={softcap}). Use attn_scale=none."
            )
        if intervention.mode == "noise_qkv" and len(self.qkv) != 3:
            raise SpecError(
                "lostattn: attn=noise_qkv redraws the query, key and value projections separately; "
                f"{config.model_type} fuses them in one ({'/'.join(self.qkv)}). Use attn=noise_delta or an "
                "attention-weight mode."
            )

    def vision_modules(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The vision tower and its last encoder layer's attention module."""
        tower = model.get_submodule(self.vision_tower)
        for path in self.vision_layers:
            try:
                return tower, tower.get_submodule(path)[-1].self_attn
            except AttributeError:
                continue
        raise versions.drift(
            "transformers", f"{type(tower).__name__} encoder layers", f"them under one of {self.vision_layers}"
        )

    @staticmethod
    def drops_first_vision_token(config: PretrainedConfig) -> bool:
        """Whether the model drops the vision tower's first token before the language model (LLaVA's ``default``
        feature selection): CLIP's class token, or, from a tower without one (SigLIP), the first patch."""
        return getattr(config, "vision_feature_select_strategy", "default") == "default"

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attention)

    def update_modules(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The modules whose outputs are the attention and FFN updates actually added to the residual stream."""
        if self.layer_style == "sandwich":
            return layer.post_attention_layernorm, layer.post_feedforward_layernorm
        # pre_norm: each module's output is added in turn; parallel: both read X and are added together, and the
        # recorder takes them in the order of the sum (X -> X + dA -> X + dA + dF = Y), so the same outputs serve
        return self.attention_module(layer), getattr(layer, self.mlp)
