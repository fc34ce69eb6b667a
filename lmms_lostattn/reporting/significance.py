"""Paired tests between two loaded runs on one task and metric.

A difference is significant when its paired test gives p < ``ALPHA`` (0.05). The test runs on the per-sample values
of the ``--log_samples`` logs, and only when the task's aggregate is the mean of those values, as declared, never
judged from the values (:func:`per_sample_mean`): exact McNemar when every value is 0 or 1, else a paired
permutation test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lmms_lostattn.reporting.runs import (
    STATISTICS_PREFIX,
    LoadedRun,
    comparability,
    split_metric,
    statistics_difference,
)

ALPHA = 0.05
PERMUTATION_ITERATIONS = 10_000
PERMUTATION_SEED = 0
EXACT_UP_TO = 16  # documents: up to here the permutation test enumerates every sign pattern
TESTS = (f"exact McNemar for 0/1 per-sample scores, else paired permutation test, exact to {EXACT_UP_TO} documents, "
         f"else {PERMUTATION_ITERATIONS} sign flips, seed {PERMUTATION_SEED}")  # as tables' notes describe them
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


def paired_permutation(base: Sequence[float], other: Sequence[float], iterations: int = PERMUTATION_ITERATIONS,
                       seed: int = PERMUTATION_SEED) -> float:
    """Two-sided paired permutation (sign-flip) test of mean(other − base) = 0.

    Under the null each difference d_i = other_i − base_i is as likely to carry either sign. With T = |Σ d_i|, p is
    the share of sign patterns s ∈ {±1}^n with |Σ s_i d_i| ≥ T: all 2^n of them for n ≤ :data:`EXACT_UP_TO` (exact),
    else ``iterations`` random ones (``numpy.random.default_rng(seed)``) with the observed pattern counted in,
    p = (1 + #{|Σ s_i d_i| ≥ T}) / (1 + iterations). Either way p ≥ 2 / 2^n: a handful of documents that all moved
    the same way is not significant, however far they moved.
    """
    diff = np.asarray(other, dtype=float) - np.asarray(base, dtype=float)
    n = len(diff)
    reach = abs(diff.sum()) - 1e-9 * max(1.0, float(np.abs(diff).sum()))  # |Σ s·d| ≥ T up to rounding
    if n <= EXACT_UP_TO:
        signs = 1.0 - 2.0 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
        return float(np.mean(np.abs(signs @ diff) >= reach))
    rng = np.random.default_rng(seed)
    chunk = max(1, 2**22 // n)  # sign patterns per draw: about 32 MiB at a time, whatever the number of documents
    hits = 0
    for start in range(0, iterations, chunk):
        signs = rng.choice((-1.0, 1.0), size=(min(chunk, iterations - start), n))
        hits += int(np.count_nonzero(np.abs(signs @ diff) >= reach))
    return (1 + hits) / (1 + iterations)


def sample_scores(run: LoadedRun, task: str, metric: str) -> dict[int, float] | None:
    """Per-document values of metric ``metric`` (a metric id: under its filter) from the samples log (a number, a
    boolean as 0/1 as the harnesses average it, or a dict's ``score`` as POPE logs)."""
    log = run.sample_log(task, metric)
    if log is None:
        return None
    name = split_metric(metric)[0]
    scores = {}
    for doc, sample in log.items():
        value = sample.get(name)
        value = value.get("score") if isinstance(value, dict) else value
        if not isinstance(value, int | float):  # bool is an int
            return None
        scores[doc] = float(value)
    return scores


def per_sample_mean(run: LoadedRun, task: str, metric: str) -> bool:
    """Whether ``metric``'s aggregate on ``task`` is the mean of its per-sample values: a statistics row, or a metric
    the task's config declares aggregated by one of :data:`MEAN_AGGREGATIONS`. Anything else (another function, an
    aggregation the config does not declare) is not, whatever the values."""
    return metric.startswith(STATISTICS_PREFIX) or run.aggregation(task, metric) in MEAN_AGGREGATIONS


def shown_change(delta: float) -> str:
    """A change as tables and ``check`` lines show it: ``+0.0150``, or ``-3.9e-06`` where four decimals would
    show none."""
    return f"{delta:+.4f}" if delta == 0 or abs(delta) >= 1e-3 else f"{delta:+.1e}"


@dataclass(frozen=True)
class Difference:
    """``other − base`` on one task metric, with its paired test; ``delta`` is None when not comparable."""

    delta: float | None
    p: float | None = None
    test: str = ""  # "McNemar", "permutation", or why there is no test
    by_design: bool = False  # no test because the aggregate is not a per-sample mean (not a fault of the runs)
    documents: int = 0  # paired documents tested
    comparable: bool = True  # False: the runs differ in what they measured (tasks, documents, statistics)

    @property
    def significant(self) -> bool:
        return self.p is not None and self.p < ALPHA

    @property
    def can_be_significant(self) -> bool:
        """Whether any change on this many documents could be: both tests' smallest p is 2 / 2^n (every document
        moved one way), so 5 documents or fewer never reach p < 0.05."""
        return 2.0 ** (1 - self.documents) < ALPHA


def difference(base: LoadedRun, other: LoadedRun, task: str, metric: str) -> Difference:
    """Aggregate difference of ``metric`` on ``task`` and its paired test (see the module docstring)."""
    problem = comparability(base, other, task)
    if problem is None and metric.startswith(STATISTICS_PREFIX):
        problem = statistics_difference(base, other)
    if problem:
        return Difference(None, test=f"not comparable: {problem}", comparable=False)
    values = base.metric(task, metric), other.metric(task, metric)
    if None in values:
        lacking = " and ".join(str(run.path) for run, value in zip((base, other), values, strict=True) if value is None)
        return Difference(None, test=f"{metric} missing from {lacking}, or not a number there")
    delta = values[1] - values[0]
    if not (per_sample_mean(base, task, metric) and per_sample_mean(other, task, metric)):
        return Difference(delta, test="aggregate is not a per-sample mean", by_design=True)
    scores = [sample_scores(run, task, metric) for run in (base, other)]
    if not scores[0] or not scores[1]:  # no log, a value that is not a number, or no document
        return Difference(delta, test="no per-sample values")
    for per_doc, value in zip(scores, values, strict=True):
        if not math.isclose(sum(per_doc.values()) / len(per_doc), value, rel_tol=1e-9, abs_tol=1e-12):
            return Difference(delta, test="per-sample values do not average to the aggregate (edited files?)")
    docs = sorted(scores[0])
    pairs = [scores[0][d] for d in docs], [scores[1][d] for d in docs]
    if all(v in (0.0, 1.0) for v in (*pairs[0], *pairs[1])):
        return Difference(delta, mcnemar(*pairs), "McNemar", documents=len(docs))
    return Difference(delta, paired_permutation(*pairs), "permutation", documents=len(docs))
