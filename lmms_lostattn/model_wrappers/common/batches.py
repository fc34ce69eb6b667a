"""Which requests the rows of each prompt a host runs belong to, for both harnesses.

A host's glue tells :class:`HostBatches` about each batch its base class is about to run (the keys of the requests
each row serves, in row order); the scope asks for a new prompt's rows when its forward starts
(:meth:`HostBatches.next_prompt`, which names them for the draws); when the prompt ends, its statistics go to the
documents of the requests its rows served, once per request, and the progress bar advances by requests.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from lmms_lostattn.intervention.prompt import InterventionError, RowLayout
from lmms_lostattn.model_wrappers.common.plugin import RunRecords
from lmms_lostattn.statistics.collector import StatsCollector


class HostBatches:
    """The requests behind the rows of each prompt the model runs, in the order the base class batched them.

    ``keyed`` pairs each of the host's requests (objects with ``task_name`` and ``doc_id``) with what the base class's
    batches hold for it, its key (compared by identity: a request run twice, or lmms-eval's padding copies sharing a
    real request's arguments, give one key a queue of requests); ``name(request)`` names the row for the scope's
    draws; ``is_padding(request)``: a request whose statistics are not kept; ``progress``: a bar counting requests
    (``None`` where the base class counts them itself). A prompt that does not match its batch, a batch that never
    ran, or keys that are none of the requests' are errors: the rows would be misnamed.
    """

    def __init__(
        self,
        keyed: Iterable[tuple[object, Any]],
        wrapper: str,
        run: RunRecords,
        collector: StatsCollector | None,
        progress: Any | None,
        *,
        name: Callable[[Any], str],
        is_padding: Callable[[Any], bool] = lambda request: False,
    ) -> None:
        self._by_key: dict[int, deque[Any]] = {}
        for key, request in keyed:
            self._by_key.setdefault(id(key), deque()).append(request)
        self._wrapper = wrapper
        self._run = run
        self._collector = collector
        self._progress = progress
        self._name = name
        self._is_padding = is_padding
        self._queued: deque[tuple[list[list[Any]], RowLayout]] = deque()
        self._running: list[list[Any]] = []

    def batched(
        self,
        rows: Sequence[Sequence[object]],
        ends: Sequence[int] | None = None,
        continuation_starts: Sequence[int] | None = None,
    ) -> None:
        """The base class is about to run a batch: ``rows[i]`` the keys of the requests row i serves (one, or several
        for a row shared by requests, e.g. lm-eval's multiple-choice rows); ``ends`` and ``continuation_starts``
        for right-padded rows without a mask (see :class:`~lmms_lostattn.intervention.prompt.RowLayout`)."""
        served = [[self._take(key, len(rows)) for key in row] for row in rows]
        names = [self._name(requests[0]) for requests in served]
        self._queued.append((served, RowLayout(names, ends, continuation_starts)))

    def _take(self, key: object, batch: int) -> Any:
        queue = self._by_key.get(id(key))
        if not queue:
            raise InterventionError(
                f"lostattn: {self._wrapper}'s base class built a batch of {batch} with a request that is not among "
                "those it was given (or more often than it was given), so its rows cannot be named by their documents"
            )
        return queue.popleft()

    def next_prompt(self, rows: int) -> RowLayout:
        """The rows of a new prompt of ``rows`` rows (the next batch, each request repeated for beams)."""
        self._end_prompt()
        if not self._queued:
            raise InterventionError(
                f"lostattn: {self._wrapper}'s base class ran a prompt of {rows} rows beyond the batches it built"
            )
        served, layout = self._queued.popleft()
        if rows % len(served):
            raise InterventionError(
                f"lostattn: {self._wrapper}'s base class ran a prompt of {rows} rows for its batch of {len(served)} "
                "rows; the plugin follows only batches that run as one prompt (set follows_batches = frozenset() "
                "on the wrapper to run one request at a time)"
            )
        self._running = served
        return layout

    def finish(self, ran_all: bool = False) -> None:
        """The base class returned: the last prompt's statistics to its documents. ``ran_all``: every batch it built
        must have run (it runs its batches in one call); otherwise a batch that never ran (an error the base class
        swallowed before the model ran) is dropped, its requests without statistics."""
        self._end_prompt()
        if ran_all and self._queued:
            raise InterventionError(
                f"lostattn: {self._wrapper}'s base class built {len(self._queued)} batch(es) it never ran through "
                "the model; their requests have no intervention or statistics"
            )
        self._advance(sum(len(requests) for served, _ in self._queued for requests in served))
        self._queued.clear()

    def _end_prompt(self) -> None:
        served, self._running = self._running, []
        if self._collector is not None and served:
            self._hand_out(served, self._collector.take())
        self._advance(sum(map(len, served)))

    def _hand_out(self, served: list[list[Any]], records: list[dict[str, Any]]) -> None:
        """Row i's record (the first of its beams) to the document of each request row i served, once per request:
        a document's statistics are the mean over its requests whether or not they shared rows (lm-eval's logits
        cache runs one row for a document's options that share ``context + continuation[:-1]``)."""
        if not records:  # the prompt ran no prefill the collector saw
            return
        repeats = len(records) // len(served)
        for row, requests in enumerate(served):
            for request in requests:
                if not self._is_padding(request):
                    document = self._run.document_id(request.task_name, request.doc_id)
                    self._run.records[request.task_name, document].append(records[row * repeats])

    def _advance(self, requests: int) -> None:
        if self._progress is not None:
            self._progress.update(requests)
