"""The CI regression gate: does a run fall significantly below its baseline?"""

from __future__ import annotations

from collections.abc import Sequence

from lmms_lostattn.reporting.runs import LoadedRun, RunError, comparability
from lmms_lostattn.reporting.significance import difference


def regressions(base: LoadedRun, run: LoadedRun, max_drop: float, metrics: Sequence[str] = ()) -> list[tuple[str, str]]:
    """Regression gate: ``(status, line)`` per metric, status ``FAILED``, ``ok`` or ``skipped``.

    A metric fails when it falls more than ``max_drop`` below the baseline (in its ``higher_is_better`` direction,
    higher when not recorded) and its paired test gives p < ``ALPHA``.

    ``metrics`` entries are ``metric`` (every common task having it) or ``task/metric``; by default every own
    metric of every task that can be tested per sample. Raises :class:`RunError` when the runs cannot be compared
    (different tasks, documents or --limit, no samples logs) or a requested metric cannot be tested.
    """
    tasks = sorted(set(base.tasks) | set(run.tasks))
    problems = [problem for task in tasks if (problem := comparability(base, run, task))]
    if problems:
        raise RunError(f"{run.path} vs baseline {base.path}: {'; '.join(problems)}")
    missing = [(r.path, task) for task in tasks for r in (base, run) if task not in r.samples]
    if missing:
        raise RunError(f"{missing[0][0]}: no samples log for {missing[0][1]}; run the harness with --log_samples")
    wanted = [m.split("/", 1) if "/" in m else [None, m] for m in metrics]
    selected = [(task, metric) for task in base.tasks for metric in base.metrics(task)
                if (any(t in (None, task) and m == metric for t, m in wanted) if wanted
                    else not metric.startswith("lostattn_"))]
    for task, metric in wanted:
        if not any(m == metric and task in (None, t) for t, m in selected):
            raise RunError(f"--metrics: {task + '/' if task else ''}{metric} is in no task of {base.path}")
    lines = []
    for task, metric in selected:
        diff = difference(base, run, task, metric)
        if diff.p is None:
            if wanted:
                raise RunError(f"{task}/{metric}: cannot be tested per sample ({diff.test})")
            lines.append(("skipped", f"{task}/{metric}: {diff.test}"))
            continue
        higher = base.results.get("higher_is_better", {}).get(task, {}).get(metric, True)
        drop = -diff.delta if higher else diff.delta
        line = (f"{task}/{metric}: {base.metric(task, metric):.4f} -> {run.metric(task, metric):.4f} "
                f"(drop {drop:+.4f}, bound {max_drop}, {diff.test} p={diff.p:.4g})")
        lines.append(("FAILED" if drop > max_drop and diff.significant else "ok", line))
    return lines
