"""Documents of an lmms-eval task as a run sees them: the task's image and the prompt text lmms-eval builds from the
document (``doc_to_visual``, ``doc_to_text`` with the task's own pre- and post-prompts), for ``lostattn show``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from lmms_lostattn.config.spec import SpecError
from lmms_lostattn.tasks import TASK_NAMES, tasks_path


@dataclass(frozen=True)
class Document:
    """One document of a task: where it comes from, its image, and the text of its prompt."""

    task: str
    doc_id: int
    image: Image.Image
    text: str


def _task(name: str, include_path: Sequence[str]) -> Any:
    """lmms-eval's task object; the shipped tasks without indexing lmms-eval's own."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    paths = [str(tasks_path()), *include_path]
    manager = TaskManager(verbosity="WARNING", include_path=paths, include_defaults=name not in TASK_NAMES)
    if name not in manager.all_tasks:
        raise SpecError(f"lostattn show: no lmms-eval task {name!r} (lmms-eval --tasks list lists them)")
    task = get_task_dict([name], manager).get(name)
    if task is None or isinstance(task, dict):
        raise SpecError(f"lostattn show: {name!r} is a group of tasks; name one of its tasks")
    return task


def task_documents(name: str, doc_ids: Sequence[int], include_path: Sequence[str] = ()) -> list[Document]:
    """The documents ``doc_ids`` of the split the task evaluates, each with its one image; refused (naming the
    document) where an id is out of range or a document has no image or several."""
    task = _task(name, include_path)
    docs = task.eval_docs
    outside = [doc_id for doc_id in doc_ids if not 0 <= doc_id < len(docs)]
    if outside:
        raise SpecError(f"lostattn show: {name} has documents 0-{len(docs) - 1}; no document {outside[0]}")
    documents = []
    for doc_id in doc_ids:
        doc = docs[doc_id]
        visuals = [visual for visual in task.doc_to_visual(doc) if isinstance(visual, Image.Image)]
        if len(visuals) != 1:
            raise SpecError(
                f"lostattn show: {name} document {doc_id} has {len(visuals)} images; the maps are drawn over one"
            )
        documents.append(Document(name, doc_id, visuals[0].convert("RGB"), task.doc_to_text(doc)))
    return documents
