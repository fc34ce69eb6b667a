"""The lm-eval 0.4.13 internals the lm-eval glue relies on, as contact points (see
:mod:`lmms_lostattn.compat.contacts`): each check exercises one the way the glue uses it, so a moved one fails as one
line naming it (in the tests and in ``lostattn doctor`` where lm-eval is installed)."""

from __future__ import annotations

import importlib
import inspect

from lmms_lostattn.compat.contacts import ContactPoint, expect
from lmms_lostattn.compat.internals import internal
from lmms_lostattn.model_wrappers.common.patching import swapped
from lmms_lostattn.reporting.aggregations import check_registry


def _collator_batches() -> None:
    """``HFLM`` and ``HFMultimodalLM`` batch with their module's ``Collator``, built with ``group_by``/``group_fn``
    keywords (the glue reads the contexts grouping from them); ``get_batched`` yields the elements it was given, and
    ``group_by="contexts"`` one per ``context + continuation[:-1]``."""
    for module, owner, methods in (
        ("lm_eval.models.huggingface", "HFLM", ("_loglikelihood_tokens", "generate_until")),
        ("lm_eval.models.hf_vlms", "HFMultimodalLM", ("generate_until",)),
    ):
        internal(module, "Collator")
        for method in methods:
            source = inspect.getsource(getattr(internal(module, owner), method))
            expect("Collator(" in source and "group_by=" in source, f"{owner}.{method} no longer builds a Collator")
    collator = internal("lm_eval.models.utils", "Collator")
    requests = [(("a", " x"), [1, 2], [3]), (("a", " y"), [1, 2], [4]), (("b", " x"), [5], [3, 6])]
    grouped = collator(
        requests, sort_fn=lambda r: -len(r[1] + r[2]), group_by="contexts", group_fn=lambda r: r[1] + r[2][:-1]
    )
    batches = list(grouped.get_batched(n=4))
    expect(len(batches) == 1 and len(batches[0]) == 2, f"contexts grouping gives {batches}, expected 2 rows of 3")
    expect(all(any(x is r for r in requests) for x in batches[0]), "get_batched no longer yields the given elements")


def _scoring_rows() -> None:
    """``_loglikelihood_tokens`` scores ``(context + continuation)[-(max_length + 1):][:-1]``, right-padded, as the
    glue's row ends and continuation starts assume; ``TemplateLM.loglikelihood`` encodes its instances in order."""
    source = inspect.getsource(internal("lm_eval.models.huggingface", "HFLM")._loglikelihood_tokens)
    for fragment in ("(context_enc + continuation_enc)[-(self.max_length + 1) :][:-1]", 'padding_side="right"'):
        expect(fragment in source, f"_loglikelihood_tokens no longer has {fragment!r}")
    source = inspect.getsource(internal("lm_eval.api.model", "TemplateLM").loglikelihood)
    expect("self._loglikelihood_tokens(new_reqs" in source, "TemplateLM.loglikelihood no longer scores new_reqs")


def _rolling_windows() -> None:
    """``loglikelihood_rolling`` cuts windows with ``get_rolling_token_windows(..., context_len=1)`` and
    ``make_disjoint_window``, which the glue repeats to find each window's document."""
    source = inspect.getsource(internal("lm_eval.models.huggingface", "HFLM").loglikelihood_rolling)
    expect("get_rolling_token_windows" in source and "context_len=1" in source, "windows are cut otherwise")
    windows = list(
        map(
            internal("lm_eval.utils", "make_disjoint_window"),
            internal("lm_eval.utils", "get_rolling_token_windows")(list(range(5)), -1, 3, 1),
        )
    )
    expect(windows[0] == ([-1], [0, 1, 2]), f"first window {windows[0]}")


def _evaluate() -> None:
    """``simple_evaluate`` looks ``evaluate`` up in ``lm_eval.evaluator`` when it runs (where the glue wraps it);
    ``evaluate`` takes the model as ``lm`` (whose ``world_size`` says whether ranks split the documents) and strides
    the documents over the ranks (so each document's statistics are one rank's)."""
    source = inspect.getsource(internal("lm_eval.evaluator", "simple_evaluate"))
    expect("results = evaluate(" in source, "simple_evaluate no longer calls the module's evaluate")
    evaluate = internal("lm_eval.evaluator", "evaluate")
    expect("lm" in inspect.signature(evaluate).parameters, "evaluate no longer takes the model as lm")
    expect("samples" in inspect.signature(evaluate).parameters, "evaluate no longer takes --samples as samples")
    source = inspect.getsource(evaluate)
    expect("doc_id_true = indices[doc_id]" in source, "evaluate no longer logs a selected document by its position")
    source = inspect.getsource(internal("lm_eval.api.task", "Task").build_all_requests)
    expect("rank=rank" in source and "world_size=world_size" in source, "documents are no longer split by rank")


def _response_cache() -> None:
    """``--use_cache`` wraps the model in ``CachingLM`` before ``evaluate`` gets it; its ``dbdict`` (a dict-like SQLite
    table at ``cache_db``) maps ``hash_args(method, request.args)``, a sha256 hex digest of the request alone, to the
    response: the glue keeps its intervention mark in that table, under a key no request hashes to, and finds the
    model's run as ``lm.lm``."""
    source = inspect.getsource(internal("lm_eval.evaluator", "simple_evaluate"))
    expect("CachingLM(" in source, "simple_evaluate no longer wraps the model in CachingLM for --use_cache")
    source = inspect.getsource(internal("lm_eval.api.model", "CachingLM").__init__)
    expect("self.dbdict" in source and "self.cache_db" in source, "CachingLM no longer keeps dbdict and cache_db")
    expect("self.lm" in source, "CachingLM no longer keeps the model it wraps as lm")
    key = internal("lm_eval.api.model", "hash_args")("loglikelihood", ("context", " continuation"))
    expect(len(key) == 64 and set(key) <= set("0123456789abcdef"), f"cache keys look like {key!r} now")


def _split_top_level() -> None:
    pieces = internal("lm_eval._cli.utils", "split_top_level")("a=1,b=[2,3],c='x,y'")
    expect(pieces == ["a=1", "b=[2,3]", "c='x,y'"], f"split gives {pieces}")


def _instance_fields() -> None:
    """Requests are named by ``task_name`` and ``doc_id``, unpacked from ``metadata``."""
    instance = internal("lm_eval.api.instance", "Instance")("loglikelihood", {}, ("a", "b"), 0, ("t", 3, 1))
    expect((instance.task_name, instance.doc_id) == ("t", 3), "fields moved")


def _simple_evaluate() -> None:
    """``lm-eval run`` imports ``simple_evaluate`` from ``lm_eval`` when it runs, which resolves it in
    ``lm_eval.evaluator`` then (where ``lostattn-lm-eval`` records each call), and calls it once."""
    source = inspect.getsource(internal("lm_eval._cli.run", "Run")._execute)
    expect("from lm_eval import simple_evaluate" in source, "Run._execute no longer imports it from lm_eval")
    expect("results = simple_evaluate(" in source, "Run._execute no longer calls it")
    marker = object()
    with swapped([importlib.import_module("lm_eval.evaluator")], "simple_evaluate", lambda _: marker):
        resolved = importlib.import_module("lm_eval").simple_evaluate
    expect(resolved is marker, "lm_eval.simple_evaluate is no longer looked up in lm_eval.evaluator when used")


CONTACT_POINTS: tuple[ContactPoint, ...] = (
    ContactPoint("lm_eval.api.registry default aggregations (report, compare, check)", "lm_eval",
                 lambda: check_registry("lm-eval", "lm_eval")),
    ContactPoint("lm_eval Collator batches (followed under the plugin)", "lm_eval", _collator_batches),
    ContactPoint("HFLM._loglikelihood_tokens scoring rows", "lm_eval", _scoring_rows),
    ContactPoint("HFLM.loglikelihood_rolling windows", "lm_eval", _rolling_windows),
    ContactPoint("lm_eval.evaluator.evaluate (statistics rows)", "lm_eval", _evaluate),
    ContactPoint("lm_eval CachingLM response cache (--use_cache)", "lm_eval", _response_cache),
    ContactPoint("lm_eval._cli.utils.split_top_level", "lm_eval", _split_top_level),
    ContactPoint("lm_eval.api.instance.Instance fields", "lm_eval", _instance_fields),
    ContactPoint("lm_eval.__main__.cli_evaluate", "lm_eval", lambda: internal("lm_eval.__main__", "cli_evaluate")),
    ContactPoint("lm_eval.evaluator.simple_evaluate (lostattn-lm-eval)", "lm_eval", _simple_evaluate),
)
