"""lmms-eval model manifests, loaded through the ``lmms_eval.models`` entry-point group.

Kept import-light: lmms-eval imports this while it builds its model registry (the wrapper classes are built when
lmms-eval first loads one).
"""

from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest

from lmms_lostattn.model_wrappers.lmms_eval import wrappers


def get_manifests() -> list[ModelManifest]:
    """``lostattn_<name>`` for each row of :data:`~lmms_lostattn.model_wrappers.lmms_eval.wrappers.WRAPPED`."""
    return [
        ModelManifest(
            model_id=f"lostattn_{row.name}",
            simple_class_path=row.simple and f"{wrappers.__name__}.{row.class_name('simple')}",
            chat_class_path=row.chat and f"{wrappers.__name__}.{row.class_name('chat')}",
        )
        for row in wrappers.WRAPPED
    ]
