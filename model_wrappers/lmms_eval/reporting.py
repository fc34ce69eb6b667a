"""Statistics into lmms-eval's own outputs, for any task, without per-task YAMLs.

lmms-eval 0.7.3 has no metric hook for models, so the plugin wraps two of its functions, once per process and
inert unless a lostattn model registered a :class:`Run`:

* ``lmms_eval.evaluator._process_document_results`` (called per document, on the rank that generated it): adds
  the document's ``lostattn_*`` values to the task's own per-sample metrics, and registers their aggregations on
  the task. lmms-eval then gathers them across ranks, aggregates them with stderr, prints them in its table, and
  writes them to the results JSON and the ``--log_samples`` jsonl like any other metric.
* ``EvaluationTracker.save_results_aggregated``: moves the per-layer aggregate (an internal metric whose value is a
  dict) out of the table into a sidecar ``<date>_lostattn.json`` next to the results file, and records the
  intervention, its hash and the statistics settings in the results JSON under ``"lostattn"``.

Rows per task: ``lostattn_{rid,mixig}_{attn,ffn}`` (mean over samples of each sample's layer mean; RID rows named
by their definition where it is not the paper's, see :func:`lmms_lostattn.stats.table_row`) and
``lostattn_samples`` (documents with statistics; fewer than the task's when ``--use_cache`` answered some).
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

from lmms_eval import evaluator
from lmms_eval.api.metrics import mean
from lmms_eval.loggers.evaluation_tracker import EvaluationTracker
from loguru import logger

from lmms_lostattn.model_wrappers.plugin import Run
from lmms_lostattn.model_wrappers.results import LAYERS_METRIC, SAMPLES_METRIC, aggregate_layers, document_metrics
from lmms_lostattn.upstream import internal

_RUN: Run | None = None


def begin_run(run: Run) -> None:
    """Make ``run`` the one whose statistics and settings go into this process's lmms-eval outputs."""
    global _RUN
    _RUN = run
    _install()


_AGGREGATIONS = {SAMPLES_METRIC: sum, LAYERS_METRIC: aggregate_layers}  # the table rows: mean


def _process_document_results(original: Any, item: tuple, *, task: Any, **kwargs: Any) -> Any:
    processed = original(item, task=task, **kwargs)
    if _RUN is None or _RUN.stats.kind == "none":
        return processed
    doc_id, _, requests = item
    metrics = document_metrics(_RUN.records.get((requests[0].task_name, doc_id), []), _RUN.stats)
    aggregations = task.aggregation()
    for name in metrics:
        aggregations.setdefault(name, _AGGREGATIONS.get(name, mean))
    processed.metrics.update(metrics)
    if processed.logged_sample is not None:
        processed.logged_sample.update(metrics)
    return processed


def _save_results_aggregated(
    original: Any, tracker: EvaluationTracker, results: dict, *args: Any, **kwargs: Any
) -> Any:
    if _RUN is None:
        return original(tracker, results, *args, **kwargs)
    per_task = {}
    for task, metrics in results.get("results", {}).items():
        for key in [k for k in metrics if k.split(",")[0].startswith(LAYERS_METRIC)]:
            value = metrics.pop(key)
            if isinstance(value, dict):
                per_task[task] = value
    sidecar = {**_RUN.describe(), "tasks": per_task}
    results["lostattn"] = {k: sidecar[k] for k in ("spec_hash", "intervention", "stats", "versions")}
    saved = original(tracker, results, *args, **kwargs)
    if tracker.output_path and per_task:
        folder = pathlib.Path(tracker.output_path) / tracker.general_config_tracker.model_name_sanitized
        path = folder / f"{tracker.date_id}_lostattn.json"
        path.write_text(json.dumps(sidecar, indent=2, default=str))
        logger.info(f"lostattn: per-layer statistics written to {path}")
    elif per_task:
        logger.warning("lostattn: no --output_path, so the per-layer statistics sidecar was not written")
    return saved


@functools.cache
def _install() -> None:
    """Wrap the two lmms-eval functions (once per process; inert while no Run is registered)."""
    original_process = internal("lmms_eval.evaluator", "_process_document_results")
    evaluator._process_document_results = functools.wraps(original_process)(
        functools.partial(_process_document_results, original_process)
    )
    original_save = EvaluationTracker.save_results_aggregated

    @functools.wraps(original_save)
    def save(tracker: EvaluationTracker, results: dict, *args: Any, **kwargs: Any) -> Any:
        return _save_results_aggregated(original_save, tracker, results, *args, **kwargs)

    EvaluationTracker.save_results_aggregated = save
