"""lmms-eval model manifests, loaded through the ``lmms_eval.models`` entry-point group.

Imports nothing at module level: lmms-eval loads this entry point while it builds its model registry, on its first
import, and importing lmms-eval (or the wrapper classes, which import it) from here would load this module again
half-made (a process whose first import is this module).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmms_eval.models.registry_v2 import ModelManifest


def get_manifests() -> list[ModelManifest]:
    """``lostattn_<name>`` for each row of :data:`~lmms_lostattn.model_wrappers.lmms_eval.wrappers.WRAPPED`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    from lmms_lostattn.model_wrappers.lmms_eval import wrappers

    return [
        ModelManifest(
            model_id=f"lostattn_{row.name}",
            simple_class_path=row.simple and f"{wrappers.__name__}.{row.class_name('simple')}",
            chat_class_path=row.chat and f"{wrappers.__name__}.{row.class_name('chat')}",
        )
        for row in wrappers.WRAPPED
    ]
