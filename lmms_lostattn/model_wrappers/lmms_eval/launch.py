"""``lmms-eval`` in a subprocess, for the commands that run it (``lostattn demo``, ``lostattn reproduce``)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections.abc import Sequence

from lmms_lostattn.reporting.runs import RESULTS_SUFFIX, RunError

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_lmms_eval(model: str, model_args: str, tasks: Sequence[str], output: pathlib.Path, *extra: str) -> pathlib.Path:
    """One ``lmms-eval`` run in a subprocess, offline, writing under ``output`` (also its working directory; its
    progress and table go to the terminal); returns its results JSON. lmms-eval exits 0 even when the evaluation
    raised, so a run that wrote no results file is a :class:`RunError`."""
    command = [sys.executable, "-m", "lmms_eval", "--model", model, "--model_args", model_args,
               "--tasks", ",".join(tasks), "--output_path", str(output), *extra]
    print("$ " + " ".join(command), flush=True)
    output.mkdir(parents=True, exist_ok=True)
    subprocess.run(command, env={**os.environ, **OFFLINE}, check=True, cwd=output)
    found = sorted(output.rglob(f"*{RESULTS_SUFFIX}"))
    if not found:
        raise RunError(f"lmms-eval wrote no results under {output}; see its log above")
    return found[-1]
