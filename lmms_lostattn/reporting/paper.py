"""The paper's two tables, from the runs of ``lostattn reproduce``."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from lmms_lostattn.reporting.runs import LoadedRun
from lmms_lostattn.reporting.significance import ALPHA, TESTS, difference
from lmms_lostattn.reporting.tables import Cell, Table, estimate_cell, module_cells, primary_metric, text_cell

# The paper's Table 1: module averages over 15 models (RID, MixIG).
PAPER_TABLE1 = {"attention": (0.06, 0.61), "FFN": (0.21, 0.02), "Noise Δ": (0.61, -0.80), "Noise QKV": (0.44, -0.50)}


def reproduction_table1(vanilla: LoadedRun, noise_delta: LoadedRun, noise_qkv: LoadedRun) -> Table:
    """Table 1 under both references: attention, the FFN against its own input and against the layer's input
    (``stats=all``'s ``rid_layer``), Noise Δ and Noise QKV, with the paper's values beside."""
    tasks = [t for t in vanilla.tasks if vanilla.metric(t, vanilla.stat_row("rid", "attn")) is not None]
    header = ["row", "RID measured against", "run"] + [f"{t} {name}" for t in tasks for name in ("RID", "MixIG")]
    header += ["RID (paper)", "MixIG (paper)"]

    def row(label: str, against: str, run: LoadedRun, module: str, layer_reference: bool = False) -> list[Cell]:
        paper = [text_cell(f"{value:.2f}") for value in PAPER_TABLE1[label]]
        return [text_cell(label), text_cell(against), text_cell(run.name),
                *module_cells(run, tasks, module, layer_reference), *paper]

    rows = [row("attention", "the layer's input (its own)", vanilla, "attn"),
            row("FFN", "the FFN's input", vanilla, "ffn"),
            row("FFN", "the layer's input", vanilla, "ffn", layer_reference=True),
            row("Noise Δ", "the layer's input (its own)", noise_delta, "attn"),
            row("Noise QKV", "the layer's input (its own)", noise_qkv, "attn")]
    return Table(header, rows, ["mean ± stderr over samples of each sample's mean over layers; the paper's values "
                                "are its averages over 15 models", "MixIG is TME(X') - TME(X) of the module's input"])


def reproduction_table2(vanilla: LoadedRun, saps: Sequence[LoadedRun]) -> Table:
    """Table 2: each task's headline metric, vanilla against the SAP runs (one per seed): mean ± sd over the seeds,
    the mean difference, and each seed's paired test against vanilla, in the order of the seeds its header names."""
    tasks = [t for t in vanilla.tasks if primary_metric([vanilla], t)]
    seeds = ", ".join(str(run.block["intervention"].get("seed", "?")) for run in saps)
    header = ["task", "metric", "vanilla", f"SAP mean ± sd ({len(saps)} seeds)", "Δ mean", f"p per seed ({seeds})"]
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
            text_cell(task), text_cell(metric), Cell("—" if base is None else f"{base:.4f}", {"": base}),
            estimate_cell(mean, sd, "sd"),
            Cell("—" if mean is None or base is None else f"{mean - base:+.4f}",
                 {"": None if mean is None or base is None else mean - base}),
            Cell(ps, {"": ps}),
        ])
    notes = [f"paired test per seed: {TESTS}; p < {ALPHA} is significant"]
    return Table(header, rows, notes)
