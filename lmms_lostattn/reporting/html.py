"""One self-contained HTML leaderboard page: a sortable table (inline JS) and the plots as PNG data URIs."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping

from lmms_lostattn.reporting.tables import Table

STYLE = """body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ccc;padding:3px 8px;white-space:nowrap}td.n{text-align:right}
th{background:#eef;cursor:pointer;position:sticky;top:0}th[aria-sort=ascending]::after{content:" ▲"}
th[aria-sort=descending]::after{content:" ▼"}.wrap{overflow-x:auto}img{max-width:100%}"""

SCRIPT = """document.querySelectorAll("#board th").forEach((th, col) => th.addEventListener("click", () => {
  const body = document.querySelector("#board tbody"), up = th.getAttribute("aria-sort") !== "ascending";
  document.querySelectorAll("#board th").forEach(h => h.removeAttribute("aria-sort"));
  th.setAttribute("aria-sort", up ? "ascending" : "descending");
  const key = tr => { const v = tr.children[col].dataset.v; return v === "" || isNaN(v) ? v : Number(v); };
  const rows = [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
    return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1); });
  rows.forEach(tr => body.appendChild(tr));
}));"""


def page(title: str, table: Table, images: Mapping[str, bytes]) -> str:
    """The page: ``table`` sortable by clicking a header (numeric cells by value), notes, then ``images`` (PNG)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="{"n" if isinstance(cell.fields.get(""), float) else ""}" '
            f'data-v="{html.escape(str(cell.fields.get("") if cell.fields.get("") is not None else ""))}">'
            f"{html.escape(cell.text)}</td>" for cell in row) + "</tr>"
        for row in table.rows
    )
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in table.notes)
    figures = "".join(
        f'<h3>{html.escape(name)}</h3><img alt="{html.escape(name)}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}">' for name, png in images.items()
    )
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">'
            f'<title>{html.escape(title)}</title><style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>'
            f'<div class="wrap"><table id="board"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
            f"<ul>{notes}</ul>{figures}<script>{SCRIPT}</script></body></html>\n")
