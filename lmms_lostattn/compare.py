"""Tables and paired tests over loaded runs (pure functions; formatting in :func:`markdown` and :func:`csv_text`).

Significance: a difference is marked ``*`` when its paired test gives p < ``ALPHA`` (0.05). The test runs on the
per-sample values of the ``--log_samples`` logs, and only when the task's aggregate is the mean of those values
(POPE's F1 is not, its accuracy is): exact McNemar when every value is 0 or 1, else a paired bootstrap. A pair of
runs that cannot be compared on a task (see :func:`lmms_lostattn.runs.comparability`) gets no delta, only ``†``.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmms_lostattn.runs import Run, RunError, comparability, version_changes

ALPHA = 0.05
BOOTSTRAP_ITERATIONS = 10_000
BOOTSTRAP_SEED = 0
MODULE_ROWS = {"none": (("attention", "attn"), ("FFN", "ffn")), "noise_delta": (("Noise Δ", "attn"),),
               "noise_qkv": (("Noise QKV", "attn"),)}


def mcnemar(base: Sequence[float], other: Sequence[float]) -> float:
    """Exact two-sided McNemar test on paired 0/1 outcomes.

    With b = #(base 1, other 0) and c = #(base 0, other 1): p = min(1, 2·P(X ≤ min(b, c))), X ~ Binomial(b + c, ½)
    (so p = 1 when there are no discordant pairs).
    """
    b = sum(1 for x, y in zip(base, other, strict=True) if x == 1 and y == 0)
    c = sum(1 for x, y in zip(base, other, strict=True) if x == 0 and y == 1)
    tail = sum(math.comb(b + c, k) for k in range(min(b, c) + 1)) / 2 ** (b + c)
    return min(1.0, 2 * tail)


def paired_bootstrap(base: Sequence[float], other: Sequence[float], iterations: int = BOOTSTRAP_ITERATIONS,
                     seed: int = BOOTSTRAP_SEED) -> float:
    """Two-sided paired bootstrap test of mean(other − base) = 0.

    Documents are resampled with replacement ``iterations`` times (``numpy.random.default_rng(seed)``); with d̄* the
    resampled mean differences, p = min(1, 2·min(P(d̄* ≤ 0), P(d̄* ≥ 0))).
    """
    diff = np.asarray(other, dtype=float) - np.asarray(base, dtype=float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(iterations, len(diff)))].mean(axis=1)
    return float(min(1.0, 2 * min(np.mean(means <= 0), np.mean(means >= 0))))


def sample_scores(run: Run, task: str, metric: str) -> dict[int, float] | None:
    """Per-document values of ``metric`` from the samples log (a number, or a dict's ``score`` as POPE logs)."""
    if task not in run.samples:
        return None
    scores = {}
    for doc, sample in run.samples[task].items():
        value = sample.get(metric)
        value = value.get("score") if isinstance(value, dict) else value
        if not isinstance(value, int | float) or isinstance(value, bool):
            return None
        scores[doc] = float(value)
    return scores


@dataclass(frozen=True)
class Difference:
    """``other − base`` on one task metric, with its paired test; ``delta`` is None when not comparable."""

    delta: float | None
    p: float | None = None
    test: str = ""  # "McNemar", "bootstrap", or why there is no test

    @property
    def significant(self) -> bool:
        return self.p is not None and self.p < ALPHA


def difference(base: Run, other: Run, task: str, metric: str) -> Difference:
    """Aggregate difference of ``metric`` on ``task`` and its paired test (see the module docstring)."""
    problem = comparability(base, other, task)
    if problem:
        return Difference(None, test=f"not comparable: {problem}")
    values = base.metric(task, metric), other.metric(task, metric)
    if values[0] is None or values[1] is None:
        return Difference(None, test=f"{metric} missing from a run")
    delta = values[1] - values[0]
    scores = [sample_scores(run, task, metric) for run in (base, other)]
    if scores[0] is None or scores[1] is None:
        return Difference(delta, test="no per-sample values")
    for per_doc, value in zip(scores, values, strict=True):
        if not math.isclose(sum(per_doc.values()) / len(per_doc), value, rel_tol=1e-9, abs_tol=1e-12):
            return Difference(delta, test="aggregate is not a per-sample mean")
    docs = sorted(scores[0])
    pairs = [scores[0][d] for d in docs], [scores[1][d] for d in docs]
    if all(v in (0.0, 1.0) for v in (*pairs[0], *pairs[1])):
        return Difference(delta, mcnemar(*pairs), "McNemar")
    return Difference(delta, paired_bootstrap(*pairs), "bootstrap")


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


def _text(value: str) -> Cell:
    return Cell(value, {"": value})


def _estimate_cell(mean: float | None, spread: float | None, name: str = "stderr") -> Cell:
    """``mean ± spread`` (the spread's raw value in the CSV column ``<column> <name>``); ``—`` without a mean."""
    if mean is None:
        return Cell("—", {"": None, name: None})
    return Cell(f"{mean:.4f}" + (f" ± {spread:.4f}" if spread is not None else ""), {"": mean, name: spread})


def _mean_cell(run: Run, task: str, metric: str) -> Cell:
    return _estimate_cell(run.metric(task, metric), run.stderr(task, metric))


def _tasks(runs: Sequence[Run]) -> list[str]:
    return sorted({task for run in runs for task in run.tasks})


def primary_metric(runs: Sequence[Run], task: str) -> str | None:
    """The task's own headline metric: the first non-lostattn metric in the first run that has the task."""
    for run in runs:
        own = [m for m in run.metrics(task) if not m.startswith("lostattn_")]
        if own:
            return own[0]
    return None


def module_table(runs: Sequence[Run]) -> Table:
    """Paper Table 1: RID and MixIG of attention and FFN (vanilla runs), Noise Δ / Noise QKV (attention, those runs)."""
    tasks = [t for t in _tasks(runs) if any(r.metric(t, r.stat_row("rid", "attn")) is not None for r in runs)]
    header = ["model", "row", "run"] + [f"{task} {name}" for task in tasks for name in ("RID", "MixIG")]
    rank = {mode: i for i, mode in enumerate(MODULE_ROWS)}
    chosen = sorted((run for run in runs if run.mode in MODULE_ROWS), key=lambda run: (run.model, rank[run.mode]))
    rows = [[_text(run.model), _text(_definition(label, run, module)), _text(run.name)]
            + [_mean_cell(run, task, run.stat_row(metric, module)) for task in tasks for metric in ("rid", "mixig")]
            for run in chosen for label, module in MODULE_ROWS[run.mode]]
    return Table(header, rows, ["mean ± stderr over samples of each sample's mean over layers"])


def _definition(label: str, run: Run, module: str) -> str:
    """A Table 1 row label, with the RID row's name where its definition is not the paper's."""
    row = run.stat_row("rid", module)
    return label if row == f"lostattn_rid_{module}" else f"{label} ({row})"


def accuracy_table(runs: Sequence[Run]) -> Table:
    """Paper Table 2: each task's headline metric, vanilla runs first, then each intervention."""
    tasks = [t for t in _tasks(runs) if primary_metric(runs, t)]
    header = ["model", "intervention", "run"] + [f"{task} {primary_metric(runs, task)}" for task in tasks]
    ordered = sorted(runs, key=lambda r: (r.model, r.mode != "none"))
    rows = [[_text(r.model), _text(r.label), _text(r.name)] + [_mean_cell(r, t, primary_metric(runs, t)) for t in tasks]
            for r in ordered]
    return Table(header, rows, ["mean ± stderr as the harness reports it (lmms-eval: bootstrap, else CLT)"])


def _difference_cell(run: Run, base: Run, task: str, metric: str) -> Cell:
    value = run.metric(task, metric)
    fields: dict[str, Any] = {"": value, "delta": None, "p": None, "test": ""}
    if value is None:
        return Cell("—", fields)
    if run is base:
        return Cell(f"{value:.4f}", {**fields, "test": "baseline"})
    diff = difference(base, run, task, metric)
    fields.update(delta=diff.delta, p=diff.p, test=diff.test)
    if diff.delta is None:
        return Cell(f"{value:.4f} (†)", fields)
    shown = f"{diff.delta:+.4f}" if diff.delta == 0 or abs(diff.delta) >= 1e-3 else f"{diff.delta:+.1e}"
    return Cell(f"{value:.4f} ({shown}{'*' if diff.significant else ''})", fields)


def leaderboard(runs: Sequence[Run], base: Run) -> Table:
    """One row per run (model, intervention); one column per task metric and RID/MixIG row, with deltas vs ``base``."""
    columns = [(task, metric) for task in _tasks(runs)
               for metric in dict.fromkeys(m for r in runs for m in r.metrics(task))]
    columns.sort(key=lambda c: (c[0], c[1].startswith("lostattn_")))
    header = ["model", "intervention", "run"] + [f"{task}/{metric}" for task, metric in columns]
    ordered = [base] + [r for r in runs if r is not base]
    rows = [[_text(r.model), _text(r.label), _text(r.name)] + [_difference_cell(r, base, *c) for c in columns]
            for r in ordered]
    notes = [f"baseline: {base.name} ({base.label}); cells: value (delta vs baseline)",
             f"* paired test p < {ALPHA} (exact McNemar for 0/1 per-sample scores, else paired bootstrap, "
             f"{BOOTSTRAP_ITERATIONS} resamples, seed {BOOTSTRAP_SEED}); no mark: not significant, or no "
             "per-sample test",
             "† not comparable with the baseline (different tasks, documents or --limit): no delta"]
    notes += sorted({f"† {r.name}: {problem}" for r in runs for task in _tasks(runs)
                     if r is not base and (problem := comparability(base, r, task))})
    notes += [f"{r.name}: versions differ from the baseline ({', '.join(changes)})" for r in ordered[1:]
              if (changes := version_changes(base, r))]
    return Table(header, rows, notes)


def markdown(table: Table) -> str:
    """The table as GitHub Markdown, notes below it."""
    lines = ["| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(cell.text.replace("|", "\\|") for cell in row) + " |" for row in table.rows]
    return "\n".join(lines + [""] + [f"{note}  " for note in table.notes]) + "\n"


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


def check(base: Run, run: Run, max_drop: float, metrics: Sequence[str] = ()) -> list[tuple[str, str]]:
    """Regression gate: ``(status, line)`` per metric, status ``FAILED``, ``ok`` or ``skipped``.

    A metric fails when it falls more than ``max_drop`` below the baseline (in its ``higher_is_better`` direction,
    higher when not recorded) and its paired test gives p < ``ALPHA``.

    ``metrics`` entries are ``metric`` (every common task having it) or ``task/metric``; by default every own
    metric of every task that can be tested per sample. Raises :class:`RunError` when the runs cannot be compared
    (different tasks, documents or --limit, no samples logs) or a requested metric cannot be tested.
    """
    tasks = sorted(set(base.tasks) | set(run.tasks))
    problems = [problem for task in tasks if (problem := comparability(base, run, task))]
    if problems:
        raise RunError(f"{run.path} vs baseline {base.path}: {'; '.join(problems)}")
    missing = [(r.path, task) for task in tasks for r in (base, run) if task not in r.samples]
    if missing:
        raise RunError(f"{missing[0][0]}: no samples log for {missing[0][1]}; run the harness with --log_samples")
    wanted = [m.split("/", 1) if "/" in m else [None, m] for m in metrics]
    selected = [(task, metric) for task in base.tasks for metric in base.metrics(task)
                if (any(t in (None, task) and m == metric for t, m in wanted) if wanted
                    else not metric.startswith("lostattn_"))]
    for task, metric in wanted:
        if not any(m == metric and task in (None, t) for t, m in selected):
            raise RunError(f"--metrics: {task + '/' if task else ''}{metric} is in no task of {base.path}")
    lines = []
    for task, metric in selected:
        diff = difference(base, run, task, metric)
        if diff.p is None:
            if wanted:
                raise RunError(f"{task}/{metric}: cannot be tested per sample ({diff.test})")
            lines.append(("skipped", f"{task}/{metric}: {diff.test}"))
            continue
        higher = base.results.get("higher_is_better", {}).get(task, {}).get(metric, True)
        drop = -diff.delta if higher else diff.delta
        line = (f"{task}/{metric}: {base.metric(task, metric):.4f} -> {run.metric(task, metric):.4f} "
                f"(drop {drop:+.4f}, bound {max_drop}, {diff.test} p={diff.p:.4g})")
        lines.append(("FAILED" if drop > max_drop and diff.significant else "ok", line))
    return lines


# --- lostattn reproduce: the paper's two tables ----------------------------------------------------------------

# The paper's Table 1: module averages over 15 models (RID, MixIG).
PAPER_TABLE1 = {"attention": (0.06, 0.61), "FFN": (0.21, 0.02), "Noise Δ": (0.61, -0.80), "Noise QKV": (0.44, -0.50)}


def _sidecar_cell(run: Run, task: str, module: str, metric: str) -> Cell:
    """A layer-averaged statistic from the sidecar (for values that have no table row, e.g. ``rid_layer``)."""
    group = run.block.get("stats", {}).get("table_group") or "all"
    overall = (((run.sidecar or {}).get("tasks", {}).get(task, {}).get("per_layer", {}).get(module, {})
                .get(group, {}).get(metric, {})).get("overall", {}))
    return _estimate_cell(overall.get("mean"), overall.get("stderr"))


def reproduction_table1(vanilla: Run, noise_delta: Run, noise_qkv: Run) -> Table:
    """Table 1 under both references: attention, the FFN against its own input and against the layer's input
    (``stats=all``'s ``rid_layer``), Noise Δ and Noise QKV, with the paper's values beside."""
    tasks = [t for t in vanilla.tasks if vanilla.metric(t, vanilla.stat_row("rid", "attn")) is not None]
    header = ["row", "RID measured against", "run"] + [f"{t} {name}" for t in tasks for name in ("RID", "MixIG")]
    header += ["RID (paper)", "MixIG (paper)"]

    def row(label: str, against: str, run: Run, module: str, layer_reference: bool = False) -> list[Cell]:
        cells = []
        for task in tasks:
            rid = (_sidecar_cell(run, task, module, "rid_layer") if layer_reference
                   else _mean_cell(run, task, run.stat_row("rid", module)))
            cells += [rid, _mean_cell(run, task, run.stat_row("mixig", module))]
        paper = [_text(f"{value:.2f}") for value in PAPER_TABLE1[label]]
        return [_text(label), _text(against), _text(run.name), *cells, *paper]

    rows = [row("attention", "the layer's input (its own)", vanilla, "attn"),
            row("FFN", "the FFN's input", vanilla, "ffn"),
            row("FFN", "the layer's input", vanilla, "ffn", layer_reference=True),
            row("Noise Δ", "the layer's input (its own)", noise_delta, "attn"),
            row("Noise QKV", "the layer's input (its own)", noise_qkv, "attn")]
    return Table(header, rows, ["mean ± stderr over samples of each sample's mean over layers; the paper's values "
                                "are its averages over 15 models", "MixIG is TME(X') - TME(X) of the module's input"])


def reproduction_table2(vanilla: Run, saps: Sequence[Run]) -> Table:
    """Table 2: each task's headline metric, vanilla against the SAP runs (one per seed): mean ± sd over the seeds,
    the mean difference, and each seed's paired test against vanilla."""
    tasks = [t for t in vanilla.tasks if primary_metric([vanilla], t)]
    header = ["task", "metric", "vanilla", f"SAP mean ± sd ({len(saps)} seeds)", "Δ mean", "p per seed"]
    rows = []
    for task in tasks:
        metric = primary_metric([vanilla], task)
        base = vanilla.metric(task, metric)
        values = [v for run in saps if (v := run.metric(task, metric)) is not None]
        mean = sum(values) / len(values) if values else None
        sd = statistics.stdev(values) if len(values) > 1 else None
        tests = [difference(vanilla, run, task, metric) for run in saps]
        ps = ", ".join("—" if t.p is None else f"{t.p:.3g}" for t in tests)
        rows.append([
            _text(task), _text(metric), Cell("—" if base is None else f"{base:.4f}", {"": base}),
            _estimate_cell(mean, sd, "sd"),
            Cell("—" if mean is None or base is None else f"{mean - base:+.4f}",
                 {"": None if mean is None or base is None else mean - base}),
            Cell(ps, {"": ps}),
        ])
    notes = [f"paired test per seed: exact McNemar for 0/1 per-sample scores, else paired bootstrap "
             f"({BOOTSTRAP_ITERATIONS} resamples); p < {ALPHA} is significant"]
    return Table(header, rows, notes)
