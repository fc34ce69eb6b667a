"""One self-contained HTML leaderboard page: a sortable table per task (inline CSS and JS), each cell coloured by its
paired test against the baseline, and the per-layer plots as PNG data URIs."""

from __future__ import annotations

import base64
import html
import pathlib
import re
from collections.abc import Mapping

from lmms_lostattn.reporting.runs import STATISTICS_PREFIX, LoadedRun
from lmms_lostattn.reporting.significance import ALPHA, Difference
from lmms_lostattn.reporting.tables import Cell, Table

RUN_COLUMNS = 3  # the leaderboard's first columns: model, intervention, run
HUB_ID = re.compile(r"[\w-][\w.-]*/[\w.-]+")

STYLE = """body{font:14px/1.35 system-ui,sans-serif;margin:1em 1.5em 2em;color:#1f2328}
h1{font-size:22px;margin:0 0 .3em}h2{font-size:17px;margin:1.6em 0 .4em}nav a{margin-right:1em}
.legend,footer{color:#57606a;font-size:13px}.key{padding:0 .35em;border-radius:3px;font-weight:600}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d7de;padding:3px 6px;vertical-align:top}
thead th{background:#f6f8fa;font-weight:600;vertical-align:bottom;text-align:left;cursor:pointer;user-select:none}
thead th.group{cursor:default;text-align:center;font-weight:500;color:#57606a}
th[aria-sort=ascending]::after{content:" ▲"}th[aria-sort=descending]::after{content:" ▼"}
td.n{text-align:right;white-space:nowrap}td .d{display:block;font-size:11px;color:#57606a}
td.t{max-width:14em}.stat{border-left:2px solid #8c959f}tr.base td{background:#f6f8fa}
.badge{font-size:10px;color:#57606a;border:1px solid #d0d7de;border-radius:8px;padding:0 .4em;margin-left:.3em}
td.better,.key.better{background:#ccf2d4;color:#116329}td.worse,.key.worse{background:#ffd3cf;color:#a40e26}
td.changed,.key.changed{background:#d4e9ff;color:#0a3069}td.better .d,td.worse .d,td.changed .d{color:inherit}
td.nc .d{color:#8c959f}.wrap{overflow-x:auto}img{max-width:100%;display:block;margin-top:.8em}"""

SCRIPT = """document.querySelectorAll("table.board").forEach(table => {
  const heads = [...table.tHead.rows[table.tHead.rows.length - 1].cells], body = table.tBodies[0];
  heads.forEach((th, col) => th.addEventListener("click", () => {
    const sign = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    heads.forEach(h => h.removeAttribute("aria-sort"));
    th.setAttribute("aria-sort", sign > 0 ? "ascending" : "descending");
    const order = (x, y) => (x === "") - (y === "") || sign * (isNaN(x) || isNaN(y) ? x.localeCompare(y) : x - y);
    [...body.rows].sort((a, b) => order(a.cells[col].dataset.v, b.cells[col].dataset.v))
      .forEach(tr => body.appendChild(tr));
  }));
});"""


def short_name(model: str) -> str:
    """A model as a reader knows it: a hub id ``org/name`` as given, else the last component of its path (of the
    ``pretrained=`` value when the harness recorded only the model arguments)."""
    pretrained = re.search(r"(?:^|,)pretrained=([^,]+)", model)
    name = pretrained.group(1) if pretrained else model
    return name if HUB_ID.fullmatch(name) else pathlib.PurePath(name).name or name


def _heading(metric: str) -> str:
    """A metric column's header: the metric without ``lostattn_``, breakable after underscores."""
    return html.escape(metric.removeprefix(STATISTICS_PREFIX)).replace("_", "_<wbr>")


def _image(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _tone(diff: Difference, higher_is_better: bool | None) -> str:
    """The cell's class: a significant change is better / worse by the metric's direction, else (statistics rows,
    or no direction recorded) changed."""
    if not diff.significant:
        return ""
    if higher_is_better is None:
        return "changed"
    return "better" if (diff.delta > 0) == higher_is_better else "worse"


def _hover(diff: Difference, value: float | None) -> str:
    """The p-value and test of a cell, or why it has none."""
    if value is None:
        return "not reported by this run"
    if diff.delta is None:
        return diff.test
    change = f"{diff.delta:+.6g} vs the baseline"
    if diff.p is None:
        return f"{change}; no test ({diff.test})"
    return f"{change}; {diff.test} p = {diff.p:.3g}, {'' if diff.significant else 'not '}significant at α = {ALPHA}"


def _metric_cell(cell: Cell, higher_is_better: bool | None, stat: bool) -> str:
    """A leaderboard cell as the value over its delta (the Markdown's ``value (delta*)``), coloured and explained."""
    value, _, delta = cell.text.partition(" ")
    diff = Difference(cell.fields["delta"], cell.fields["p"], cell.fields["test"])
    classes = ["n", _tone(diff, higher_is_better), "nc" if "†" in delta else "", "stat" if stat else ""]
    number = cell.fields[""]
    return (f'<td class="{" ".join(c for c in classes if c)}" data-v="{"" if number is None else number!r}" '
            f'title="{html.escape(_hover(diff, number))}">{html.escape(value)}'
            f'<span class="d">{html.escape(delta.strip("()"))}</span></td>')


def _run_cells(row: list[Cell], is_base: bool) -> str:
    model, label, name = (cell.text for cell in row[:RUN_COLUMNS])
    short = html.escape(short_name(model))
    badge = '<span class="badge">baseline</span>' if is_base else ""
    return (f'<td class="t" data-v="{short}" title="{html.escape(model)}">{short}</td>'
            f'<td class="t" data-v="{html.escape(label)}">{html.escape(label)}</td>'
            f'<td class="t" data-v="{html.escape(name)}">{html.escape(name)}{badge}</td>')


def _view(task: str, columns: list[int], board: Table, base: LoadedRun, image: bytes | None) -> str:
    """One task's section: its table (rows = runs, the task's own metrics, then the statistics rows) and plot."""
    metrics = {index: board.header[index].partition("/")[2] for index in columns}
    stats = [index for index, metric in metrics.items() if metric.startswith(STATISTICS_PREFIX)]
    first_stat = next(iter(stats), None)
    groups = "".join(f'<th class="group{extra}" colspan="{span}">{name}</th>' for name, span, extra in
                     (("task metrics", len(columns) - len(stats), ""), ("statistics: RID / MixIG", len(stats), " stat"))
                     if span)
    heads = "".join(f"<th>{name}</th>" for name in board.header[:RUN_COLUMNS]) + "".join(
        f'<th{" class=stat" if index == first_stat else ""} title="{html.escape(board.header[index])}">'
        f"{_heading(metric)}</th>" for index, metric in metrics.items())
    rows = "".join(  # the leaderboard puts the baseline first
        f'<tr{" class=base" if number == 0 else ""}>{_run_cells(row, number == 0)}'
        + "".join(_metric_cell(row[index], None if index in stats else base.higher_is_better(task, metric),
                               index == first_stat)
                  for index, metric in metrics.items()) + "</tr>"
        for number, row in enumerate(board.rows))
    figure = _image(image, f"per-layer RID and MixIG on {task}") if image else ""
    return (f'<section class="view" id="view-{html.escape(task)}"><h2>{html.escape(task)}</h2><div class="wrap">'
            f'<table class="board"><thead><tr><th class="group" colspan="{RUN_COLUMNS}"></th>{groups}</tr>'
            f"<tr>{heads}</tr></thead><tbody>{rows}</tbody></table></div>{figure}</section>")


def page(title: str, board: Table, base: LoadedRun, images: Mapping[str, bytes]) -> str:
    """The page for ``board``, the :func:`~lmms_lostattn.reporting.tables.leaderboard` of some runs against ``base``:
    one sortable view per task (its plot from ``images`` below it), the other ``images`` (PNG), then the notes."""
    tasks: dict[str, list[int]] = {}
    for index, column in enumerate(board.header[RUN_COLUMNS:], start=RUN_COLUMNS):
        tasks.setdefault(column.partition("/")[0], []).append(index)
    views = "".join(_view(task, columns, board, base, images.get(task)) for task, columns in tasks.items())
    others = "".join(
        f'<section id="view-{html.escape(name)}"><h2>{html.escape(name)}</h2>{_image(png, name)}</section>'
        for name, png in images.items() if name not in tasks)
    links = "".join(f'<a href="#view-{html.escape(name)}">{html.escape(name)}</a>'
                    for name in [*tasks, *(name for name in images if name not in tasks)])
    legend = (f"Each cell: the run's value, below it its change against the baseline <b>{html.escape(base.name)}</b>"
              f' ({html.escape(base.label)}). <span class="key better">green</span> / <span class="key worse">red'
              f"</span>: significantly better / worse (p &lt; {ALPHA}; the task's higher_is_better); "
              '<span class="key changed">blue</span>: a significant change of a statistics row, which has no better '
              "or worse; † not comparable. Hover a cell for its p-value and test, a model for its path; click a "
              "header to sort.")
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in board.notes)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">'
            f'<meta name="viewport" content="width=device-width"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f'<nav>{links}<a href="#notes">notes</a></nav><p class="legend">{legend}</p>{views}{others}'
            f'<footer id="notes"><h2>Notes</h2><ul>{notes}</ul></footer><script>{SCRIPT}</script></body></html>\n')
