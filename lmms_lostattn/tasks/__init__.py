"""Local tasks shipped with lmms-lostattn: for lmms-eval (the ``*.yaml`` next to this module) and for lm-eval
(``lm_eval/*.yaml``: text tasks on the shape scenes described in words and their group, and the colour task's
images for ``hf-multimodal``).

The YAML files are templates: ``lostattn_pope.yaml`` must ``include:`` lmms-eval's own ``pope.yaml`` by file path
and every task reads a parquet file shipped in ``data/``, and neither location is fixed relative to this package
(editable checkout vs. wheel). :func:`tasks_path` fills in the absolute paths and returns a directory holding only
one host's rendered task YAMLs, for that host's ``--include_path``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from string import Template

TEMPLATE_DIR = Path(__file__).resolve().parent
DATA_DIR = TEMPLATE_DIR / "data"
HOSTS = ("lmms_eval", "lm_eval")
# host -> (template directory, task names)
TASKS: dict[str, tuple[Path, tuple[str, ...]]] = {
    "lmms_eval": (TEMPLATE_DIR, ("lostattn_pope", "lostattn_shapes_color")),
    "lm_eval": (
        TEMPLATE_DIR / "lm_eval",
        (
            "lostattn_shapes_text_mc",
            "lostattn_shapes_text_gen",
            "lostattn_shapes_text_rolling",
            "lostattn_shapes_text",  # the group of the three
            "lostattn_shapes_color",  # lmms-eval's image task of the same name, for hf-multimodal
        ),
    ),
}
TASK_NAMES = TASKS["lmms_eval"][1]


def pope_yaml_path() -> Path:
    """Absolute path of the installed lmms-eval ``tasks/pope/pope.yaml`` (found without importing lmms_eval)."""
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("lmms_eval is not installed; the lostattn tasks need lmms-eval==0.7.3")
    path = Path(next(iter(spec.submodule_search_locations))).resolve() / "tasks" / "pope" / "pope.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"lmms-eval's POPE config {path} is missing; lostattn_pope includes it")
    return path


def render_tasks(host: str = "lmms_eval") -> dict[str, str]:
    """Rendered YAML text of every task of ``host`` (one of :data:`HOSTS`), keyed by file name."""
    if host not in TASKS:
        raise ValueError(f"unknown host {host!r}; the shipped tasks are for {', '.join(HOSTS)}")
    folder, names = TASKS[host]
    paths = {"data_dir": DATA_DIR, **({"pope_yaml": pope_yaml_path()} if host == "lmms_eval" else {})}
    # json.dumps escapes the value for the double-quoted YAML scalars in the templates
    values = {key: json.dumps(path.as_posix())[1:-1] for key, path in paths.items()}
    return {
        f"{name}.yaml": Template((folder / f"{name}.yaml").read_text(encoding="utf-8")).substitute(values)
        for name in names
    }


def tasks_path(cache_dir: str | os.PathLike[str] | None = None, host: str = "lmms_eval") -> Path:
    """Directory with the rendered task YAMLs of ``host`` (only those), for its ``--include_path``.

    Lives in ``<cache>/tasks-<hash>``, where ``<cache>`` is ``cache_dir``, else ``$LOSTATTN_CACHE``, else
    ``~/.cache/lmms_lostattn``, and ``<hash>`` covers the rendered text (templates, lmms-eval and data
    locations). Idempotent; created atomically (temporary directory, then rename).
    """
    rendered = render_tasks(host)
    digest = hashlib.sha256(json.dumps(rendered, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir or os.environ.get("LOSTATTN_CACHE") or "~/.cache/lmms_lostattn").expanduser().resolve()
    target = root / f"tasks-{digest}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private
    for name, text in rendered.items():
        (tmp / name).write_text(text, encoding="utf-8")
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():  # not a lost race with a concurrent caller
            raise
    return target
