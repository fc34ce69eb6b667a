"""The lmms-eval 0.7.3 internals the host glue relies on, as contact points (see :mod:`lmms_lostattn.compat.contacts`).

Each check exercises one internal the way the glue uses it, so a moved one fails as one line naming it (in the
tests and in ``lostattn doctor``), not as a run that silently reports nothing.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points

from lmms_lostattn.compat.contacts import ContactPoint, expect
from lmms_lostattn.compat.internals import internal
from lmms_lostattn.reporting.aggregations import check_registry


def _process_document_results() -> None:
    """Called per document as ``(item, *, task, ...)``; returns an object with ``metrics`` and ``logged_sample``."""
    function = internal("lmms_eval.evaluator", "_process_document_results")
    parameters = inspect.signature(function).parameters
    expect(list(parameters)[0] == "item" and "task" in parameters, f"signature is ({', '.join(parameters)})")
    fields = {f.name for f in dataclasses.fields(internal("lmms_eval.evaluator", "_ProcessedDocument"))}
    expect({"metrics", "logged_sample"} <= fields, f"_ProcessedDocument has fields {sorted(fields)}")


def _evaluate() -> None:
    """``simple_evaluate`` looks ``evaluate`` up in ``lmms_eval.evaluator`` when it runs (where the glue wraps it),
    ``evaluate`` takes the model as ``lm`` and looks ``_process_document_results`` up when it runs (where the glue
    swaps it for the call)."""
    source = inspect.getsource(internal("lmms_eval.evaluator", "simple_evaluate"))
    expect("results = evaluate(" in source, "simple_evaluate no longer calls the module's evaluate")
    evaluate = internal("lmms_eval.evaluator", "evaluate")
    expect("lm" in inspect.signature(evaluate).parameters, "evaluate no longer takes the model as lm")
    expect("_process_document_results(" in inspect.getsource(evaluate), "evaluate no longer calls it by name")


def _save_results_aggregated() -> None:
    """``save_results_aggregated(results, samples, datetime_str)`` sets ``date_id``, and the output folder is named
    by ``general_config_tracker.model_name_sanitized`` (where the sidecar goes)."""
    tracker = internal("lmms_eval.loggers.evaluation_tracker", "EvaluationTracker")
    parameters = list(inspect.signature(tracker.save_results_aggregated).parameters)
    expect(parameters[:2] == ["self", "results"], f"signature is ({', '.join(parameters)})")
    source = inspect.getsource(tracker.save_results_aggregated)
    expect("self.date_id =" in source, "it no longer sets self.date_id")
    expect("general_config_tracker.model_name_sanitized" in source, "it no longer names the folder by the model")


def _model_specific_config() -> None:
    """A task reads ``self.model_name`` in ``_prepare_model_specific_config`` (where the glue gives a lostattn model
    its base model's prompts), called from the task's ``__init__``; evaluations build tasks after the model."""
    task = internal("lmms_eval.api.task", "ConfigurableTask")
    source = inspect.getsource(task._prepare_model_specific_config)
    expect("self.model_name in self.lmms_eval_specific_kwargs" in source, "it no longer picks prompts by model_name")
    expect("self._prepare_model_specific_config()" in inspect.getsource(task.__init__), "__init__ no longer calls it")
    source = inspect.getsource(internal("lmms_eval.evaluator", "simple_evaluate"))
    expect(source.index("get_model(") < source.index("get_task_dict("), "simple_evaluate builds tasks before the model")


def _reentrant_filelocks() -> None:
    """lmms-eval patches ``filelock._api.FileLockMeta`` (and datasets' lock) at the start of every evaluation."""
    internal("lmms_eval.evaluator", "_enable_reentrant_filelocks")()


def _wrapped_classes() -> Iterator[tuple[type, type]]:
    """Each registered plugin class with the lmms-eval class it wraps."""
    from lmms_lostattn.model_wrappers.lmms_eval.base import LostAttnMixin
    from lmms_lostattn.model_wrappers.lmms_eval.manifests import get_manifests

    for manifest in get_manifests():
        for path in filter(None, (manifest.simple_class_path, manifest.chat_class_path)):
            module, _, name = path.rpartition(".")
            wrapper = internal(module, name)
            yield wrapper, wrapper.__mro__[wrapper.__mro__.index(LostAttnMixin) + 1]


def _progress_bars() -> None:
    """The base classes draw their bars with their module's ``tqdm``, which the glue silences while it shows one."""
    for wrapper, base in _wrapped_classes():
        for method in ("generate_until", "loglikelihood"):
            defined_in = sys.modules[getattr(base, method).__module__]
            expect(hasattr(defined_in, "tqdm"), f"{defined_in.__name__} (for {wrapper.__name__}.{method}) has no tqdm")


def _collator_batches() -> None:
    """The classes whose batches the glue follows build them with ``lmms_eval.utils.Collator`` (looked up on the
    module when they run, where the glue substitutes its subclass), whose ``get_batched`` yields lists of the very
    argument tuples it was given."""
    collator = internal("lmms_eval.utils", "Collator")
    arguments = [("b", 1), ("a", 2), ("c", 3)]
    batches = list(collator(arguments, lambda x: x[0], grouping=False).get_batched(n=2))
    expect(
        [len(b) for b in batches] == [2, 1] and all(any(x is y for y in arguments) for b in batches for x in b),
        f"get_batched(n=2) gives {batches}, not lists of the arguments it was given",
    )
    for wrapper, base in _wrapped_classes():
        for method in wrapper.follows_batches:
            source = inspect.getsource(getattr(base, method))
            expect("utils.Collator(" in source, f"{base.__name__}.{method} no longer batches with utils.Collator")


def _huggingface_fallback() -> None:
    """lmms-eval's chat ``huggingface`` falls back to its module's ``AutoModel`` (which ``lostattn_hf`` replaces)."""
    huggingface = internal("lmms_eval.models.chat.huggingface", "Huggingface")
    expect(hasattr(sys.modules[huggingface.__module__], "AutoModel"), "its module has no AutoModel")
    source = inspect.getsource(huggingface.__init__)
    expect("AutoModel" in source, "Huggingface.__init__ no longer loads through AutoModel")


def _smart_comma_split() -> None:
    split = internal("lmms_eval.utils", "_smart_comma_split")
    pieces = split("a=1,b=[2,3],c='x,y'")
    expect(pieces == ["a=1", "b=[2,3]", "c='x,y'"], f"split gives {pieces}")


def _model_registry() -> None:
    """``--model lostattn_llava`` resolves through the ``lmms_eval.models`` entry points to the plugin's classes."""
    from lmms_lostattn.model_wrappers.lmms_eval.wrappers import LostAttnLlavaChat, LostAttnLlavaSimple

    get_model = internal("lmms_eval.models", "get_model")
    expect(get_model("lostattn_llava") is LostAttnLlavaChat, "lostattn_llava does not resolve to the chat class")
    simple = get_model("lostattn_llava", force_simple=True)
    expect(simple is LostAttnLlavaSimple, "lostattn_llava --force_simple does not resolve to the simple class")


def _instance_fields() -> None:
    """Requests are named by ``task_name``, ``doc_id`` and ``metadata['split']``."""
    instance = internal("lmms_eval.api.instance", "Instance")(
        request_type="generate_until",
        arguments=(),
        idx=0,
        metadata={"task": "t", "doc_id": 3, "repeats": 1, "split": "test"},
    )
    expect((instance.task_name, instance.doc_id, instance.metadata["split"]) == ("t", 3, "test"), "fields moved")


def _console_script() -> None:
    """``lmms-eval`` is ``lmms_eval.cli.dispatch:main``, which hands a run to ``lmms_eval.__main__.cli_evaluate``:
    the programs under which the wrappers end the process on a refusal (``base.CLI_SCRIPTS``, ``CLI_MODULES``)."""
    from lmms_lostattn.model_wrappers.lmms_eval.base import CLI_MODULES, CLI_SCRIPTS

    (script,) = entry_points(group="console_scripts", name="lmms-eval") or (None,)
    expect(script is not None and script.value == "lmms_eval.cli.dispatch:main", f"lmms-eval is {script}")
    expect(script.name in CLI_SCRIPTS and script.module in CLI_MODULES, f"{script.value} is not a known program")
    source = inspect.getsource(internal("lmms_eval.cli.dispatch", "main"))
    expect("from lmms_eval.__main__ import cli_evaluate" in source, "dispatch.main no longer runs cli_evaluate")


def _cli_evaluate_single() -> None:
    """``cli_evaluate`` calls its module's ``cli_evaluate_single(args)`` (looked up when it runs, where
    ``lostattn-lmms-eval`` records each call), which returns ``(results, samples)``, or ``(None, None)`` without
    results."""
    source = inspect.getsource(internal("lmms_eval.__main__", "cli_evaluate"))
    expect("cli_evaluate_single(args)" in source, "cli_evaluate no longer calls cli_evaluate_single(args)")
    source = inspect.getsource(internal("lmms_eval.__main__", "cli_evaluate_single"))
    for fragment in ("return results, samples", "return None, None"):
        expect(fragment in source, f"cli_evaluate_single no longer has {fragment!r}")


CONTACT_POINTS: tuple[ContactPoint, ...] = (
    ContactPoint("lmms_eval.api.registry default aggregations (report, compare, check)", "lmms_eval",
                 lambda: check_registry("lmms-eval", "lmms_eval")),
    ContactPoint("lmms_eval.evaluator.evaluate", "lmms_eval", _evaluate),
    ContactPoint("lmms_eval.evaluator._process_document_results", "lmms_eval", _process_document_results),
    ContactPoint("EvaluationTracker.save_results_aggregated", "lmms_eval", _save_results_aggregated),
    ContactPoint("lmms_eval.api.task.ConfigurableTask._prepare_model_specific_config", "lmms_eval",
                 _model_specific_config),
    ContactPoint("lmms_eval.evaluator._enable_reentrant_filelocks (filelock._api)", "filelock", _reentrant_filelocks),
    ContactPoint("the base classes' module-level tqdm", "lmms_eval", _progress_bars),
    ContactPoint("lmms_eval.utils.Collator batches (followed under the plugin)", "lmms_eval", _collator_batches),
    ContactPoint("lmms_eval.models.chat.huggingface.AutoModel fallback", "lmms_eval", _huggingface_fallback),
    ContactPoint("lmms_eval.utils._smart_comma_split", "lmms_eval", _smart_comma_split),
    ContactPoint("lmms_eval.models.get_model (lmms_eval.models entry points)", "lmms_eval", _model_registry),
    ContactPoint("lmms_eval.api.instance.Instance fields", "lmms_eval", _instance_fields),
    ContactPoint("the lmms-eval console script (lmms_eval.cli.dispatch:main)", "lmms_eval", _console_script),
    ContactPoint("lmms_eval.__main__.cli_evaluate_single (lostattn-lmms-eval)", "lmms_eval", _cli_evaluate_single),
)
