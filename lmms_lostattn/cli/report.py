"""``lostattn report``: per-layer plots and the paper's module-level and accuracy tables."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from lmms_lostattn.cli.outputs import table_files, write_files
from lmms_lostattn.reporting.plots import layer_images
from lmms_lostattn.reporting.runs import load_runs
from lmms_lostattn.reporting.tables import accuracy_table, module_table


def report(paths: Sequence[pathlib.Path], output: pathlib.Path, force: bool = False) -> None:
    """Per-layer plots (PNG, SVG) and the paper's module-level and accuracy tables (Markdown, CSV) in ``output``."""
    runs = load_runs(list(paths))
    files: dict[pathlib.Path, str | bytes] = {**table_files(output / "modules", module_table(runs)),
                                              **table_files(output / "accuracy", accuracy_table(runs))}
    for task, images in layer_images(runs, ("png", "svg")).items():
        files.update({output / f"layers_{task}.{fmt}": data for fmt, data in images.items()})
    write_files(files, force)
