"""Idefics2 (lmms-eval's ``idefics2``): pre-norm Mistral decoder; each image is ``<image>`` tokens (the perceiver's
latents) between ``<fake_token_around_image>`` delimiters, which are text."""

from __future__ import annotations

from lmms_lostattn.families.base import FamilyAdapter

IDEFICS = FamilyAdapter(family="idefics", model_types=("idefics2", "idefics3"))
