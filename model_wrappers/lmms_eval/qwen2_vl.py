"""``lostattn_qwen2_vl``: Qwen2-VL through lmms-eval's ``qwen2_vl`` (simple only in lmms-eval 0.7.3)."""

from __future__ import annotations

from lmms_eval.models.simple.qwen2_vl import Qwen2_VL as Qwen2_VLSimple

from lmms_lostattn.model_wrappers.lmms_eval.base import LostAttnMixin


class LostAttnQwen2_VLSimple(LostAttnMixin, Qwen2_VLSimple):
    """lmms-eval's simple ``qwen2_vl`` with the lostattn arguments."""

    follows_batches = frozenset({"generate_until"})
