"""Tables over loaded runs (pure functions; formatting in :func:`markdown` and :func:`csv_text`).

A difference is marked ``*`` when its paired test (:mod:`lmms_lostattn.reporting.significance`) gives p < 0.05; a
pair of runs that cannot be compared on a task (:func:`lmms_lostattn.reporting.runs.comparability`), or on its
statistics rows (:func:`lmms_lostattn.reporting.runs.statistics_difference`), gets no delta, only ``†``.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmms_lostattn.reporting.runs import (
    STATISTICS_PREFIX,
    LoadedRun,
    comparability,
    statistics_difference,
    version_changes,
)
from lmms_lostattn.reporting.significance import ALPHA, TESTS, difference, shown_change

MODULE_ROWS = {"none": (("attention", "attn"), ("FFN", "ffn")), "noise_delta": (("Noise Δ", "attn"),),
               "noise_qkv": (("Noise QKV", "attn"),)}



@dataclass(frozen=True)
class Cell:
    """One table cell: ``text`` for Markdown/HTML, ``fields`` for CSV (suffix → raw value; ``""`` is the value)."""

    text: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[Cell]]
    notes: list[str] = field(default_factory=list)


def text_cell(value: str) -> Cell:
    return Cell(value, {"": value})


def estimate_cell(mean: float | None, spread: float | None, name: str = "stderr") -> Cell:
    """``mean ± spread`` (the spread's raw value in the CSV column ``<column> <name>``); ``—`` without a mean."""
    if mean is None:
        return Cell("—", {"": None, name: None})
    return Cell(f"{mean:.4f}" + (f" ± {spread:.4f}" if spread is not None else ""), {"": mean, name: spread})


def mean_cell(run: LoadedRun, task: str, metric: str) -> Cell:
    return estimate_cell(run.metric(task, metric), run.stderr(task, metric))


def _tasks(runs: Sequence[LoadedRun]) -> list[str]:
    return sorted({task for run in runs for task in run.tasks})


def primary_metric(runs: Sequence[LoadedRun], task: str) -> str | None:
    """The task's own headline metric: the first non-lostattn metric in the first run that has the task."""
    for run in runs:
        own = [m for m in run.metrics(task) if not m.startswith(STATISTICS_PREFIX)]
        if own:
            return own[0]
    return None


def sidecar_cell(run: LoadedRun, task: str, module: str, metric: str) -> Cell:
    """A layer-averaged statistic from the sidecar (for values that have no table row, e.g. ``rid_layer``)."""
    group = run.block.get("stats", {}).get("table_group") or "all"
    overall = (((run.sidecar or {}).get("tasks", {}).get(task, {}).get("per_layer", {}).get(module, {})
                .get(group, {}).get(metric, {})).get("overall", {}))
    return estimate_cell(overall.get("mean"), overall.get("stderr"))


def module_cells(run: LoadedRun, tasks: Sequence[str], module: str, layer_reference: bool = False) -> list[Cell]:
    """RID and MixIG of ``module`` per task; with ``layer_reference`` the RID against the layer's input
    (``stats=all``'s ``rid_layer``, from the sidecar) in place of its table row's."""
    cells = []
    for task in tasks:
        rid = (sidecar_cell(run, task, module, "rid_layer") if layer_reference
               else mean_cell(run, task, run.stat_row("rid", module)))
        cells += [rid, mean_cell(run, task, run.stat_row("mixig", module))]
    return cells


def module_table(runs: Sequence[LoadedRun]) -> Table:
    """Paper Table 1: RID and MixIG of attention and FFN (vanilla runs; the FFN under both references where both
    were measured), Noise Δ / Noise QKV (attention, those runs)."""
    tasks = [t for t in _tasks(runs) if any(r.metric(t, r.stat_row("rid", "attn")) is not None for r in runs)]
    header = ["model", "row", "run"] + [f"{task} {name}" for task in tasks for name in ("RID", "MixIG")]
    rank = {mode: i for i, mode in enumerate(MODULE_ROWS)}
    chosen = sorted((run for run in runs if run.mode in MODULE_ROWS), key=lambda run: (run.model, rank[run.mode]))
    rows = []
    for run in chosen:
        for label, module in MODULE_ROWS[run.mode]:
            names = [text_cell(run.model), text_cell(_definition(label, run, module)), text_cell(run.name)]
            rows.append(names + module_cells(run, tasks, module))
            if module != "ffn" or run.stat_row("rid", module) != "lostattn_rid_ffn":
                continue  # only the FFN's RID against its own input has a second reference to show
            layer = module_cells(run, tasks, module, layer_reference=True)
            if any(cell.fields[""] is not None for cell in layer[::2]):
                rows.append([names[0], text_cell(f"{label} (RID against the layer's input)"), names[2], *layer])
    return Table(header, rows, ["mean ± stderr over samples of each sample's mean over layers"])


def _definition(label: str, run: LoadedRun, module: str) -> str:
    """A Table 1 row label, with the RID row's name where its definition is not the paper's."""
    row = run.stat_row("rid", module)
    return label if row == f"lostattn_rid_{module}" else f"{label} ({row})"


def accuracy_table(runs: Sequence[LoadedRun]) -> Table:
    """Paper Table 2: each task's headline metric, vanilla runs first, then each intervention."""
    tasks = [t for t in _tasks(runs) if primary_metric(runs, t)]
    header = ["model", "intervention", "run"] + [f"{task} {primary_metric(runs, task)}" for task in tasks]
    ordered = sorted(runs, key=lambda r: (r.model, r.mode != "none"))
    rows = [
        [text_cell(r.model), text_cell(r.label), text_cell(r.name)]
        + [mean_cell(r, t, primary_metric(runs, t)) for t in tasks]
        for r in ordered
    ]
    return Table(header, rows, ["mean ± stderr as the harness reports it (lmms-eval: bootstrap, else CLT)"])


def _difference_cell(run: LoadedRun, base: LoadedRun, task: str, metric: str) -> Cell:
    value = run.metric(task, metric)
    fields: dict[str, Any] = {"": value, "delta": None, "p": None, "test": ""}
    if value is None:
        return Cell("—", fields)
    if run is base:
        return Cell(f"{value:.4f}", {**fields, "test": "baseline"})
    diff = difference(base, run, task, metric)
    fields.update(delta=diff.delta, p=diff.p, test=diff.test)
    if diff.delta is None:  # not comparable, or no value in the baseline
        return Cell(f"{value:.4f} ({'no baseline' if diff.comparable else '†'})", fields)
    return Cell(f"{value:.4f} ({shown_change(diff.delta)}{'*' if diff.significant else ''})", fields)


def leaderboard(runs: Sequence[LoadedRun], base: LoadedRun) -> Table:
    """One row per run (model, intervention); one column per task metric and RID/MixIG row, with deltas vs ``base``."""
    columns = [(task, metric) for task in _tasks(runs)
               for metric in dict.fromkeys(m for r in runs for m in r.metrics(task))]
    columns.sort(key=lambda c: (c[0], c[1].startswith(STATISTICS_PREFIX)))
    header = ["model", "intervention", "run"] + [f"{task}/{metric}" for task, metric in columns]
    ordered = [base] + [r for r in runs if r is not base]
    rows = [
        [text_cell(r.model), text_cell(r.label), text_cell(r.name)] + [_difference_cell(r, base, *c) for c in columns]
        for r in ordered
    ]
    notes = [f"baseline: {base.name} ({base.label}); cells: value (delta vs baseline, or no baseline where the "
             "baseline has no value)",
             f"* paired test p < {ALPHA} ({TESTS}); no mark: not significant, or no per-sample test",
             "† not comparable with the baseline (different tasks, documents or --limit, or statistics rows defined "
             "differently): no delta"]
    notes += sorted({f"† {r.name}: {problem}" for r in runs for task in _tasks(runs)
                     if r is not base and (problem := comparability(base, r, task))})
    notes += [f"† {r.name}: {problem}" for r in ordered[1:]
              if (problem := statistics_difference(base, r))]
    notes += [f"{r.name}: versions differ from the baseline ({', '.join(changes)})" for r in ordered[1:]
              if (changes := version_changes(base, r))]
    return Table(header, rows, notes)


# What Markdown would read as markup: backslashes, code, emphasis and link brackets, strikethrough, an underscore
# that is not inside a word (``lostattn_pope`` stays as it is), and a ``<`` that could open an HTML tag (``p < 0.05``
# stays as it is).
_MARKUP = re.compile(r"[\\`*\[\]~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])|<(?=[A-Za-z/!?])")


def _literal(text: str) -> str:
    """``text`` as Markdown shows it as written: each character it would read as markup (:data:`_MARKUP`)
    backslash-escaped (a run named ``<i>`` or ``**best**``, the notes' leading ``*``)."""
    return _MARKUP.sub(lambda found: "\\" + found.group(0), text)


def _paragraph_line(text: str) -> str:
    """A note as a line of a paragraph, as written: a leading heading, quote, list or underline marker escaped (a
    note may start with a run's folder name: ``# sweep``, ``1. uniform``)."""
    line = _literal(text)
    line = re.sub(r"^(\s*\d{1,9})([.)])", r"\1\\\2", line)  # an ordered list's delimiter
    return re.sub(r"^(\s*)([#>+=-])", r"\1\\\2", line)


def markdown(table: Table) -> str:
    """The table as GitHub Markdown, notes below it, every text shown as written."""
    def row(texts: Sequence[str]) -> str:
        return "| " + " | ".join(_literal(text).replace("|", "\\|") for text in texts) + " |"

    lines = [row(table.header), "|" + "---|" * len(table.header)]
    lines += [row([cell.text for cell in cells]) for cells in table.rows]
    return "\n".join(lines + [""] + [f"{_paragraph_line(note)}  " for note in table.notes]) + "\n"


def csv_text(table: Table) -> str:
    """The table as CSV: each column's raw fields as separate columns (``<column> <suffix>``), full precision."""
    suffixes = [list(cell.fields) for cell in table.rows[0]] if table.rows else [[""] for _ in table.header]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([f"{h} {s}" if s else h for h, keys in zip(table.header, suffixes, strict=True) for s in keys])
    for row in table.rows:
        writer.writerow(["" if cell.fields[s] is None else cell.fields[s]
                         for cell, keys in zip(row, suffixes, strict=True) for s in keys])
    return buffer.getvalue()
