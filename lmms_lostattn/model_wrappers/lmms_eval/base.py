"""The glue every lmms-eval family wrapper shares: the plugin's ``model_args`` (:mod:`..common.plugin`), the
intervention scoped around the base class's own batches (or one request at a time where it cannot follow them), every
row named by its document (:mod:`..common.batches`).

A family wrapper is ``class LostAttnX(LostAttnMixin, <lmms-eval's own class>)`` and nothing more (see wrappers.py).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import lmms_eval.utils as lmms_eval_utils
from lmms_eval.api.instance import Instance
from tqdm import tqdm

from lmms_lostattn.compat.internals import internal
from lmms_lostattn.model_wrappers.common.batches import HostBatches
from lmms_lostattn.model_wrappers.common.exits import REFUSALS, exit_refused
from lmms_lostattn.model_wrappers.common.patching import swapped, wrap_once
from lmms_lostattn.model_wrappers.common.plugin import Plugin
from lmms_lostattn.model_wrappers.common.plugin import bracket_list_values as _bracket_list_values
from lmms_lostattn.model_wrappers.lmms_eval.reporting import install

_smart_comma_split = internal("lmms_eval.utils", "_smart_comma_split")
PROGRESS = "Model Responding (lostattn)"
# The command lines that log and swallow an exception raised while the model is made (lmms-eval 0.7.3 then exits 0):
# lmms-eval's console script and modules (``python -m lmms_eval``), and ``lostattn-lmms-eval``.
CLI_SCRIPTS = ("lmms-eval", "lostattn-lmms-eval")
CLI_MODULES = ("lmms_eval.__main__", "lmms_eval.cli.dispatch", "lmms_lostattn.model_wrappers.lmms_eval.launcher")


@contextmanager
def _one_progress_bar(run: Callable[..., Any], total: int, rank: int) -> Iterator[tqdm]:
    """The base class draws a progress bar per call, counting its batches, and is called once per request where the
    plugin does not follow its batches: silence the ``tqdm`` of the module that defines ``run`` meanwhile and show
    one bar over all requests, counting requests, instead."""
    module = sys.modules[run.__func__.__module__]
    silenced = [module] if hasattr(module, "tqdm") else []
    bar = tqdm(total=total, disable=rank != 0, desc=PROGRESS)
    with swapped(silenced, "tqdm", _silent):
        try:
            yield bar
        finally:
            bar.close()


def _silent(original: Callable[..., Any]) -> Callable[..., Any]:
    return lambda *args, **kwargs: original(*args, **{**kwargs, "disable": True})


def bracket_list_values(arg_string: str) -> str:
    """``attn_layers=18,19,20`` -> ``attn_layers=[18,19,20]``, split as lmms-eval splits ``model_args``."""
    return _bracket_list_values(arg_string, _smart_comma_split)


def model_args_pieces(arg_string: str) -> list[tuple[str, str, str]]:
    """``model_args`` split as lmms-eval splits it (list values may be written plainly), each piece partitioned at
    its first ``=``; a :class:`SpecError` for what lmms-eval would not read."""
    if not arg_string.strip():
        return []
    return [piece.partition("=") for piece in _smart_comma_split(bracket_list_values(arg_string)) if piece]


def request_name(request: Instance) -> str:
    """A request's row name for the draws: ``task/split/doc_id``."""
    return f"{request.task_name}/{request.metadata.get('split')}/{request.doc_id}"


def is_padding(request: Instance) -> bool:
    """lmms-eval's padding requests on short ranks (their results are dropped)."""
    return bool(request.metadata.get("__padding_only__"))


def running_cli() -> bool:
    """Whether the running program is one of :data:`CLI_SCRIPTS` or :data:`CLI_MODULES` (not a library use)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) in CLI_MODULES or Path(sys.argv[0]).stem in CLI_SCRIPTS


def as_base_model(original: Callable[..., Any], task: Any, *args: Any, **kwargs: Any) -> Any:
    """A task picks its model-specific prompts, targets and generation settings by the model's id (lmms-eval builds
    the tasks after the model): a lostattn model's are those of the model it wraps (``lostattn_qwen3_vl`` gets
    mmmu's ``qwen3_vl`` prompt), so that ``attn=none`` runs what the base model runs."""
    name = str(task.model_name)
    if name.startswith("lostattn_"):
        base = getattr(internal("lmms_eval.models", "get_model")(name), "base_model_id", None)
        task.model_name = base or name
    return original(task, *args, **kwargs)


class LostAttnMixin:
    """Adds the intervention arguments of SPEC §2 to an lmms-eval model class; everything else is the base class."""

    #: The request types (method names) whose batches the plugin follows under an intervention or statistics: the
    #: base class runs each batch its ``utils.Collator`` yields as one prompt, left-padded. Other request types, and
    #: classes that run a batch as several prompts, run one request at a time (README's support matrix says which).
    follows_batches: ClassVar[frozenset[str]] = frozenset()
    #: lmms-eval's id of the wrapped model, whose model-specific prompts and settings tasks give this one
    #: (:func:`as_base_model`).
    base_model_id: ClassVar[str | None] = None

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> Any:
        try:
            arg_string = bracket_list_values(arg_string)
        except REFUSALS as error:
            if running_cli():
                exit_refused(error)
            raise
        return super().create_from_arg_string(arg_string, additional_config)

    def __init__(self, **kwargs: Any) -> None:
        """Resolve the plugin's arguments before the base class loads the model. A refusal (:data:`REFUSALS`) ends
        the process with status 2 under lmms-eval's command line, which would log it and exit 0
        (:func:`running_cli`); in library use it is raised."""
        base_args = inspect.signature(super().__init__).parameters
        try:
            self.lostattn = Plugin.from_model_kwargs(kwargs, base_args, "lmms_eval")
        except REFUSALS as error:
            if running_cli():
                exit_refused(error)
            raise
        super().__init__(**kwargs)
        self.lostattn.loaded(self.model)
        install()
        wrap_once("lmms_eval.api.task", "ConfigurableTask._prepare_model_specific_config", as_base_model)

    def generate_until(self, requests: list[Instance]) -> list[Any]:
        return self._run_scoped(requests, super().generate_until)

    def loglikelihood(self, requests: list[Instance]) -> list[Any]:
        return self._run_scoped(requests, super().loglikelihood)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[Any]:
        """Runs unchanged only without an intervention or statistics: the scope does not yet follow one request's
        rounds, and running them unedited would report the learned model's numbers as the intervention's."""
        if self.lostattn.active:
            raise NotImplementedError(
                "lostattn: generate_until_multi_round tasks are not supported with attn or stats yet (the request's "
                f"later rounds would run unedited); got attn={self.lostattn.intervention.mode}, "
                f"stats={self.lostattn.stats.kind}. "
                "Run them with attn=none,stats=none, or pick generate_until / loglikelihood tasks."
            )
        return super().generate_until_multi_round(requests)

    def _run_scoped(self, requests: list[Instance], run: Callable[[list[Instance]], list[Any]]) -> list[Any]:
        """Run the base class inside one intervention scope (nothing stays attached): in its own batches where the
        wrapper follows them for this request type (:attr:`follows_batches`), else one request at a time."""
        if not self.lostattn.active:
            return run(requests)
        with (
            self.lostattn.scope(self.model) as (scope, collector),
            _one_progress_bar(run, len(requests), self.rank) as progress,
        ):
            rows = HostBatches(
                [(request.args, request) for request in requests],
                type(self).__name__,
                self.lostattn.run,
                collector,
                progress,
                name=request_name,
                is_padding=is_padding,
            )
            if run.__name__ in self.follows_batches:
                scope.set_samples(rows.next_prompt)
                with _following_batches(rows):
                    results = run(requests)
                scope.raise_pending()  # the base class may log and swallow errors raised inside generate()
                rows.finish(ran_all=True)
                return results
            results = []
            for request in requests:
                rows.batched([[request.args]])
                scope.set_samples(rows.next_prompt)
                results.extend(run([request]))
                scope.raise_pending()
                rows.finish()
        return results


@contextmanager
def _following_batches(rows: HostBatches) -> Iterator[None]:
    """Hand every batch lmms-eval's ``utils.Collator.get_batched`` yields to ``rows`` while the base class runs
    (every lmms-eval 0.7.3 model class batches its requests with it; the class is restored on exit)."""

    def followed(collator: type) -> type:
        class FollowedCollator(collator):
            def get_batched(self, *args: Any, **kwargs: Any) -> Iterator[list]:
                for batch in super().get_batched(*args, **kwargs):
                    rows.batched([[arguments] for arguments in batch])
                    yield batch

        return FollowedCollator

    with swapped([lmms_eval_utils], "Collator", followed):
        yield
