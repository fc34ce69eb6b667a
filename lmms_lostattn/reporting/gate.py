"""The CI regression gate: does a run fall significantly below its baseline, or a statistics row move away from it?"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lmms_lostattn.reporting.runs import STATISTICS_PREFIX, LoadedRun, RunError, comparability
from lmms_lostattn.reporting.significance import difference, per_sample_mean, shown_change


def check_max_drop(value: float) -> float:
    """``value`` when it is a usable threshold: a finite number in [0, 1], an absolute change of a metric that is a
    fraction (0.01 is one point of accuracy); else a ValueError saying so."""
    if not 0 <= value <= 1:  # NaN compares false, infinities fall outside
        raise ValueError(f"{value}: expected a number in [0, 1] (an absolute change of a fraction; 0.01 is one "
                         "point of accuracy)")
    return value


def _beyond(change: float, bound: float) -> bool:
    """Whether ``change`` exceeds ``bound`` by more than the rounding of a difference of two means (0.97 - 0.96 is
    0.010000000000000009: a drop of exactly the bound is within it)."""
    return change > bound and not math.isclose(change, bound, rel_tol=1e-9, abs_tol=1e-12)


def _tasks_of(groups: dict[str, list[str]], name: str) -> list[str]:
    """The tasks ``name`` stands for: itself, or a group's tasks (through nested groups)."""
    return [task for sub in groups[name] for task in _tasks_of(groups, sub)] if name in groups else [name]


def regressions(base: LoadedRun, run: LoadedRun, max_drop: float, metrics: Sequence[str] = ()) -> list[tuple[str, str]]:
    """Regression gate: ``(status, line)`` per metric, status ``FAILED``, ``ok`` or ``skipped``, and a ``note`` per
    group.

    * ``max_drop``: a finite number in [0, 1] (:func:`check_max_drop`), else ValueError.
    * Direction: a task metric fails when it falls more than ``max_drop`` below the baseline in its recorded
      ``higher_is_better`` direction and its paired test gives p < ``ALPHA``. A statistics row (``lostattn_*``) has
      no better direction, nor has a metric whose direction is not recorded: it fails when it changes by more than
      ``max_drop`` either way, significantly (the line says "changed", not "drop").
    * Per-sample testing, one rule: a metric is tested only when the task's aggregate is the mean of the per-sample
      values, as the task declares it (:func:`lmms_lostattn.reporting.significance.per_sample_mean`: aggregation
      ``mean``, POPE's accuracy, the statistics rows); any other (POPE's precision, recall, F1, yes-ratio, lm-eval's
      perplexities) is skipped whatever its values, and is an error when named in ``metrics``.
    * Cannot judge (:class:`RunError`): a baseline metric that the run lacks or does not report as a number, one
      the baseline does not report as a finite number (skipped where neither run does, unless named), a change
      beyond ``max_drop`` on too few documents for any change to be significant (5 or fewer), a
      per-sample mean whose logged values are missing or do not average to the aggregate, and a selection in which
      nothing could be tested (no results, or only metrics that are not per-sample means).
    * Groups (``group_subtasks``) have no samples log of their own: their tasks are checked instead, and a ``note``
      line says so; ``group/metric`` in ``metrics`` is that metric in each of the group's tasks.

    ``metrics`` entries are ``metric`` (every common task having it) or ``task/metric``; by default every own
    metric of every task (no statistics rows). Raises :class:`RunError` when the runs cannot be compared (different
    tasks, documents or --limit: each problem once), a checked task has no samples log, or a requested metric is in
    no task or cannot be tested.
    """
    check_max_drop(max_drop)
    tasks = sorted(set(base.tasks) | set(run.tasks))
    problems = dict.fromkeys(problem for task in tasks if (problem := comparability(base, run, task)))
    if problems:
        raise RunError(f"baseline {base.path} vs {run.path}: {'; '.join(problems)}")
    groups = {**base.groups, **run.groups}
    checked = [task for task in tasks if task not in groups]
    if not checked:
        raise RunError(f"{base.path} and {run.path}: no task results; nothing to check")
    missing = [(r.path, task) for task in checked for r in (base, run) if task not in r.samples]
    if missing:
        raise RunError(f"{missing[0][0]}: no samples log for {missing[0][1]}; run the harness with --log_samples")
    wanted = [(task, metric) for task, _, metric in (m.rpartition("/") for m in metrics)]

    def covers(entry: tuple[str, str], task: str, metric: str) -> bool:
        return entry[1] == metric and (not entry[0] or task in _tasks_of(groups, entry[0]))

    selected = [(task, metric) for task in checked for metric in base.metrics(task, numbers_only=False)
                if (any(covers(entry, task, metric) for entry in wanted) if wanted
                    else not metric.startswith(STATISTICS_PREFIX))]
    for entry in wanted:
        if not any(covers(entry, *pair) for pair in selected):
            known = sorted({metric for task in checked for metric in base.metrics(task, numbers_only=False)})
            raise RunError(f"--metrics: {'/'.join(part for part in entry if part)} is in no task of {base.path}; "
                           f"its metrics: {', '.join(known) or 'none'} (each as metric or task/metric)")
    lines = [("note", f"{group} is a group (no samples log of its own): checked through its tasks "
                      f"{', '.join(_tasks_of(groups, group))}") for group in sorted(groups) if group in tasks]
    for task, metric in selected:
        if not wanted and not per_sample_mean(base, task, metric):  # whatever its values, NaN included
            lines.append(("skipped", f"{task}/{metric}: aggregate is not a per-sample mean"))
            continue
        if base.metric(task, metric) is None:  # null, NaN or not a number in the baseline
            if wanted or run.metric(task, metric) is not None:
                raise RunError(f"{base.path}: {task}/{metric} is not a finite number in the baseline; nothing to "
                               "judge the run's value against")
            lines.append(("skipped", f"{task}/{metric}: not a finite number in either run"))
            continue
        diff = difference(base, run, task, metric)
        if diff.p is None:
            if wanted or not diff.by_design:
                raise RunError(f"{task}/{metric}: cannot be tested per sample ({diff.test})")
            lines.append(("skipped", f"{task}/{metric}: {diff.test}"))
            continue
        higher = None if metric.startswith(STATISTICS_PREFIX) else base.higher_is_better(task, metric)
        if higher is None:
            beyond, change = _beyond(abs(diff.delta), max_drop), f"changed {shown_change(diff.delta)}, band ±{max_drop}"
        else:
            drop = 0.0 - diff.delta if higher else diff.delta  # 0.0 - 0.0 is 0.0, not -0.0
            beyond, change = _beyond(drop, max_drop), f"drop {shown_change(drop)}, bound {max_drop}"
        line = (f"{task}/{metric}: {base.metric(task, metric):.4f} -> {run.metric(task, metric):.4f} "
                f"({change}, {diff.test} p={diff.p:.4g})")
        if beyond and not diff.can_be_significant:
            raise RunError(f"{line}: beyond the bound, but on {diff.documents} documents no change can be "
                           f"significant (p >= {2.0 ** (1 - diff.documents):.4g}); run more documents")
        lines.append(("FAILED" if beyond and diff.significant else "ok", line))
    if not any(status in ("ok", "FAILED") for status, _ in lines):
        raise RunError(f"baseline {base.path}: no metric of {', '.join(checked)} can be tested per sample; name "
                       f"statistics rows (e.g. --metrics {STATISTICS_PREFIX}rid_attn) or run tasks whose metrics are "
                       "per-sample means")
    return lines
