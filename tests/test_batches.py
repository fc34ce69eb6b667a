"""HostBatches, the ledger both hosts' glue uses to name each batch row by its document and hand its statistics to
the documents it served."""

from __future__ import annotations

import copy
from collections.abc import Callable
from types import SimpleNamespace

import pytest
from lmms_eval.api.instance import Instance

from lmms_lostattn.config.spec import Intervention, StatsConfig
from lmms_lostattn.intervention.prompt import InterventionError, RowLayout
from lmms_lostattn.model_wrappers.common.batches import HostBatches
from lmms_lostattn.model_wrappers.common.plugin import RunRecords
from lmms_lostattn.model_wrappers.lmms_eval.base import is_padding, request_name

_PROGRESS = SimpleNamespace(update=lambda n: None)


def _request(doc_id: int, **metadata: object) -> Instance:
    meta = {"task": "toy", "doc_id": doc_id, "repeats": 1, "split": "test", **metadata}
    return Instance("generate_until", ("q", {}, None, doc_id, "toy", "test"), 0, meta)


def _rows(requests: list, collector: object = None) -> tuple[HostBatches, RunRecords]:
    run = RunRecords(model="tiny", host="lmms_eval", intervention=Intervention(mode="none"), stats=StatsConfig())
    rows = HostBatches(
        [(request.args, request) for request in requests],
        "LostAttnX",
        run,
        collector,
        _PROGRESS,
        name=request_name,
        is_padding=is_padding,
    )
    return rows, run


def test_rows_are_named_by_their_documents_in_batch_order_and_repeat_for_beams() -> None:
    requests = [_request(doc_id) for doc_id in range(4)]
    rows, _ = _rows(requests)
    rows.batched([[requests[2].args], [requests[0].args]])
    rows.batched([[requests[1].args], [requests[3].args]], ends=[5, 3], continuation_starts=[4, 2])
    assert rows.next_prompt(2) == RowLayout(["toy/test/2", "toy/test/0"])
    assert rows.next_prompt(4) == RowLayout(["toy/test/1", "toy/test/3"], [5, 3], [4, 2])  # two beams each
    rows.finish(ran_all=True)


@pytest.mark.parametrize(
    ("act", "message"),
    [
        (lambda rows, requests: rows.batched([[("other",)]]), r"a request that is not among those it was given"),
        (lambda rows, requests: rows.next_prompt(1), r"beyond the batches it built"),
        (
            lambda rows, requests: (rows.batched([[r.args] for r in requests]), rows.next_prompt(1)),
            r"prompt of 1 rows for its batch of 3",
        ),
        (
            lambda rows, requests: (rows.batched([[requests[0].args]]), rows.finish(ran_all=True)),
            r"built 1 batch\(es\) it never ran",
        ),
        (
            lambda rows, requests: rows.batched([[requests[0].args], [requests[0].args]]),
            r"more often than it was given",
        ),
    ],
    ids=["unknown-arguments", "prompt-beyond-batches", "prompt-smaller-than-batch", "batch-never-ran", "twice"],
)
def test_rows_that_cannot_be_named_are_errors(act: Callable, message: str) -> None:
    requests = [_request(doc_id) for doc_id in range(3)]
    rows, _ = _rows(requests)
    with pytest.raises(InterventionError, match=rf"LostAttnX's base class .*{message}"):
        act(rows, requests)


def test_a_padding_copy_of_a_request_gets_no_statistics() -> None:
    """lmms-eval pads a short rank with shallow copies of its last request (the same argument tuple)."""
    real = _request(0)
    padding = copy.copy(real)
    padding.metadata = {**real.metadata, "__padding_only__": True}
    rows, run = _rows([real, padding], SimpleNamespace(take=lambda: [{"row": 0}, {"row": 1}]))
    rows.batched([[real.args], [padding.args]])
    rows.next_prompt(2)
    rows.finish(ran_all=True)
    assert run.records == {("toy", 0): [{"row": 0}]}


def test_a_shared_row_gives_its_record_to_each_request_it_serves() -> None:
    """A row serving several requests (lm-eval's multiple-choice rows: one context, one-token choices) gives its
    record to each of them, so that their document's statistics are the mean over its requests, as without the
    sharing; another document's row gives its own."""
    choices = [SimpleNamespace(task_name="mc", doc_id=7, key=("ctx", f" {c}")) for c in "ABC"]
    other = SimpleNamespace(task_name="mc", doc_id=8, key=("ctx2", " A"))
    run = RunRecords(model="tiny", host="lm_eval", intervention=Intervention(mode="none"), stats=StatsConfig())
    updates: list[int] = []
    rows = HostBatches(
        [(request.key, request) for request in [*choices, other]],
        "LostAttnX",
        run,
        SimpleNamespace(take=lambda: [{"row": 0}, {"row": 1}]),
        SimpleNamespace(update=updates.append),
        name=lambda r: f"{r.task_name}/{r.doc_id}",
    )
    rows.batched([[c.key for c in choices], [other.key]])
    assert rows.next_prompt(2).names == ["mc/7", "mc/8"]
    rows.finish(ran_all=True)
    assert run.records == {("mc", 7): [{"row": 0}] * 3, ("mc", 8): [{"row": 1}]}
    assert sum(updates) == 4  # the progress bar counts requests
