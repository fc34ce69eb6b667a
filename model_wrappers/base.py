"""The glue every family wrapper shares: parse the plugin's ``model_args``, scope the intervention around the base
class's own batches (or one request at a time where it cannot follow them), and name every row by its document.

A family wrapper is ``class LostAttnX(LostAttnMixin, <lmms-eval's own class>)`` and nothing more (see llava.py).
"""

from __future__ import annotations

import inspect
import sys
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import lmms_eval.utils as lmms_eval_utils
from lmms_eval.api.instance import Instance
from loguru import logger
from tqdm import tqdm
from transformers import AutoConfig, AutoImageProcessor

from lmms_lostattn.adapters import adapter_for
from lmms_lostattn.model_wrappers.reporting import Run, begin_run
from lmms_lostattn.scope import InterventionError, intervene
from lmms_lostattn.spec import InterventionSpec, spec_hash
from lmms_lostattn.stats import StatsCollector
from lmms_lostattn.upstream import internal, require_tested_versions

_smart_comma_split = internal("lmms_eval.utils", "_smart_comma_split")
_PLUGIN_PREFIXES = ("attn", "stats")
PROGRESS = "Model Responding (lostattn)"


@contextmanager
def _one_progress_bar(run: Callable[..., Any], total: int, rank: int) -> Iterator[tqdm]:
    """The base class draws a progress bar per call, counting its batches, and is called once per request where the
    plugin does not follow its batches: silence the ``tqdm`` of the module that defines ``run`` meanwhile and show
    one bar over all requests, counting requests, instead."""
    module = sys.modules[run.__func__.__module__]
    original = getattr(module, "tqdm", None)
    bar = tqdm(total=total, disable=rank != 0, desc=PROGRESS)
    if original is not None:
        module.tqdm = lambda *args, **kwargs: original(*args, **{**kwargs, "disable": True})
    try:
        yield bar
    finally:
        if original is not None:
            module.tqdm = original
        bar.close()


def bracket_list_values(arg_string: str) -> str:
    """Let list values be written plainly in ``model_args``: ``attn_layers=18,19,20`` -> ``attn_layers=[18,19,20]``.

    lmms-eval splits ``model_args`` at commas outside brackets and quotes, so a bare ``18,19,20`` would otherwise
    arrive as stray ``19`` and ``20`` pieces without ``=`` and crash its parser.
    """
    pieces: list[str] = []
    for piece in _smart_comma_split(arg_string.strip()):
        if "=" in piece or not pieces:
            pieces.append(piece)
        else:
            pieces[-1] += "," + piece
    bracketed = []
    for piece in pieces:
        name, _, value = piece.partition("=")
        if "," in value and value[:1] not in "[{\"'":
            value = f"[{value}]"
        bracketed.append(f"{name}={value}" if _ else piece)
    return ",".join(bracketed)


def _is_plugin_arg(key: str, base_args: Mapping[str, Any]) -> bool:
    """The plugin's own arguments, and ``attn*``/``stats*`` names the base class does not take (typos of ours, such
    as ``attn_layer``, which the spec then names); the base class keeps its own (``attn_implementation``)."""
    return key in InterventionSpec.ARGS or (key.startswith(_PLUGIN_PREFIXES) and key not in base_args)


class LostAttnMixin:
    """Adds the intervention arguments of SPEC §2 to an lmms-eval model class; everything else is the base class."""

    #: The request types (method names) whose batches the plugin follows under an intervention or statistics: the
    #: base class runs each batch its ``utils.Collator`` yields as one prompt, left-padded. Other request types, and
    #: classes that run a batch as several prompts, run one request at a time (README's support matrix says which).
    follows_batches: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> Any:
        return super().create_from_arg_string(bracket_list_values(arg_string), additional_config)

    def __init__(self, **kwargs: Any) -> None:
        require_tested_versions()
        base_args = inspect.signature(super().__init__).parameters
        plugin_args = {key: kwargs.pop(key) for key in list(kwargs) if _is_plugin_arg(key, base_args)}
        spec = InterventionSpec.from_model_args(plugin_args)
        pretrained = kwargs.get("pretrained", base_args["pretrained"].default)
        hub = {"revision": kwargs.get("revision", "main"), "trust_remote_code": bool(kwargs.get("trust_remote_code"))}
        config = AutoConfig.from_pretrained(pretrained, **hub)
        self.adapter = adapter_for(config)
        text = config.get_text_config()
        self.intervention = spec.resolve(text.num_hidden_layers, text.num_attention_heads, self.adapter.preset(config))
        self.adapter.check_mode(config, self.intervention.mode)
        self.stats_config = spec.stats
        self._image_mean_std = None
        if self.intervention.mode == "complexity":  # the normalisation it undoes, from the checkpoint's processor
            processor = AutoImageProcessor.from_pretrained(pretrained, **hub)
            self._image_mean_std = (processor.image_mean, processor.image_std)
        super().__init__(**kwargs)
        self._run = Run(model=str(pretrained), intervention=self.intervention, stats=self.stats_config)
        begin_run(self._run)
        logger.info(
            f"lostattn: spec {spec_hash(self.intervention, self.stats_config)}: intervention "
            f"{self.intervention.to_dict()}, statistics {self.stats_config.to_dict()}"
        )

    def generate_until(self, requests: list[Instance]) -> list[Any]:
        return self._run_scoped(requests, super().generate_until)

    def loglikelihood(self, requests: list[Instance]) -> list[Any]:
        return self._run_scoped(requests, super().loglikelihood)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[Any]:
        """Runs unchanged only without an intervention or statistics: the scope does not yet follow one request's
        rounds, and running them unedited would report the learned model's numbers as the intervention's."""
        if self.intervention.mode != "none" or self.stats_config.kind != "none":
            raise NotImplementedError(
                "lostattn: generate_until_multi_round tasks are not supported with attn or stats yet (the request's "
                f"later rounds would run unedited); got attn={self.intervention.mode}, stats={self.stats_config.kind}. "
                "Run them with attn=none,stats=none, or pick generate_until / loglikelihood tasks."
            )
        return super().generate_until_multi_round(requests)

    def _run_scoped(self, requests: list[Instance], run: Callable[[list[Instance]], list[Any]]) -> list[Any]:
        """Run the base class inside one intervention scope (nothing stays attached): in its own batches where the
        wrapper follows them for this request type (:attr:`follows_batches`), else one request at a time."""
        measure = self.stats_config.kind != "none"
        if self.intervention.mode == "none" and not measure:
            return run(requests)
        layers = len(self.adapter.decoder_layers(self.model))
        collector = StatsCollector(self.stats_config, layers) if measure else None
        with (
            intervene(self.model, self.intervention, self.adapter, collector, self._image_mean_std) as scope,
            _one_progress_bar(run, len(requests), self.rank) as progress,
        ):
            rows = RequestRows(requests, type(self).__name__, self._run, collector, progress)
            if run.__name__ in self.follows_batches:
                scope.set_samples(rows.next_prompt)
                with _following_batches(rows):
                    results = run(requests)
                scope.raise_pending()  # the base class may log and swallow errors raised inside generate()
                rows.finish(ran_all=True)
                return results
            results = []
            for request in requests:
                rows.batched([request.args])
                scope.set_samples(rows.next_prompt)
                results.extend(run([request]))
                scope.raise_pending()
                rows.finish()
        return results


class RequestRows:
    """The requests behind the rows of each prompt the model runs, in the order the base class batched them.

    The base class hands each batch to :meth:`batched` (as the argument tuples of its requests) before it runs it;
    each new prompt takes the next batch (:meth:`next_prompt`, which names its rows ``task/split/doc_id`` for the
    scope's draws); when a prompt ends, its statistics go to its requests (padding requests excluded) and the
    progress bar advances by its requests. A prompt that does not match its batch, a batch that never ran, or
    arguments that are none of the requests' are errors: the rows would be misnamed.
    """

    def __init__(
        self, requests: list[Instance], wrapper: str, run: Run, collector: StatsCollector | None, progress: tqdm
    ) -> None:
        # lmms-eval's padding requests on short ranks are shallow copies: the same argument tuple as a real request
        self._by_args: dict[int, deque[Instance]] = {}
        for request in requests:
            self._by_args.setdefault(id(request.args), deque()).append(request)
        self._wrapper = wrapper
        self._run = run
        self._collector = collector
        self._progress = progress
        self._queued: deque[list[Instance]] = deque()
        self._running: list[Instance] = []

    def batched(self, batch: list[tuple]) -> None:
        named = [self._by_args[id(args)].popleft() for args in batch if self._by_args.get(id(args))]
        if len(named) < len(batch):
            raise InterventionError(
                f"lostattn: {self._wrapper}'s base class built a batch of {len(batch)} with {len(batch) - len(named)} "
                "request(s) that are not among those it was given, so its rows cannot be named by their documents"
            )
        self._queued.append(named)

    def next_prompt(self, rows: int) -> list[str]:
        """The sample names of a new prompt of ``rows`` rows (the next batch, each request repeated for beams)."""
        self._end_prompt()
        if not self._queued:
            raise InterventionError(
                f"lostattn: {self._wrapper}'s base class ran a prompt of {rows} rows beyond the batches it built"
            )
        batch = self._queued.popleft()
        if rows % len(batch):
            raise InterventionError(
                f"lostattn: {self._wrapper}'s base class ran a prompt of {rows} rows for its batch of {len(batch)} "
                "requests; the plugin follows only batches that run as one prompt (set follows_batches = frozenset() "
                "on the wrapper to run one request at a time)"
            )
        self._running = batch
        return [f"{request.task_name}/{request.metadata.get('split')}/{request.doc_id}" for request in batch]

    def finish(self, ran_all: bool = False) -> None:
        """The base class returned: the last prompt's statistics to its requests. ``ran_all``: every batch it built
        must have run (it runs its batches in one call); otherwise a batch that never ran (an error the base class
        swallowed before the model ran) is dropped, its requests without statistics."""
        self._end_prompt()
        if ran_all and self._queued:
            raise InterventionError(
                f"lostattn: {self._wrapper}'s base class built {len(self._queued)} batch(es) it never ran through "
                "the model; their requests have no intervention or statistics"
            )
        self._progress.update(sum(map(len, self._queued)))
        self._queued.clear()

    def _end_prompt(self) -> None:
        batch, self._running = self._running, []
        if self._collector is not None and batch:
            records = self._collector.take()
            repeats = len(records) // len(batch)
            for row, request in enumerate(batch):
                if records and not request.metadata.get("__padding_only__"):
                    self._run.records[(request.task_name, request.doc_id)].append(records[row * repeats])
        self._progress.update(len(batch))


@contextmanager
def _following_batches(rows: RequestRows) -> Iterator[None]:
    """Hand every batch lmms-eval's ``utils.Collator.get_batched`` yields to ``rows`` while the base class runs
    (every lmms-eval 0.7.3 model class batches its requests with it; the class is restored on exit)."""
    collator = lmms_eval_utils.Collator

    class FollowedCollator(collator):
        def get_batched(self, *args: Any, **kwargs: Any) -> Iterator[list]:
            for batch in super().get_batched(*args, **kwargs):
                rows.batched(batch)
                yield batch

    lmms_eval_utils.Collator = FollowedCollator
    try:
        yield
    finally:
        lmms_eval_utils.Collator = collator
