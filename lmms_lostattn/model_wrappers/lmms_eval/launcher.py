"""``lostattn-lmms-eval``: lmms-eval's command line, every flag as ``lmms-eval`` takes it, with an exit status that
says whether the run worked. lmms-eval 0.7.3 logs an exception raised during a run (an unknown task or model id, a
crash while evaluating) and exits 0; this command exits 2 where the plugin refused the run (its arguments, the
installed versions, the checkpoint's family: the message alone), was given no ``--tasks`` or produced no results, 1
where lmms-eval failed otherwise, with one line saying why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def no_tasks(args: Any, *rest: Any, **kwargs: Any) -> str | None:
    """lmms-eval exits 0 on a run without ``--tasks`` (after logging an error): say so (``--config`` files that name
    tasks have set ``args.tasks`` by the time the evaluation function runs)."""
    if getattr(args, "tasks", "") is None:
        return "no --tasks given: name the tasks to evaluate (--tasks list lists them)"
    return None


def saved_under(args: Any, *rest: Any, **kwargs: Any) -> tuple[Path, str] | None:
    """Where lmms-eval saves the run's results file: ``<output_path>/<model>/<date>_results.json``, or
    ``<output_path>/<date>_results.json`` when ``model_args`` name no checkpoint (a wrapper's default one)."""
    return (Path(args.output_path), "**/*_results.json") if getattr(args, "output_path", None) else None


def main() -> None:
    from lmms_lostattn.model_wrappers.common.exits import HostRuns

    runs = HostRuns("lostattn-lmms-eval", has_results=lambda returned: returned[0] is not None, usage_error=no_tasks,
                    saved_under=saved_under)
    runs.run("lmms_eval.cli.dispatch:main", "lmms_eval.__main__", "cli_evaluate_single")


if __name__ == "__main__":
    main()
