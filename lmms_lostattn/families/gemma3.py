"""Gemma 3 (lmms-eval's ``gemma3``).

Sandwich norms: each module's output is normed (``post_attention_layernorm`` / ``post_feedforward_layernorm``)
before it is added to the residual stream, so those norms' outputs are the updates. The image soft tokens attend to
each other bidirectionally (a bool mask the attention function respects); BOI/EOI tokens are not visual.
"""

from __future__ import annotations

from lmms_lostattn.families.base import FamilyAdapter

GEMMA3 = FamilyAdapter(family="gemma3", model_types=("gemma3",), layer_style="sandwich")
