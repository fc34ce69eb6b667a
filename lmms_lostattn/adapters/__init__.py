"""Architecture adapters: one small declarative file per family, looked up by ``config.model_type``."""

from __future__ import annotations

from transformers import PretrainedConfig

from lmms_lostattn.adapters.base import FamilyAdapter
from lmms_lostattn.adapters.gemma3 import GEMMA3
from lmms_lostattn.adapters.idefics import IDEFICS
from lmms_lostattn.adapters.internvl import INTERNVL
from lmms_lostattn.adapters.llava import LLAVA
from lmms_lostattn.adapters.mistral3 import MISTRAL3
from lmms_lostattn.adapters.qwen import QWEN

ADAPTERS: tuple[FamilyAdapter, ...] = (LLAVA, QWEN, GEMMA3, INTERNVL, IDEFICS, MISTRAL3)

# Families whose decoder layers do not fit the pre-norm or sandwich-norm pattern, and why.
UNFIT: dict[str, str] = {
    "mllama": "its gated cross-attention layers attend to vision states, not to image tokens of the sequence",
    "aya_vision": "its parallel attention+MLP blocks have no stream between attention and FFN",
    "cohere2_vision": "its parallel attention+MLP blocks have no stream between attention and FFN",
}


def adapter_for(config: PretrainedConfig) -> FamilyAdapter:
    """The adapter for a model config, or a clear error listing what is supported and how to add a family."""
    for adapter in ADAPTERS:
        if config.model_type in adapter.model_types:
            return adapter
    supported = ", ".join(f"{a.family} ({'/'.join(a.model_types)})" for a in ADAPTERS)
    why = f" ({UNFIT[config.model_type]})" if config.model_type in UNFIT else ""
    raise ValueError(
        f"lostattn: model_type {config.model_type!r} is not supported{why}. Supported: {supported}. "
        "To add a family, write an adapter in lmms_lostattn/adapters/ (see qwen.py), list it in ADAPTERS, and "
        "subclass lmms-eval's wrapper in model_wrappers/ (README: 'Adding a family')."
    )


__all__ = ["ADAPTERS", "UNFIT", "FamilyAdapter", "adapter_for"]
