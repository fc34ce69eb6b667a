"""``lostattn check``: the CI regression gate over two runs."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from lmms_lostattn.reporting.gate import regressions
from lmms_lostattn.reporting.runs import load_run, version_changes


def check(path: pathlib.Path, baseline: pathlib.Path, max_drop: float, metrics: Sequence[str]) -> int:
    """The CI gate: 0 when no selected metric drops (a statistics row: changes) beyond ``max_drop`` and noise, 1
    otherwise (see :func:`lmms_lostattn.reporting.gate.regressions`)."""
    base, run = load_run(baseline), load_run(path)
    lines = regressions(base, run, max_drop, metrics)
    failures = sum(status == "FAILED" for status, _ in lines)
    print(f"baseline {base.path} ({base.model}, {base.label}) vs {run.path} ({run.model}, {run.label})")
    changes = version_changes(base, run)
    if changes:
        print(f"note: versions differ ({', '.join(changes)})")
    print("\n".join(f"{status:8}{line}" for status, line in lines))
    print(f"{failures} regression(s)" if failures else "no regression")
    return 1 if failures else 0
