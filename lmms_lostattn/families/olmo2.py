"""OLMo-2 (``olmo2``): no norm before attention or MLP, a norm on each module's output before it is added
(``post_attention_layernorm`` / ``post_feedforward_layernorm``, whose outputs are the updates, as for Gemma's sandwich
norms); no image tokens."""

from __future__ import annotations

from lmms_lostattn.families.base import FamilyAdapter

OLMO2 = FamilyAdapter(family="olmo2", model_types=("olmo2",), layer_style="sandwich", images=False)
