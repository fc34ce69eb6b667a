"""Mistral 3 / Ministral 3 with Pixtral vision (lmms-eval's ``mistral3_vl``): pre-norm Mistral decoder; image
patches are ``[IMG]`` tokens (``image_token_index``), the ``[IMG_BREAK]``/``[IMG_END]`` row markers are text."""

from __future__ import annotations

from lmms_lostattn.families.base import FamilyAdapter

MISTRAL3 = FamilyAdapter(family="mistral3", model_types=("mistral3",))
