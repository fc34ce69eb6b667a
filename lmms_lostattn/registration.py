"""lmms-eval model manifests, loaded through the ``lmms_eval.models`` entry-point group.

Kept import-light: lmms-eval imports this while it builds its model registry.
"""

from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest

_WRAPPERS = "lmms_lostattn.model_wrappers.lmms_eval"


def get_manifests() -> list[ModelManifest]:
    """One manifest per supported family, with the lmms-eval classes (simple and/or chat) that exist for it."""
    return [
        _manifest("llava", "LostAttnLlavaSimple", "LostAttnLlavaChat"),
        _manifest("qwen2_5_vl", "LostAttnQwen2_5_VLSimple", "LostAttnQwen2_5_VLChat"),
        _manifest("qwen2_vl", "LostAttnQwen2_VLSimple", None),
        _manifest("qwen3_vl", "LostAttnQwen3_VLSimple", "LostAttnQwen3_VLChat"),
        _manifest("gemma3", "LostAttnGemma3Simple", None),
        _manifest("internvl", None, "LostAttnInternVLChat"),
        _manifest("idefics", "LostAttnIdefics2Simple", None),
        _manifest("mistral3_vl", "LostAttnMistral3_VLSimple", None),
        _manifest("hf", None, "LostAttnHfChat"),
    ]


def _manifest(module: str, simple: str | None, chat: str | None) -> ModelManifest:
    """``lostattn_<module>`` with the classes of ``model_wrappers/lmms_eval/<module>.py``."""
    return ModelManifest(
        model_id=f"lostattn_{module}",
        simple_class_path=simple and f"{_WRAPPERS}.{module}.{simple}",
        chat_class_path=chat and f"{_WRAPPERS}.{module}.{chat}",
    )
