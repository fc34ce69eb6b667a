"""``lostattn_gemma3``: Gemma 3 through lmms-eval's ``gemma3`` (simple only in lmms-eval 0.7.3; bfloat16 as there)."""

from __future__ import annotations

from lmms_eval.models.simple.gemma3 import Gemma3 as Gemma3Simple

from lmms_lostattn.model_wrappers.lmms_eval.base import LostAttnMixin


class LostAttnGemma3Simple(LostAttnMixin, Gemma3Simple):
    """lmms-eval's simple ``gemma3`` with the lostattn arguments."""

    follows_batches = frozenset({"generate_until"})
