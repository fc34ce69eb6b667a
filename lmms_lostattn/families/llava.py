"""LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision (``llava-hf`` checkpoints, lmms-eval's ``llava_hf``).

The released SAP code rescales p to the scores in its Llama decoder file (LLaVA-1.5/NeXT) and its Qwen2 decoder file
(OneVision), which also scores heads by the mean of the two text sides around the image.
"""

from __future__ import annotations

from lmms_lostattn.config.spec import FamilyPreset
from lmms_lostattn.families.base import FamilyAdapter

_LLAVA = FamilyPreset(layers="18-23", heads="p0.3-0.6", scale="scores")

LLAVA = FamilyAdapter(
    family="llava",
    model_types=("llava", "llava_next", "llava_onevision"),
    paper_presets={
        "llava": _LLAVA,
        "llava_next": _LLAVA,
        "llava_onevision": FamilyPreset(layers="21-27", heads="p0.3-0.6", scale="scores", head_score="sides"),
    },
    patch_prior_types=("llava",),  # NeXT tiles the image and adds newline tokens; OneVision pools
)
