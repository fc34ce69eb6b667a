"""Llama-style text decoders (``llama``, ``mistral``): pre-norm layers, separate q/k/v projections, no image
tokens. Through lm-eval's ``hf`` (``lostattn-hf``)."""

from __future__ import annotations

from lmms_lostattn.families.base import FamilyAdapter

LLAMA = FamilyAdapter(family="llama", model_types=("llama",), images=False)
MISTRAL = FamilyAdapter(family="mistral", model_types=("mistral",), images=False)
