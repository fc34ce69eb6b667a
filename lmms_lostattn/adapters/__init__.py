"""Architecture adapters: one small declarative file per family, looked up by ``config.model_type``."""

from __future__ import annotations

from transformers import PretrainedConfig

from lmms_lostattn.adapters.base import FamilyAdapter
from lmms_lostattn.adapters.llava import LLAVA

ADAPTERS: tuple[FamilyAdapter, ...] = (LLAVA,)


def adapter_for(config: PretrainedConfig) -> FamilyAdapter:
    """The adapter for a model config, or a clear error listing what is supported and how to add a family."""
    for adapter in ADAPTERS:
        if config.model_type in adapter.model_types:
            return adapter
    supported = ", ".join(f"{a.family} ({'/'.join(a.model_types)})" for a in ADAPTERS)
    raise ValueError(
        f"lostattn: model_type {config.model_type!r} has no adapter. Supported: {supported}. "
        "To add a family, write an adapter in lmms_lostattn/adapters/ (see llava.py) and list it in "
        "ADAPTERS."
    )


__all__ = ["ADAPTERS", "FamilyAdapter", "adapter_for"]
