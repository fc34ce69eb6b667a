"""Statistics into lm-eval's own outputs, for any task and group.

lm-eval 0.4.13 takes metrics only from each task's ``process_results``, so the glue wraps
``lm_eval.evaluator.evaluate`` (once per process; it passes through unless its ``lm`` is a lostattn model, or
lm-eval's response cache around one). On the results it returns
(rank 0, after every rank's statistics records are gathered there), it adds, for every task and group:

* the rows ``lostattn_{rid,mixig}_{attn,ffn}`` with their ``_stderr`` (the mean over documents of each document's
  layer mean, stderr of that mean) and ``lostattn_samples`` (documents the rows cover: fewer than the task's when
  ``--use_cache`` answered some, or a document has fewer than two tokens of the rows' group), under lm-eval's
  ``none`` filter, so its table prints them and its results JSON holds them;
* each document's values in its ``--log_samples`` record;
* ``results["lostattn"]``: the intervention, its hash, the statistics settings, versions, and per task the
  per-layer means and stderrs (what lmms-eval runs write to the sidecar); a run without statistics gets this block
  too, with no tasks, so that every result carries its spec hash.

Before the requests run it checks the ``--use_cache`` database, if any (:func:`check_response_cache`): lm-eval keys
cached responses by request only, so a cache written under another intervention would answer this run's requests,
and one written under draws keyed by the document would answer a document with another's response; and it reads
``--samples`` (:func:`selection`), by which the requests of chosen documents are numbered. While they run, it notes
the documents answered from the cache, in part or whole (:func:`cached_documents`): they get no statistics.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lm_eval.api.metrics import mean, mean_stderr
from lm_eval.api.model import CachingLM
from loguru import logger

from lmms_lostattn.config.spec import SpecError
from lmms_lostattn.model_wrappers.common.patching import argument, wrap_once
from lmms_lostattn.model_wrappers.common.plugin import RunRecords, run_of
from lmms_lostattn.model_wrappers.common.results import (
    FILTER,
    LAYERS_METRIC,
    SAMPLES_METRIC,
    aggregate_layers,
    document_metrics,
)
from lmms_lostattn.statistics.collector import table_rows

CACHE_MARK = "lostattn:intervention"  # never one of lm-eval's cache keys (sha256 hex digests of the requests)


def _leaves(name: str, subtasks: dict[str, list[str]]) -> Iterable[str]:
    for child in subtasks.get(name, ()):
        yield from _leaves(child, subtasks) if child in subtasks else (child,)


def _rows(documents: list[dict[str, Any]], names: Iterable[str]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for name in names:
        values = [document[name] for document in documents if name in document]
        if values:
            rows[f"{name},{FILTER}"] = mean(values)
            rows[f"{name}_stderr,{FILTER}"] = mean_stderr(values) if len(values) > 1 else "N/A"
    rows[f"{SAMPLES_METRIC},{FILTER}"] = sum(document[SAMPLES_METRIC] for document in documents)
    return rows


def add_statistics(results: dict[str, Any], run: RunRecords) -> None:
    """Add the run's statistics rows, per-sample values and settings to lm-eval's ``results`` (see the module); without
    statistics, the settings only."""
    if run.stats.kind == "none":
        results["lostattn"] = {**run.describe(), "tasks": {}}
        return
    per_task: dict[str, dict[Any, dict[str, Any]]] = defaultdict(dict)
    for (task, doc_id), records in run.records.items():
        per_task[task][doc_id] = document_metrics(records, run.stats)
    subtasks = results.get("group_subtasks", {})
    names = list(table_rows(run.stats).values())
    for section in ("results", "groups"):
        for name, metrics in results.get(section, {}).items():
            tasks = list(_leaves(name, subtasks)) if name in subtasks else [name]
            documents = [document for task in tasks for document in per_task.get(task, {}).values()]
            metrics.update(_rows(documents, names))
    for task, samples in results.get("samples", {}).items():
        for sample in samples:
            values = per_task.get(task, {}).get(sample.get("doc_id"), {SAMPLES_METRIC: 0})
            sample.update({key: value for key, value in values.items() if key != LAYERS_METRIC})
    layers = {
        task: aggregate_layers([values[LAYERS_METRIC] for values in documents.values() if LAYERS_METRIC in values])
        for task, documents in per_task.items()
    }
    results["lostattn"] = {**run.describe(), "tasks": layers}


def gather_records(run: RunRecords, world_size: int) -> None:
    """Every rank's records on every rank, when lm-eval split the documents over ``world_size`` > 1 ranks (a
    collective: every rank calls it, after lm-eval's own gathers). lm-eval strides the documents over the ranks, so
    each document is one rank's; the padding requests a shorter rank repeats are skipped (the models'
    ``_with_padding_copies``)."""
    if world_size <= 1:
        return
    ranks: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(ranks, dict(run.records))
    merged: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for records in ranks:
        for document, rows in records.items():
            if document in merged:
                raise RuntimeError(
                    f"lostattn: document {document} has statistics on two ranks; lm-eval gives each "
                    "document to one rank (evaluator.py strides them), has that changed?"
                )
            merged[document] = rows
    run.records.clear()
    run.records.update(merged)


def check_response_cache(lm: Any, run: RunRecords) -> None:
    """Refuse a ``--use_cache`` database (``lm`` is then lm-eval's :class:`CachingLM`) whose responses were computed
    under another intervention than ``run``'s, and mark an unmarked one with ``run``'s.

    lm-eval keys a cached response by its request alone (``hash_args(method, request.args)``), not by the model's
    arguments: responses cached under ``attn=none`` would silently answer an ``attn=gaussian`` run's requests. A cache
    that holds responses but no mark was written without lostattn (plain ``hf``, or an older lostattn): it is taken as
    the unedited model's, which only ``attn=none`` may reuse. A refusal is a :class:`SpecError` (exit 2)."""
    if not isinstance(lm, CachingLM):
        return
    if run.intervention.draws_per_document:
        raise SpecError(
            f"lostattn: --use_cache with attn={run.intervention.mode}: lm-eval keys a cached response by its request "
            "alone, and this intervention's draws are keyed by the document, so two documents that send the same "
            "request (a shared context and option) would be answered with one document's response on a rerun. Run "
            "it without --use_cache"
        )
    database, wanted = lm.dbdict, run.intervention.to_dict()
    marked = database.get(CACHE_MARK)
    if marked is None and len(database) and run.intervention.mode != "none":
        raise SpecError(
            f"lostattn: --use_cache {lm.cache_db} holds {len(database)} responses written without lostattn (the "
            f"unedited model's), and this run edits attention (attn={run.intervention.mode}); lm-eval keys cached "
            "responses by request only, so they would answer this run's requests: give each intervention its own "
            "--use_cache path"
        )
    if marked is not None and marked != wanted:
        raise SpecError(
            f"lostattn: --use_cache {lm.cache_db} holds responses computed under the intervention {marked}, and "
            f"this run's is {wanted}; lm-eval keys cached responses by request only, so they would answer this run's "
            "requests: give each intervention its own --use_cache path"
        )
    if marked is None:
        database[CACHE_MARK] = wanted
        database.commit()


REQUEST_METHODS = ("loglikelihood", "loglikelihood_rolling", "generate_until")  # what CachingLM answers from its table


@contextmanager
def cached_documents(lm: Any, run: RunRecords) -> Iterator[set[tuple[str, Any]]]:
    """The documents of which ``lm`` (lm-eval's :class:`CachingLM`, else nothing is found) answers at least one
    request from its table, found once the block has run: the requests it was asked that never reached the model
    inside it. Such a document's statistics, where some of its requests ran, cover only those: the caller drops them
    (an interrupted run resumed from the cache leaves documents half cached)."""
    found: set[tuple[str, Any]] = set()
    if not isinstance(lm, CachingLM):
        yield found
        return
    asked: dict[int, Any] = {}
    ran: set[int] = set()

    def noting(owner: Any, method: str, seen: Any) -> None:
        answer = getattr(owner, method)  # for the cache, CachingLM.__getattr__'s function for it

        def answered(requests: list[Any]) -> Any:
            seen(requests)
            return answer(requests)

        setattr(owner, method, answered)

    for method in REQUEST_METHODS:
        noting(lm.lm, method, lambda requests: ran.update(map(id, requests)))
        noting(lm, method, lambda requests: asked.update((id(request), request) for request in requests))
    try:
        yield found
    finally:
        for method in REQUEST_METHODS:
            delattr(lm, method)
            delattr(lm.lm, method)
    found.update((request.task_name, run.document_id(request.task_name, request.doc_id))
                 for key, request in asked.items() if key not in ran)


def selection(samples: dict[str, list[int]] | None) -> dict[str, list[int]]:
    """``--samples`` per task, each list sorted without repeats, else a :class:`SpecError`: lm-eval runs the chosen
    documents in document order but names each by its place in the list as given (its samples log too), so another
    order or a repeat would name documents wrongly."""
    for task, ids in (samples or {}).items():
        if list(ids) != sorted(set(ids)):
            raise SpecError(
                f"lostattn: --samples gives {task} the documents {list(ids)}; give them in increasing order without "
                f"repeats ({sorted(set(ids))}): lm-eval runs them in document order but names each by its place in "
                "the list, so its samples log, the draws and the statistics would name other documents"
            )
    return dict(samples or {})


def refuse_edited_cache(lm: Any) -> None:
    """A model without lostattn (plain ``hf``) under ``lostattn-lm-eval``: refuse a ``--use_cache`` database marked
    with an intervention that edits attention, whose responses would answer as the model's own."""
    marked = lm.dbdict.get(CACHE_MARK) if isinstance(lm, CachingLM) else None
    if marked is not None and marked.get("mode") != "none":
        raise SpecError(
            f"lostattn: --use_cache {lm.cache_db} holds responses computed under the intervention {marked}, and this "
            "model runs without lostattn; lm-eval keys cached responses by request only, so they would answer as "
            "the model's own: give each intervention its own --use_cache path"
        )


def _warn_uncovered(results: dict[str, Any]) -> None:
    """Say which tasks have documents without statistics (answered from ``--use_cache``, or too short in the table's
    token group); inert on results without statistics rows."""
    for task, counts in results.get("n-samples", {}).items():
        covered = results["results"].get(task, {}).get(f"{SAMPLES_METRIC},{FILTER}")
        if covered is not None and covered < counts["effective"]:
            logger.warning(
                f"lostattn: {counts['effective'] - covered} of {counts['effective']} documents of {task} have no "
                "statistics (answered from --use_cache, or fewer than two tokens of the table's token group): its "
                f"statistics rows cover the other {covered}"
            )


def _evaluate(original: Any, *args: Any, **kwargs: Any) -> Any:
    lm = argument(original, "lm", args, kwargs)
    run = run_of(lm.lm if isinstance(lm, CachingLM) else lm)  # the model inside lm-eval's response cache
    if run is None:
        refuse_edited_cache(lm)
        return original(*args, **kwargs)
    check_response_cache(lm, run)
    run.records.clear()  # a model object may serve several evaluations (lm-eval's Python API)
    run.selected = selection(argument(original, "samples", args, kwargs))
    with cached_documents(lm, run) as cached:
        results = original(*args, **kwargs)
    for document in cached:  # their statistics would cover only the requests that were not cached
        run.records.pop(document, None)
    if run.stats.kind != "none":
        gather_records(run, lm.world_size)
    if results is not None:
        add_statistics(results, run)
        _warn_uncovered(results)
    return results


def install() -> None:
    """Wrap ``lm_eval.evaluator.evaluate`` (once per process)."""
    wrap_once("lm_eval.evaluator", "evaluate", _evaluate)
