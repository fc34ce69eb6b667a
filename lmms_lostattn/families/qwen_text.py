"""Qwen2 / Qwen3 text LLMs (the decoders Qwen2-VL / Qwen2.5-VL / Qwen3-VL are built on): pre-norm layers (Qwen3 adds
q/k norms inside attention), separate q/k/v projections, no image tokens."""

from __future__ import annotations

from lmms_lostattn.families.base import FamilyAdapter

QWEN_TEXT = FamilyAdapter(family="qwen-text", model_types=("qwen2", "qwen3"), images=False)
