"""Gemma 2 and Gemma 3 text LLMs (``gemma2``, ``gemma3_text``): sandwich norms, as Gemma 3's decoder
(``post_attention_layernorm`` / ``post_feedforward_layernorm`` outputs are the updates). Gemma 2 soft-caps its
attention scores (``attn_scale=scores`` is refused there) and runs eager attention only; no image tokens."""

from __future__ import annotations

from lmms_lostattn.families.base import FamilyAdapter

GEMMA_TEXT = FamilyAdapter(
    family="gemma-text", model_types=("gemma2", "gemma3_text"), layer_style="sandwich", images=False
)
