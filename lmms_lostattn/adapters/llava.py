"""LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision (``llava-hf`` checkpoints, lmms-eval's ``llava_hf``)."""

from __future__ import annotations

from lmms_lostattn.adapters.base import FamilyAdapter
from lmms_lostattn.spec import FamilyPreset

LLAVA = FamilyAdapter(
    family="llava",
    model_types=("llava", "llava_next", "llava_onevision"),
    paper_presets={
        "llava": FamilyPreset(layers="18-23", heads="p0.3-0.6"),
        "llava_next": FamilyPreset(layers="18-23", heads="p0.3-0.6"),
        "llava_onevision": FamilyPreset(layers="21-27", heads="p0.3-0.6"),
    },
)
