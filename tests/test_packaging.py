"""The wheel ships every subpackage (``pip install .``, not only ``-e``, must work)."""

from __future__ import annotations

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {name: ROOT / folder for name, folder in setuptools["package-dir"].items()}
    on_disk = {"lmms_lostattn"} | {
        ".".join(("lmms_lostattn", *init.parent.relative_to(ROOT / "lmms_lostattn").parts))
        for init in (ROOT / "lmms_lostattn").rglob("__init__.py")
        if init.parent != ROOT / "lmms_lostattn"
    }
    for name, folder in mapped.items():
        on_disk |= {".".join((name, *init.parent.relative_to(folder).parts)) for init in folder.rglob("__init__.py")}
    assert set(setuptools["packages"]) == on_disk


def test_the_lmms_eval_glue_never_imports_lm_eval() -> None:
    """lm-eval is an optional extra: lmms-eval runs (registration, every family wrapper, reporting) work without it."""
    import subprocess
    import sys

    from lmms_lostattn.registration import get_manifests

    modules = sorted(
        {path.rpartition(".")[0] for m in get_manifests() for path in (m.simple_class_path, m.chat_class_path) if path}
    )
    code = "import sys, importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    code += "importlib.import_module('lmms_lostattn.model_wrappers.lmms_eval.reproduce')\n"
    code += (
        "assert not any(name == 'lm_eval' or name.startswith('lm_eval.') for name in sys.modules), 'lm_eval imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
