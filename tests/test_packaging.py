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
        for init in (ROOT / "lmms_lostattn").rglob("__init__.py") if init.parent != ROOT / "lmms_lostattn"
    }
    for name, folder in mapped.items():
        on_disk |= {".".join((name, *init.parent.relative_to(folder).parts)) for init in folder.rglob("__init__.py")}
    assert set(setuptools["packages"]) == on_disk
