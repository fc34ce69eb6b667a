"""``lostattn_idefics``: Idefics2 through lmms-eval's ``idefics2`` (simple only; it picks eager attention without
flash-attn, and the plugin's attention function then passes through to eager)."""

from __future__ import annotations

from lmms_eval.models.simple.idefics2 import Idefics2 as Idefics2Simple

from lmms_lostattn.model_wrappers.lmms_eval.base import LostAttnMixin


class LostAttnIdefics2Simple(LostAttnMixin, Idefics2Simple):
    """lmms-eval's simple ``idefics2`` with the lostattn arguments."""

    follows_batches = frozenset({"generate_until"})
