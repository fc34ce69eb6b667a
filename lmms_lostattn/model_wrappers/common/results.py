"""The statistics rows both hosts add to a task's results: per document, then over documents.

Rows per task: ``lostattn_{rid,mixig}_{attn,ffn}`` (mean over samples of each sample's layer mean; RID rows named
by their definition where it is not the paper's, see :func:`lmms_lostattn.statistics.collector.table_row`) and
``lostattn_samples`` (documents the rows cover; fewer than the task's when a request cache answered some, or a
document has fewer than two tokens of the table's group, e.g. ``stats_groups=image`` on a text-only one), plus
the per-layer record behind them (:data:`LAYERS_METRIC`, for the sidecar).
"""

from __future__ import annotations

from typing import Any

from lmms_lostattn.config.spec import StatsConfig
from lmms_lostattn.statistics.collector import aggregate, layer_mean, mean_records, table_rows

PREFIX = "lostattn_"  # of every row the plugin adds
LAYERS_METRIC = f"{PREFIX}layers"
SAMPLES_METRIC = f"{PREFIX}samples"
FILTER = "none"  # the statistics rows' filter in both hosts' results, whatever filters the task has


def document_metrics(records: list[dict[str, Any]], stats: StatsConfig) -> dict[str, Any]:
    """The per-document metric values: table rows, coverage (1 where the rows have values), and the per-layer
    record for the sidecar."""
    if not records:
        return {SAMPLES_METRIC: 0}
    record = mean_records(records)
    group = stats.table_group
    values = {row: layer_mean(record, module, group, metric) for (metric, module), row in table_rows(stats).items()}
    defined = {row: value for row, value in values.items() if value is not None}
    return {**defined, SAMPLES_METRIC: int(bool(defined)), LAYERS_METRIC: record}


def aggregate_layers(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"samples": len(items), "per_layer": aggregate(items)}
