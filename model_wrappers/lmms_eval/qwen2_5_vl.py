"""``lostattn_qwen2_5_vl``: Qwen2.5-VL through lmms-eval's ``qwen2_5_vl`` (simple and chat).

lmms-eval's class loads the model in bfloat16 and accepts only ``attn_implementation`` in {None, sdpa, eager,
flash_attention_2}; the plugin passes both through untouched and switches the language decoder to its own attention
function only inside each request's intervention scope (``set_attn_implementation`` after loading).
"""

from __future__ import annotations

from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL as Qwen2_5_VLChat
from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL as Qwen2_5_VLSimple

from lmms_lostattn.model_wrappers.lmms_eval.base import LostAttnMixin


class LostAttnQwen2_5_VLSimple(LostAttnMixin, Qwen2_5_VLSimple):
    """lmms-eval's simple ``qwen2_5_vl`` with the lostattn arguments (``--force_simple``)."""

    follows_batches = frozenset({"generate_until"})


class LostAttnQwen2_5_VLChat(LostAttnMixin, Qwen2_5_VLChat):
    """lmms-eval's chat ``qwen2_5_vl`` with the lostattn arguments (the default)."""

    follows_batches = frozenset({"generate_until"})
