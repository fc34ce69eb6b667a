"""Writing a command's output files (all or none) and its tables."""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Mapping

from lmms_lostattn.reporting.runs import RunError
from lmms_lostattn.reporting.tables import Table, csv_text, markdown


def refuse_existing(paths: Iterable[pathlib.Path], force: bool) -> None:
    """A :class:`RunError` when one of ``paths`` exists and ``force`` is off."""
    existing = [str(path) for path in paths if path.exists()]
    if existing and not force:
        more = f" (and {len(existing) - 1} more output files)" if len(existing) > 1 else ""
        raise RunError(f"{existing[0]}{more} already exists; pass --force to overwrite")


def write_files(files: Mapping[pathlib.Path, str | bytes], force: bool) -> None:
    """Write every file, or none when one exists and ``force`` is off."""
    refuse_existing(files, force)
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        print(f"wrote {path}")


def table_files(stem: pathlib.Path, table: Table) -> dict[pathlib.Path, str]:
    """A table as Markdown and CSV next to ``stem``."""
    return {stem.with_suffix(".md"): markdown(table), stem.with_suffix(".csv"): csv_text(table)}
