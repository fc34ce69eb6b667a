"""Running the lmms-eval command line on the tiny model, offline, in a subprocess."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from lmms_lostattn.tasks import tasks_path

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_cli(*args: str, output: pathlib.Path, limit: int = 4, launcher: tuple[str, ...] = ()) -> None:
    """Run ``lmms-eval`` with ``--verbosity DEBUG`` (so a failure fails) and assert it succeeded."""
    command = [
        *(launcher or (sys.executable,)),
        "-m",
        "lmms_eval",
        *args,
        "--include_path",
        str(tasks_path()),
        "--limit",
        str(limit),
        "--gen_kwargs",
        "max_new_tokens=3",
        "--output_path",
        str(output),
        "--verbosity",
        "DEBUG",
    ]
    output.mkdir(parents=True, exist_ok=True)  # also the working directory: the checkout must not shadow the install
    done = subprocess.run(command, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=600,
                          cwd=output)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def results_of(output: pathlib.Path) -> dict:
    files = sorted(output.rglob("*_results.json"))
    assert files, f"no results JSON under {output}"
    return json.loads(files[-1].read_text())


def samples_of(output: pathlib.Path, task: str) -> list[dict]:
    lines = [line for path in output.rglob(f"*_samples_{task}.jsonl") for line in path.read_text().splitlines()]
    return sorted((json.loads(line) for line in lines if line.strip()), key=lambda sample: sample["doc_id"])
