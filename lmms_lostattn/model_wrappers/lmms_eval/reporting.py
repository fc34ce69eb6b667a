"""Statistics into lmms-eval's own outputs, for any task, without per-task YAMLs.

lmms-eval 0.7.3 has no metric hook for models, so the glue wraps two of its functions, once per process; both pass
through unless their arguments carry a lostattn model or its results:

* ``lmms_eval.evaluator.evaluate(lm, ...)``: for a lostattn ``lm``, ``_process_document_results`` (called per
  document, on the rank that generated it) is wrapped for the call to add the document's ``lostattn_*`` values to
  the task's own per-sample metrics and register their aggregations on the task. lmms-eval then gathers them across
  ranks, aggregates them with stderr, prints them in its table, and writes them to the results JSON and the
  ``--log_samples`` jsonl like any other metric. On the results it returns, the per-layer aggregate (an internal
  metric whose value is a dict) moves out of the table into ``results["lostattn"]`` with the intervention, its hash
  and the statistics settings.
* ``EvaluationTracker.save_results_aggregated``: writes the per-layer aggregate of ``results["lostattn"]`` to a
  sidecar ``<date>_lostattn.json`` next to the results file, and the rest of the block into the results JSON.

Rows per task: ``lostattn_{rid,mixig}_{attn,ffn}`` (mean over samples of each sample's layer mean; RID rows named
by their definition where it is not the paper's, see :func:`lmms_lostattn.statistics.collector.table_row`) and
``lostattn_samples`` (documents the rows cover; fewer than the task's when ``--use_cache`` answered some, or a
document has fewer than two tokens of the rows' group), under the ``none`` filter whatever filters the task has.
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

from lmms_lostattn.model_wrappers.common.patching import argument, swapped, wrap_once
from lmms_lostattn.model_wrappers.common.plugin import RunRecords, run_of
from lmms_lostattn.model_wrappers.common.results import (
    FILTER,
    LAYERS_METRIC,
    PREFIX,
    SAMPLES_METRIC,
    aggregate_layers,
    document_metrics,
)
from lmms_lostattn.reporting.runs import RESULTS_SUFFIX

_AGGREGATIONS = {SAMPLES_METRIC: sum, LAYERS_METRIC: aggregate_layers}  # the table rows: mean


def _process_document_results(original: Any, run: RunRecords, item: tuple, *, task: Any, **kwargs: Any) -> Any:
    processed = original(item, task=task, **kwargs)
    doc_id, _, requests = item
    metrics = document_metrics(run.records.get((requests[0].task_name, doc_id), []), run.stats)
    aggregations = task.aggregation()
    for name in metrics:
        aggregations.setdefault(name, _AGGREGATIONS.get(name, mean))
    processed.metrics.update(metrics)
    if processed.logged_sample is not None:
        processed.logged_sample.update(metrics)
    return processed


def _evaluate(original: Any, *args: Any, **kwargs: Any) -> Any:
    run = run_of(argument(original, "lm", args, kwargs))
    if run is None:
        return original(*args, **kwargs)
    try:
        if run.stats.kind == "none":
            results = original(*args, **kwargs)
        else:
            def with_statistics(process: Any) -> Any:
                return functools.partial(_process_document_results, process, run)

            with swapped([evaluator], "_process_document_results", with_statistics):
                results = original(*args, **kwargs)
    finally:  # in lmms-eval's results now; a run of thousands of documents keeps none of them for the process
        run.records.clear()
    if results is not None:  # rank 0
        per_task = {}
        for metrics in results.get("groups", {}).values():
            _under_one_filter(metrics)
        for task, metrics in results.get("results", {}).items():
            _under_one_filter(metrics)
            for key in [k for k in metrics if k.split(",")[0].startswith(LAYERS_METRIC)]:
                value = metrics.pop(key)
                if isinstance(value, dict):
                    per_task[task] = value
        results["lostattn"] = {**run.describe(), "tasks": per_task}
    return results


def _under_one_filter(metrics: dict[str, Any]) -> None:
    """Move a task's statistics rows under :data:`FILTER`, once: lmms-eval aggregates every per-document metric per
    filter of the task (``lostattn_rid_attn,flexible-extract``), and a document's statistics are the same under each.
    """
    for key in [key for key in metrics if key.startswith(PREFIX) and key.partition(",")[2] != FILTER]:
        value = metrics.pop(key)
        metrics.setdefault(f"{key.partition(',')[0]},{FILTER}", value)


def _save_results_aggregated(
    original: Any, tracker: EvaluationTracker, results: dict, *args: Any, **kwargs: Any
) -> Any:
    if "lostattn" not in results:
        return original(tracker, results, *args, **kwargs)
    sidecar = results["lostattn"]
    results["lostattn"] = {key: value for key, value in sidecar.items() if key not in ("model", "tasks")}
    saved = original(tracker, results, *args, **kwargs)
    if tracker.output_path and sidecar["tasks"]:
        folder = pathlib.Path(tracker.output_path) / tracker.general_config_tracker.model_name_sanitized
        date_id = getattr(tracker, "date_id", None)  # set by a save that got as far as the file
        if date_id is None or not (folder / f"{date_id}{RESULTS_SUFFIX}").is_file():
            logger.warning("lostattn: lmms-eval saved no results file, so the per-layer statistics sidecar was not "
                           "written either")
            return saved
        path = folder / f"{date_id}_lostattn.json"
        path.write_text(json.dumps(sidecar, indent=2, default=str))
        logger.info(f"lostattn: per-layer statistics written to {path}")
    elif sidecar["tasks"]:
        logger.warning("lostattn: no --output_path, so the per-layer statistics sidecar was not written")
    return saved


def install() -> None:
    """Wrap lmms-eval's ``evaluate`` and ``EvaluationTracker.save_results_aggregated`` (once per process)."""
    wrap_once("lmms_eval.evaluator", "evaluate", _evaluate)
    wrap_once(
        "lmms_eval.loggers.evaluation_tracker", "EvaluationTracker.save_results_aggregated", _save_results_aggregated
    )
