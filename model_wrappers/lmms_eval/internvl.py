"""``lostattn_internvl``: InternVL (HF format) through lmms-eval's ``internvl_hf`` (chat only; bfloat16 as there)."""

from __future__ import annotations

from lmms_eval.models.chat.internvl_hf import InternVLHf as InternVLHfChat

from lmms_lostattn.model_wrappers.lmms_eval.base import LostAttnMixin


class LostAttnInternVLChat(LostAttnMixin, InternVLHfChat):
    """lmms-eval's chat ``internvl_hf`` with the lostattn arguments."""
