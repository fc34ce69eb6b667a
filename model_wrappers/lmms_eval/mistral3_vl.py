"""``lostattn_mistral3_vl``: Mistral 3 through lmms-eval's ``mistral3_vl`` (simple only; bfloat16 on GPU and
float32 on CPU, as there)."""

from __future__ import annotations

from lmms_eval.models.simple.mistral3_vl import Mistral3_VL as Mistral3_VLSimple

from lmms_lostattn.model_wrappers.lmms_eval.base import LostAttnMixin


class LostAttnMistral3_VLSimple(LostAttnMixin, Mistral3_VLSimple):
    """lmms-eval's simple ``mistral3_vl`` with the lostattn arguments."""
