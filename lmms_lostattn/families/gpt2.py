"""GPT-2 (``gpt2``): pre-norm blocks ``transformer.h`` with ``attn`` (one fused ``c_attn`` projection, so
``noise_qkv`` is refused) and ``mlp``; learned absolute positions; no image tokens."""

from __future__ import annotations

from lmms_lostattn.families.base import FamilyAdapter

GPT2 = FamilyAdapter(family="gpt2", model_types=("gpt2",), layers="h", attention="attn", qkv=("c_attn",), images=False)
