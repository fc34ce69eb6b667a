"""``lostattn_qwen3_vl``: Qwen3-VL through lmms-eval's ``qwen3_vl`` (simple and chat; bfloat16 as in lmms-eval)."""

from __future__ import annotations

from lmms_eval.models.chat.qwen3_vl import Qwen3_VL as Qwen3_VLChat
from lmms_eval.models.simple.qwen3_vl import Qwen3_VL as Qwen3_VLSimple

from lmms_lostattn.model_wrappers.lmms_eval.base import LostAttnMixin


class LostAttnQwen3_VLSimple(LostAttnMixin, Qwen3_VLSimple):
    """lmms-eval's simple ``qwen3_vl`` with the lostattn arguments (``--force_simple``)."""

    follows_batches = frozenset({"generate_until"})


class LostAttnQwen3_VLChat(LostAttnMixin, Qwen3_VLChat):
    """lmms-eval's chat ``qwen3_vl`` with the lostattn arguments (the default)."""

    follows_batches = frozenset({"generate_until"})
