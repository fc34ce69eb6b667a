"""Paired tests between two loaded runs on one task and metric.

A difference is significant when its paired test gives p < ``ALPHA`` (0.05). The test runs on the per-sample values
of the ``--log_samples`` logs, and only when the task's aggregate is the mean of those values, as declared, never
judged from the values (:func:`per_sample_mean`): exact McNemar when every value is 0 or 1, else a paired bootstrap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lmms_lostattn.reporting.runs import LoadedRun, comparability

ALPHA = 0.05
BOOTSTRAP_ITERATIONS = 10_000
BOOTSTRAP_SEED = 0
STATISTICS_PREFIX = "lostattn_"  # the plugin's statistics rows: each a mean over documents of per-sample values
# Aggregations that are the mean of the logged per-sample values: either harness's ``mean``, and the functions known
# to compute it (lmms-eval's POPE accuracy averages each sample's ``score``; its precision, recall, F1 and yes-ratio
# do not).
MEAN_AGGREGATIONS = frozenset({"mean", "pope_aggregate_accuracy"})


def mcnemar(base: Sequence[float], other: Sequence[float]) -> float:
    """Exact two-sided McNemar test on paired 0/1 outcomes.

    With b = #(base 1, other 0) and c = #(base 0, other 1): p = min(1, 2·P(X ≤ min(b, c))), X ~ Binomial(b + c, ½)
    (so p = 1 when there are no discordant pairs).
    """
    b = sum(1 for x, y in zip(base, other, strict=True) if x == 1 and y == 0)
    c = sum(1 for x, y in zip(base, other, strict=True) if x == 0 and y == 1)
    tail = sum(math.comb(b + c, k) for k in range(min(b, c) + 1)) / 2 ** (b + c)
    return min(1.0, 2 * tail)


def paired_bootstrap(base: Sequence[float], other: Sequence[float], iterations: int = BOOTSTRAP_ITERATIONS,
                     seed: int = BOOTSTRAP_SEED) -> float:
    """Two-sided paired bootstrap test of mean(other − base) = 0.

    Documents are resampled with replacement ``iterations`` times (``numpy.random.default_rng(seed)``); with d̄* the
    resampled mean differences, p = min(1, 2·min(P(d̄* ≤ 0), P(d̄* ≥ 0))).
    """
    diff = np.asarray(other, dtype=float) - np.asarray(base, dtype=float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(iterations, len(diff)))].mean(axis=1)
    return float(min(1.0, 2 * min(np.mean(means <= 0), np.mean(means >= 0))))


def sample_scores(run: LoadedRun, task: str, metric: str) -> dict[int, float] | None:
    """Per-document values of ``metric`` from the samples log (a number, or a dict's ``score`` as POPE logs)."""
    if task not in run.samples:
        return None
    scores = {}
    for doc, sample in run.samples[task].items():
        value = sample.get(metric)
        value = value.get("score") if isinstance(value, dict) else value
        if not isinstance(value, int | float) or isinstance(value, bool):
            return None
        scores[doc] = float(value)
    return scores


def per_sample_mean(run: LoadedRun, task: str, metric: str) -> bool:
    """Whether ``metric``'s aggregate on ``task`` is the mean of its per-sample values: a statistics row, or a metric
    the task's config declares aggregated by one of :data:`MEAN_AGGREGATIONS`. Anything else (another function, an
    aggregation the config does not declare) is not, whatever the values."""
    return metric.startswith(STATISTICS_PREFIX) or run.aggregation(task, metric) in MEAN_AGGREGATIONS


@dataclass(frozen=True)
class Difference:
    """``other − base`` on one task metric, with its paired test; ``delta`` is None when not comparable."""

    delta: float | None
    p: float | None = None
    test: str = ""  # "McNemar", "bootstrap", or why there is no test

    @property
    def significant(self) -> bool:
        return self.p is not None and self.p < ALPHA


def difference(base: LoadedRun, other: LoadedRun, task: str, metric: str) -> Difference:
    """Aggregate difference of ``metric`` on ``task`` and its paired test (see the module docstring)."""
    problem = comparability(base, other, task)
    if problem:
        return Difference(None, test=f"not comparable: {problem}")
    values = base.metric(task, metric), other.metric(task, metric)
    if values[0] is None or values[1] is None:
        return Difference(None, test=f"{metric} missing from a run")
    delta = values[1] - values[0]
    if not (per_sample_mean(base, task, metric) and per_sample_mean(other, task, metric)):
        return Difference(delta, test="aggregate is not a per-sample mean")
    scores = [sample_scores(run, task, metric) for run in (base, other)]
    if scores[0] is None or scores[1] is None:
        return Difference(delta, test="no per-sample values")
    for per_doc, value in zip(scores, values, strict=True):
        if not math.isclose(sum(per_doc.values()) / len(per_doc), value, rel_tol=1e-9, abs_tol=1e-12):
            return Difference(delta, test="per-sample values do not average to the aggregate (edited files?)")
    docs = sorted(scores[0])
    pairs = [scores[0][d] for d in docs], [scores[1][d] for d in docs]
    if all(v in (0.0, 1.0) for v in (*pairs[0], *pairs[1])):
        return Difference(delta, mcnemar(*pairs), "McNemar")
    return Difference(delta, paired_bootstrap(*pairs), "bootstrap")
