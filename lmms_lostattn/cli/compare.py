"""``lostattn compare``: a leaderboard with paired tests against a baseline run."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from lmms_lostattn.cli.outputs import refuse_existing, table_files, write_files
from lmms_lostattn.reporting.html import page
from lmms_lostattn.reporting.plots import layer_images
from lmms_lostattn.reporting.runs import find_results, load_runs
from lmms_lostattn.reporting.tables import leaderboard, markdown


def compare(
    paths: Sequence[pathlib.Path], baseline: pathlib.Path | None, output: pathlib.Path, force: bool, echo: bool = True
) -> None:
    """Leaderboard (Markdown, CSV, HTML with the plots) against ``baseline`` (default: the first vanilla run); the
    Markdown table is also printed when ``echo`` is on."""
    if baseline is not None:
        chosen = find_results(baseline).resolve()
        paths = [baseline, *(path for path in paths if find_results(path).resolve() != chosen)]
    runs = load_runs(list(paths))
    base = runs[0] if baseline is not None else next((r for r in runs if r.mode == "none"), runs[0])
    table = leaderboard(runs, base)
    images = {task: pngs["png"] for task, pngs in layer_images(runs).items()}
    files = {**table_files(output / "leaderboard", table),
             output / "leaderboard.html": page("lostattn leaderboard", table, base, images)}
    refuse_existing(files, force)  # before the table is printed: a refused run prints its refusal alone
    if echo:
        print(markdown(table))
    write_files(files, force)
