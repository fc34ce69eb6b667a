"""lmms-eval in a subprocess, for the commands that run it (``lostattn demo``, ``lostattn reproduce``)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys
from collections.abc import Sequence

from lmms_lostattn.reporting.runs import RESULTS_SUFFIX

LAUNCHER = "lmms_lostattn.model_wrappers.lmms_eval.launcher"  # ``lostattn-lmms-eval``
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class LaunchError(RuntimeError):
    """A run of lmms-eval that failed; ``status`` is what the command running it exits with: the launcher's own exit
    status (1: the run failed, 2: a refusal or no results; 1 for a launcher killed by a signal), or 2 for a run that
    wrote no results file."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def run_lmms_eval(
    model: str,
    model_args: str,
    tasks: Sequence[str],
    output: pathlib.Path,
    *extra: str,
    log: pathlib.Path | None = None,
) -> pathlib.Path:
    """One run of lmms-eval's command line in a subprocess, offline, writing under ``output`` (also its working
    directory), through ``lostattn-lmms-eval`` so that a failed run is an exit status; returns its results JSON.
    Its progress and tables go to the terminal, or, with ``log``, to that file. A failed run, or one that wrote no
    results file, is a :class:`LaunchError`. ``output`` must be absolute (the commands resolve it): relative to the
    working directory, lmms-eval would write it inside ``output`` again."""
    if not output.is_absolute():
        raise ValueError(f"{output}: lmms-eval runs in its output folder, which must be given as an absolute path")
    command = [
        sys.executable,
        "-m",
        LAUNCHER,
        "--model",
        model,
        "--model_args",
        model_args,
        "--tasks",
        ",".join(tasks),
        "--output_path",
        str(output),
        *extra,
    ]
    print("$ " + " ".join(command), flush=True)
    output.mkdir(parents=True, exist_ok=True)
    where = "its log above"
    with contextlib.ExitStack() as stack:
        streams = {}
        if log is not None:
            streams = {"stdout": stack.enter_context(log.open("w")), "stderr": subprocess.STDOUT}
            where = f"its log {log}"
        done = subprocess.run(command, env={**os.environ, **OFFLINE}, cwd=output, **streams)
    if done.returncode:
        status = done.returncode if done.returncode > 0 else 1  # < 0: killed by a signal
        raise LaunchError(f"lmms-eval failed (exit status {done.returncode}); see {where}", status)
    found = sorted(output.rglob(f"*{RESULTS_SUFFIX}"))
    if not found:
        raise LaunchError(f"lmms-eval wrote no results under {output}; see {where}", 2)
    return found[-1]
