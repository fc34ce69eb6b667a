"""lmms-eval model manifests, loaded through the ``lmms_eval.models`` entry-point group.

Kept import-light: lmms-eval imports this while it builds its model registry.
"""

from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest

_WRAPPERS = "lmms_lostattn.model_wrappers"


def get_manifests() -> list[ModelManifest]:
    """One manifest per supported family: a chat class and, where lmms-eval has one, a simple class."""
    return [
        ModelManifest(
            model_id="lostattn_llava",
            simple_class_path=f"{_WRAPPERS}.llava.LostAttnLlavaSimple",
            chat_class_path=f"{_WRAPPERS}.llava.LostAttnLlavaChat",
        ),
    ]
