"""Phi-3 (``phi3``): pre-norm layers with one fused ``qkv_proj`` (so ``noise_qkv`` is refused), no image tokens."""

from __future__ import annotations

from lmms_lostattn.families.base import FamilyAdapter

PHI3 = FamilyAdapter(family="phi3", model_types=("phi3",), qkv=("qkv_proj",), images=False)
