"""InternVL in the Hugging Face format (``OpenGVLab/InternVL3-*-hf``; lmms-eval's ``internvl_hf``).

Pre-norm Qwen2/Llama decoder. Image tiles and video frames are both ``<IMG_CONTEXT>`` tokens (config
``image_token_id``); the ``<img>``/``</img>`` delimiters are text.
"""

from __future__ import annotations

from lmms_lostattn.families.base import FamilyAdapter

INTERNVL = FamilyAdapter(family="internvl", model_types=("internvl",))
