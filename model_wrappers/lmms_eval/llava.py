"""``lostattn_llava``: LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision through lmms-eval's ``llava_hf``."""

from __future__ import annotations

from lmms_eval.models.chat.llava_hf import LlavaHf as LlavaHfChat
from lmms_eval.models.simple.llava_hf import LlavaHf as LlavaHfSimple

from lmms_lostattn.model_wrappers.lmms_eval.base import LostAttnMixin


class LostAttnLlavaSimple(LostAttnMixin, LlavaHfSimple):
    """lmms-eval's simple ``llava_hf`` with the lostattn arguments (``--force_simple``)."""


class LostAttnLlavaChat(LostAttnMixin, LlavaHfChat):
    """lmms-eval's chat ``llava_hf`` with the lostattn arguments (the default)."""
