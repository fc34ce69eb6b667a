"""How each harness aggregates a metric whose task config names no aggregation: the metric's registered default
aggregation (a ``metric_list`` entry without ``aggregation``, or no ``metric_list`` at all: the output type's
default metrics).

Reading the registries themselves would import the harness's metrics at every report (many seconds for lmms-eval),
so they are written out here; each host's contact points check them against its registry
(:func:`check_registry`), so a release that changes a default fails in the tests and in ``lostattn doctor``.
"""

from __future__ import annotations

import importlib

from lmms_lostattn.compat.contacts import expect

_SHARED = {
    "acc": "mean", "acc_norm": "mean", "acc_mutual_info": "mean", "acc_all": "mean", "exact_match": "mean",
    "brier_score": "brier_score", "perplexity": "perplexity", "word_perplexity": "weighted_perplexity",
    "byte_perplexity": "weighted_perplexity", "bits_per_byte": "bits_per_byte", "bypass": "bypass",
    "mcc": "matthews_corrcoef", "f1": "f1", "bleu": "bleu", "chrf": "chrf", "ter": "ter",
}

# harness -> metric -> the name of its registered default aggregation
DEFAULT_AGGREGATIONS: dict[str, dict[str, str]] = {
    "lm-eval": _SHARED | {"acc_bytes": "mean", "likelihood": "mean", "chrf++": "chrf++"},
    "lmms-eval": _SHARED | {"anls": "mean"},
}

_GENERATION = {"generate_until": ["exact_match"]}
_SCORING = {"loglikelihood": ["perplexity", "acc"], "multiple_choice": ["acc", "acc_norm"]}

# harness -> output type -> the metrics of a task config without ``metric_list``
DEFAULT_METRICS: dict[str, dict[str, list[str]]] = {
    "lm-eval": _SCORING
    | {"loglikelihood_rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"]}
    | _GENERATION,
    "lmms-eval": _SCORING
    | _GENERATION
    | {"generate_until_multi_round": ["exact_match"], "generate_until_agentic": ["exact_match"]},
}


def default_aggregation(harness: str, config: dict, metric: str, declared: bool) -> str | None:
    """The aggregation ``harness`` gives ``metric`` of a task whose ``config`` names none for it: its registered
    default, where the config lists it without one (``declared``) or has no ``metric_list`` and the metric is one
    of its output type's defaults; None otherwise (a metric the config does not list is aggregated as the task's
    code decides)."""
    defaults = DEFAULT_METRICS[harness].get(config.get("output_type"), [])
    if declared or (config.get("metric_list") is None and metric in defaults):
        return DEFAULT_AGGREGATIONS[harness].get(metric)
    return None


def check_registry(harness: str, package: str) -> None:
    """A contact point's check: ``package``'s registry gives the default aggregations and metrics written here."""
    registry = importlib.import_module(f"{package}.api.registry")
    importlib.import_module(f"{package}.api.metrics")  # registers the metrics
    names = {function: name for name, function in registry.AGGREGATION_REGISTRY.items()}
    found = {metric: names.get(function) for metric, function in registry.METRIC_AGGREGATION_REGISTRY.items()}
    expect(found == DEFAULT_AGGREGATIONS[harness],
           f"default aggregations {found}, expected {DEFAULT_AGGREGATIONS[harness]}")
    metrics = {kind: list(names) for kind, names in registry.DEFAULT_METRIC_REGISTRY.items()}
    expect(metrics == DEFAULT_METRICS[harness], f"default metrics {metrics}, expected {DEFAULT_METRICS[harness]}")
