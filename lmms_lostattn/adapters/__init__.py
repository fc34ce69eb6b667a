"""Architecture adapters: one small declarative file per family, looked up by ``config.model_type``."""

from __future__ import annotations

from transformers import PretrainedConfig

from lmms_lostattn.adapters.base import FamilyAdapter
from lmms_lostattn.adapters.gemma3 import GEMMA3
from lmms_lostattn.adapters.gemma_text import GEMMA_TEXT
from lmms_lostattn.adapters.gpt2 import GPT2
from lmms_lostattn.adapters.gpt_neox import GPT_NEOX
from lmms_lostattn.adapters.idefics import IDEFICS
from lmms_lostattn.adapters.internvl import INTERNVL
from lmms_lostattn.adapters.llama import LLAMA, MISTRAL
from lmms_lostattn.adapters.llava import LLAVA
from lmms_lostattn.adapters.mistral3 import MISTRAL3
from lmms_lostattn.adapters.olmo2 import OLMO2
from lmms_lostattn.adapters.phi3 import PHI3
from lmms_lostattn.adapters.qwen import QWEN
from lmms_lostattn.adapters.qwen_text import QWEN_TEXT

VISION_LANGUAGE: tuple[FamilyAdapter, ...] = (LLAVA, QWEN, GEMMA3, INTERNVL, IDEFICS, MISTRAL3)
TEXT: tuple[FamilyAdapter, ...] = (LLAMA, MISTRAL, QWEN_TEXT, GEMMA_TEXT, PHI3, OLMO2, GPT2, GPT_NEOX)
ADAPTERS: tuple[FamilyAdapter, ...] = VISION_LANGUAGE + TEXT

# Families whose decoder layers the adapters do not map yet, and why.
UNFIT: dict[str, str] = {
    "mllama": "its gated cross-attention layers attend to vision states, not to image tokens of the sequence",
    "aya_vision": "its Cohere decoder's parallel attention+MLP blocks are not mapped yet (see gpt_neox.py for how)",
    "cohere2_vision": "its Cohere decoder's parallel attention+MLP blocks are not mapped yet (see gpt_neox.py for how)",
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
        "subclass the host's wrapper in model_wrappers/<host>/ (README: 'Adding a family')."
    )


__all__ = ["ADAPTERS", "TEXT", "UNFIT", "VISION_LANGUAGE", "FamilyAdapter", "adapter_for"]
