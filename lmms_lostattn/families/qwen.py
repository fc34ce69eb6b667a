"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (lmms-eval's ``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``).

Pre-norm decoder layers; image and video patches are ``<|image_pad|>`` / ``<|video_pad|>`` tokens (both visual).
Qwen3-VL's DeepStack adds visual features between the first layers, which the recorder handles by recording X at
every layer. The released SAP code's Qwen2.5-VL file blends p unscaled (the preset's defaults).
"""

from __future__ import annotations

from lmms_lostattn.config.spec import FamilyPreset
from lmms_lostattn.families.base import FamilyAdapter

_PAPER = FamilyPreset(layers="1:", heads="p0.3-0.9")

QWEN = FamilyAdapter(
    family="qwen",
    model_types=("qwen2_vl", "qwen2_5_vl", "qwen3_vl"),
    paper_presets=dict.fromkeys(("qwen2_vl", "qwen2_5_vl", "qwen3_vl"), _PAPER),
)
