"""The lmms-eval model ids the plugin adds: one row per family, naming lmms-eval's own classes.

Each row gives ``lostattn_<name>`` the lmms-eval classes it wraps (``simple``, ``chat``: import paths, ``None``
where lmms-eval 0.7.3 has none), the request types whose batches the plugin follows (:attr:`LostAttnMixin.
follows_batches`), and what a user should know. The wrapper classes are ``class LostAttn<X>(LostAttnMixin, <base>)``
and nothing more; they are built when lmms-eval first asks for them (``lmms_lostattn.model_wrappers.lmms_eval.
wrappers.<class name>``), so that listing the models imports none of lmms-eval's model modules.

Any family with an adapter runs through ``lostattn_hf`` without a row; a row gives it a model id of its own on
lmms-eval's class for it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

GENERATE = frozenset({"generate_until"})


@dataclass(frozen=True)
class Wrapped:
    """One ``lostattn_<name>`` model id."""

    name: str
    prefix: str  # of the class names: ``LostAttn<prefix>Simple``, ``LostAttn<prefix>Chat``
    simple: str | None = None
    chat: str | None = None
    follows_batches: frozenset[str] = frozenset()
    note: str = ""
    lmms_eval_id: str = ""  # lmms-eval's id for the wrapped class, where its import path does not say it

    def class_name(self, kind: str) -> str:
        """``LostAttn<prefix><Simple|Chat>``, e.g. ``LostAttnLlavaChat``."""
        return f"LostAttn{self.prefix}{kind.capitalize()}"

    @property
    def base_id(self) -> str:
        """lmms-eval's model id of the wrapped class (``llava_hf``: ``lmms_eval.models.<kind>.<id>.<class>``)."""
        return self.lmms_eval_id or str(self.simple or self.chat).split(".")[3]


WRAPPED: tuple[Wrapped, ...] = (
    Wrapped(
        "llava",
        "Llava",
        "lmms_eval.models.simple.llava_hf.LlavaHf",
        "lmms_eval.models.chat.llava_hf.LlavaHf",
        note="LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision (llava-hf checkpoints)",
    ),
    Wrapped(
        "qwen2_5_vl",
        "Qwen2_5_VL",
        "lmms_eval.models.simple.qwen2_5_vl.Qwen2_5_VL",
        "lmms_eval.models.chat.qwen2_5_vl.Qwen2_5_VL",
        GENERATE,
        "bfloat16 as in lmms-eval; attn_implementation passes through",
    ),
    Wrapped("qwen2_vl", "Qwen2_VL", "lmms_eval.models.simple.qwen2_vl.Qwen2_VL", None, GENERATE),
    Wrapped(
        "qwen3_vl",
        "Qwen3_VL",
        "lmms_eval.models.simple.qwen3_vl.Qwen3_VL",
        "lmms_eval.models.chat.qwen3_vl.Qwen3_VL",
        GENERATE,
        "bfloat16 as in lmms-eval",
    ),
    Wrapped("gemma3", "Gemma3", "lmms_eval.models.simple.gemma3.Gemma3", None, GENERATE, "bfloat16 as in lmms-eval"),
    Wrapped(
        "internvl",
        "InternVL",
        None,
        "lmms_eval.models.chat.internvl_hf.InternVLHf",
        note="HF-format InternVL, bfloat16",
    ),
    Wrapped(
        "idefics",
        "Idefics2",
        "lmms_eval.models.simple.idefics2.Idefics2",
        None,
        GENERATE,
        "Idefics2; eager attention without flash-attn, which the plugin's attention passes through to",
    ),
    Wrapped(
        "mistral3_vl",
        "Mistral3_VL",
        "lmms_eval.models.simple.mistral3_vl.Mistral3_VL",
        None,
        note="bfloat16 on GPU, float32 on CPU, as in lmms-eval",
    ),
    Wrapped(
        "hf",
        "Hf",
        None,
        "lmms_lostattn.model_wrappers.lmms_eval.hf.HuggingfaceImageTextToText",
        GENERATE,
        "any image-text-to-text model with an adapter, through lmms-eval's generic huggingface class",
        "huggingface",
    ),
)


def wrapper_class(row: Wrapped, kind: str) -> type:
    """``class LostAttn<X>(LostAttnMixin, <row's base class>)``, defined in this module."""
    from lmms_lostattn.model_wrappers.lmms_eval.base import LostAttnMixin  # lmms-eval's model modules: not at listing

    module, _, name = getattr(row, kind).rpartition(".")
    base = getattr(importlib.import_module(module), name)
    doc = f"lmms-eval's {kind} ``{module}.{name}`` with the lostattn arguments (``lostattn_{row.name}``)."
    namespace = {
        "__module__": __name__,
        "__doc__": doc + (f" {row.note}." if row.note else ""),
        "follows_batches": row.follows_batches,
        "base_model_id": row.base_id,
    }
    cls = type(row.class_name(kind), (LostAttnMixin, base), namespace)
    cls.__qualname__ = cls.__name__
    return cls


def __getattr__(name: str) -> Any:
    """Build a wrapper class on first access (PEP 562) and keep it as a module attribute."""
    for row in WRAPPED:
        for kind in ("simple", "chat"):
            if getattr(row, kind) and row.class_name(kind) == name:
                globals()[name] = cls = wrapper_class(row, kind)
                return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
