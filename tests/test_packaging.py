"""The wheel ships every subpackage (``pip install .``, not only ``-e``, must work)."""

from __future__ import annotations

import ast
import pathlib
import shutil
import subprocess
import sys
import tomllib
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_wheel_ships_the_checkout_as_it_is(tmp_path: pathlib.Path) -> None:
    """No folder is remapped into the package, and the built wheel holds every module, task file and shipped model
    file of the checkout's ``lmms_lostattn`` folder, under the same paths."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "package-dir" not in setuptools
    source = tmp_path / "source"  # a copy: an in-tree build would leave build/ in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__"))
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    subprocess.run(
        [*build, str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("lmms_lostattn/")}
    package = ROOT / "lmms_lostattn"
    suffixes = {".py", ".yaml", ".parquet", ".json", ".safetensors", ".jinja", ".md"}
    on_disk = {
        f"lmms_lostattn/{path.relative_to(package).as_posix()}"
        for path in package.rglob("*")
        if path.is_file() and path.suffix in suffixes and "__pycache__" not in path.parts
    }
    assert on_disk - shipped == set()


def test_the_lmms_eval_glue_never_imports_lm_eval() -> None:
    """lm-eval is an optional extra: lmms-eval runs (registration, every family wrapper, reporting) work without it."""
    from lmms_lostattn.model_wrappers.lmms_eval.manifests import get_manifests

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


# The package's folders from the bottom layer up: a module may import from its own folder and the folders before it.
LAYERS = (
    ("compat",),
    ("config",),
    ("families",),
    ("statistics",),
    ("intervention",),
    ("reporting",),
    ("inspection",),
    ("model_wrappers",),
    ("cli",),
)
OUTSIDE = {"tasks", "models", "testing"}  # beside the layers: data, the shipped model, tiny test models


def _package_imports(path: pathlib.Path) -> set[str]:
    """The ``lmms_lostattn`` folders a module imports from, lazy imports inside functions included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        found |= {name.split(".")[1] for name in names if name.startswith("lmms_lostattn.")}
    return found


def test_dependencies_point_one_way() -> None:
    rank = {folder: level for level, folders in enumerate(LAYERS) for folder in folders}
    package = ROOT / "lmms_lostattn"
    upward = []
    for path in package.rglob("*.py"):
        folder = path.relative_to(package).parts[0]
        if folder not in rank:
            continue
        for imported in _package_imports(path) - {folder}:
            outside = imported in OUTSIDE and folder not in ("cli", "model_wrappers")
            if outside or (imported in rank and rank[imported] > rank[folder]):
                upward.append(f"{path.relative_to(ROOT)} imports lmms_lostattn.{imported}")
    assert not upward, upward
