"""``lostattn-hf`` and ``lostattn-hf-multimodal``: lm-eval's ``hf`` (:class:`HFLM`) and ``hf-multimodal``
(:class:`HFMultimodalLM`) with the plugin's arguments.

Every request type runs in the base class's own batches, inside one intervention scope per call:

* scoring (``loglikelihood``, ``loglikelihood_rolling``): lm-eval right-pads each batch with no attention mask and,
  with ``logits_cache``, runs one row for every request sharing ``context + continuation[:-1]`` (multiple choice).
  The glue follows lm-eval's ``Collator`` batches and tells the scope each row's real length and where its
  continuation starts (``attn_rows=last`` edits the rows that predict the continuation; statistics cover real tokens
  only); a shared row is run, edited and measured once, its record counted for each request it serves (requests of
  different documents never share a row: its draws are its document's);
* generation (``generate_until``): left-padded with a mask, as lmms-eval's batching classes.

Rows are named ``task/doc_id`` for the draws. ``batch_size=auto`` is refused under an intervention or statistics: it
probes memory with dummy batches through the model, which the scope would take for requests.
"""

from __future__ import annotations

import copy
import inspect
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lm_eval.models.hf_vlms as lm_eval_hf_vlms
import lm_eval.models.huggingface as lm_eval_huggingface
from lm_eval import utils as lm_eval_utils
from lm_eval.api.instance import Instance
from lm_eval.api.registry import register_model
from lm_eval.models.hf_vlms import HFMultimodalLM
from lm_eval.models.huggingface import HFLM

from lmms_lostattn.config.spec import SpecError
from lmms_lostattn.intervention.scope import InterventionError, Scope
from lmms_lostattn.model_wrappers.common.batches import HostBatches
from lmms_lostattn.model_wrappers.common.patching import swapped
from lmms_lostattn.model_wrappers.common.plugin import Plugin, RunRecords
from lmms_lostattn.model_wrappers.lm_eval.reporting import install

Window = tuple[Any, list[int], list[int]]  # lm-eval's scoring request: (strings or None, context, continuation)


def request_name(request: Instance, run: RunRecords) -> str:
    """A request's row name for the draws: ``task/doc_id`` (the document's id, also under ``--samples``)."""
    return f"{request.task_name}/{run.document_id(request.task_name, request.doc_id)}"


class LostAttnLMMixin:
    """The lostattn arguments on an lm-eval ``HFLM`` class; everything else is the base class."""

    def __init__(self, **kwargs: Any) -> None:
        self.lostattn = Plugin.from_model_kwargs(kwargs, inspect.signature(super().__init__).parameters, "lm_eval")
        if self.lostattn.active and str(kwargs.get("batch_size", 1)).startswith("auto"):
            raise SpecError(
                f"lostattn: batch_size={kwargs['batch_size']} probes memory with dummy batches through the model, "
                "which an intervention or statistics would take for requests; give a number (e.g. --batch_size 8)"
            )
        self._keyed: Callable[[list[Window]], list[tuple[object, Instance]]] | None = None  # see _scoring
        self._padding: frozenset[int] = frozenset()  # see _with_padding_copies
        super().__init__(**kwargs)
        self.lostattn.loaded(self.model)
        install()

    # the base classes' own signatures pass through: hf-multimodal's loglikelihood_rolling takes no disable_tqdm
    def loglikelihood(self, requests: list[Instance], *args: Any, **kwargs: Any) -> list[Any]:
        if not self.lostattn.active:
            return super().loglikelihood(requests, *args, **kwargs)
        requests = self._with_padding_copies(requests)
        with self._scoring(requests, _pairs_in_order):
            return super().loglikelihood(requests, *args, **kwargs)

    def loglikelihood_rolling(self, requests: list[Instance], *args: Any, **kwargs: Any) -> list[Any]:
        if not self.lostattn.active:
            return super().loglikelihood_rolling(requests, *args, **kwargs)
        requests = self._with_padding_copies(requests)
        with self._scoring(requests, self._windows_by_tokens):
            return super().loglikelihood_rolling(requests, *args, **kwargs)

    def generate_until(self, requests: list[Instance], *args: Any, **kwargs: Any) -> list[Any]:
        if not self.lostattn.active:
            return super().generate_until(requests, *args, **kwargs)
        requests = self._with_padding_copies(requests)
        with self._scope([(request.args, request) for request in requests], scoring=False):
            return super().generate_until(requests, *args, **kwargs)

    def _with_padding_copies(self, requests: list[Instance]) -> list[Instance]:
        """``requests`` with lm-eval's padding as copies the statistics skip (:attr:`_padding`). On several ranks,
        lm-eval pads a rank's requests with its last request again (``evaluator.py``: ``[req] * req.repeats`` per
        missing one): those rows give its document that request's record once more, which weighs one option of a
        multiple-choice document twice. Only the arguments reach the base class, the same in a copy."""
        last = requests[-1] if requests and self.world_size > 1 else None
        trailing = next((index for index, request in enumerate(reversed(requests)) if request is not last),
                        len(requests))
        extra = trailing - (last.repeats or 1) if last is not None else 0
        self._padding = frozenset()
        copies = [self._padding_copy(last) for _ in range(max(extra, 0))]
        return [*requests[: len(requests) - len(copies)], *copies]

    def _padding_copy(self, request: Instance) -> Instance:
        """A copy of ``request`` for a row lm-eval runs only to pad a rank; the statistics skip it (:attr:`_padding`).
        """
        padding = copy.copy(request)
        self._padding |= {id(padding)}
        return padding

    def _loglikelihood_tokens(self, requests: list[Window], *args: Any, **kwargs: Any) -> list[Any]:
        if self._keyed is None:  # not within a scoring call of ours (inactive)
            return super()._loglikelihood_tokens(requests, *args, **kwargs)
        with self._scope(self._keyed(requests), scoring=True):
            return super()._loglikelihood_tokens(requests, *args, **kwargs)

    @contextmanager
    def _scoring(self, requests: list[Instance], keyed: Callable[..., Any]) -> Iterator[None]:
        """While a scoring call runs: how the requests of each ``_loglikelihood_tokens`` call map to instances
        (``keyed(requests)`` returns that mapping for a list of scoring requests)."""
        self._keyed = keyed(requests)
        try:
            yield
        finally:
            self._keyed = None

    @contextmanager
    def _scope(self, keyed: list[tuple[object, Instance]], scoring: bool) -> Iterator[None]:
        """One intervention scope around one call of the base class, following its ``Collator`` batches."""
        with self.lostattn.scope(self.model) as (scope, collector):
            run = self.lostattn.run
            rows = HostBatches(keyed, type(self).__name__, run, collector, None,
                               name=lambda request: request_name(request, run),
                               is_padding=lambda request: id(request) in self._padding)
            documents = {id(key): request_name(request, run) for key, request in reversed(keyed)}
            with _following_batches(rows, scope, self.max_length if scoring else None, documents):
                yield
            scope.raise_pending()
            rows.finish(ran_all=True)

    def _windows_by_tokens(self, requests: list[Instance]) -> Callable[[list[Window]], list[tuple[object, Instance]]]:
        """``loglikelihood_rolling`` cuts each document into windows inside one call: find each window's document
        by its tokens, as lm-eval cuts them (``utils.get_rolling_token_windows``, context length 1)."""
        by_tokens: dict[tuple, deque[Instance]] = {}
        for request in requests:
            for context, continuation in map(
                lm_eval_utils.make_disjoint_window,
                lm_eval_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(request.args[0]),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                by_tokens.setdefault((tuple(context), tuple(continuation)), deque()).append(request)

        last_owner: dict[tuple, Instance] = {}

        def keyed(windows: list[Window]) -> list[tuple[object, Instance]]:
            pairs = []
            for window in windows:
                tokens = (tuple(window[1]), tuple(window[2]))
                owners = by_tokens.get(tokens)
                if owners is None or not (owners or self.world_size > 1):
                    raise InterventionError(
                        "lostattn: a loglikelihood_rolling window matches none of the documents' windows as "
                        "lm_eval.utils.get_rolling_token_windows cuts them, or comes more often than they do (did "
                        "lm-eval change how it cuts them?)"
                    )
                if owners:
                    last_owner[tokens] = owners.popleft()
                    pairs.append((window, last_owner[tokens]))
                else:  # beyond the documents' windows: on several ranks, lm-eval pads a rank with its first window
                    pairs.append((window, self._padding_copy(last_owner[tokens])))
            return pairs

        return keyed


def _pairs_in_order(requests: list[Instance]) -> Callable[[list[Window]], list[tuple[object, Instance]]]:
    """``TemplateLM.loglikelihood`` encodes its instances in order, one ``(strings, context, continuation)`` each,
    and scores them in one ``_loglikelihood_tokens`` call."""

    def keyed(pairs: list[Window]) -> list[tuple[object, Instance]]:
        if len(pairs) != len(requests):
            raise InterventionError(
                f"lostattn: lm-eval scored {len(pairs)} encoded requests for {len(requests)} instances; the plugin "
                "maps them in order (TemplateLM.loglikelihood)"
            )
        return list(zip(pairs, requests, strict=True))

    return keyed


_COLLATOR_MODULES = (lm_eval_huggingface, lm_eval_hf_vlms)  # where HFLM and HFMultimodalLM look up Collator


@contextmanager
def _following_batches(
    rows: HostBatches, scope: Scope, max_length: int | None, documents: dict[int, str]
) -> Iterator[None]:
    """Hand each batch lm-eval's ``Collator`` yields to ``rows`` (the requests each row serves, and for scoring rows,
    ``max_length`` given, their real lengths and continuation starts as ``HFLM._loglikelihood_tokens`` cuts them) and
    start a new prompt in the scope just before the batch runs.

    With ``logits_cache`` the Collator runs one row for all requests sharing ``context + continuation[:-1]``; here
    only those of one document (``documents``: a request's document by the id of its scoring request) share a row,
    since a row's draws are its document's: two documents with the same context (or the same rolling window) get
    rows of their own, whatever else the run or the batch holds."""

    def followed(collator: type) -> type:
        class FollowedCollator(collator):
            def __init__(self, arr: Sequence, *args: Any, **kwargs: Any) -> None:
                self._shared = kwargs.get("group_by") == "contexts"
                if self._shared:
                    group_fn = kwargs["group_fn"]
                    kwargs["group_fn"] = lambda element: (documents[id(element)], *group_fn(element))
                super().__init__(arr, *args, **kwargs)
                self.served: dict[int, list] = {}
                groups: dict[tuple, list] = {}
                for element in arr:
                    group = groups.setdefault(tuple(kwargs["group_fn"](element)), []) if self._shared else []
                    group.append(element)
                    self.served[id(element)] = group
                self._run: deque = deque()  # the rows yielded, whose results get_cache hands out in order

            def get_batched(self, *args: Any, **kwargs: Any) -> Iterator[list]:
                for batch in super().get_batched(*args, **kwargs):
                    ends = starts = None
                    if max_length is not None:  # (strings, context, continuation), right-padded, last token dropped
                        ends = [min(len(ctx) + len(cont), max_length + 1) - 1 for _, ctx, cont in batch]
                        starts = [end - len(cont) + 1 for end, (_, _, cont) in zip(ends, batch, strict=True)]
                    rows.batched([self.served[id(element)] for element in batch], ends, starts)
                    scope.set_samples(rows.next_prompt)
                    if self._shared:
                        self._run.extend(batch)
                    yield batch

            def get_cache(self, req_str: Any, cxt_toks: list[int], cont_toks: list[int], logits: Any) -> Iterator:
                if not self._shared:
                    return super().get_cache(req_str, cxt_toks, cont_toks, logits)
                element = self._run.popleft() if self._run else None
                if element is None or element[1] is not cxt_toks:
                    raise InterventionError(
                        "lostattn: lm-eval's _loglikelihood_tokens no longer asks Collator.get_cache for the rows of "
                        "its batches in order, with each row's own context tokens; the plugin keys the rows a "
                        "document shares by that order (lm_eval.models.utils.Collator)"
                    )
                return super().get_cache(req_str, [documents[id(element)], *cxt_toks], cont_toks, logits)

        return FollowedCollator

    with swapped(_COLLATOR_MODULES, "Collator", followed):
        yield


@register_model("lostattn-hf")
class LostAttnHFLM(LostAttnLMMixin, HFLM):
    """lm-eval's ``hf`` (causal LMs) with the lostattn arguments."""


@register_model("lostattn-hf-multimodal")
class LostAttnHFMultimodalLM(LostAttnLMMixin, HFMultimodalLM):
    """lm-eval's ``hf-multimodal`` (image-text-to-text models, generation with images) with the lostattn arguments."""
