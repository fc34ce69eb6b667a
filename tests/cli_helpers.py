"""Running the hosts' command lines (``lmms-eval``, ``lostattn-lm-eval``) on tiny models, offline, in subprocesses."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from lmms_lostattn.tasks import tasks_path

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_cli(
    *args: str, output: pathlib.Path, limit: int = 4, launcher: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``lmms-eval`` with ``--verbosity DEBUG`` (so a failure fails), assert it succeeded, return the process;
    ``env`` adds to its environment."""
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
    done = subprocess.run(command, env={**os.environ, **OFFLINE, **(env or {})}, capture_output=True, text=True,
                          timeout=600, cwd=output)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def results_of(output: pathlib.Path) -> dict:
    files = sorted(output.rglob("*_results.json"))
    assert files, f"no results JSON under {output}"
    return json.loads(files[-1].read_text())


def samples_of(output: pathlib.Path, task: str) -> list[dict]:
    lines = [line for path in output.rglob(f"*_samples_{task}.jsonl") for line in path.read_text().splitlines()]
    return sorted((json.loads(line) for line in lines if line.strip()), key=lambda sample: sample["doc_id"])


def lmms_eval_argv(
    model: str, model_args: str, output: pathlib.Path, *extra: str, tasks: str = "lostattn_pope", limit: int = 2
) -> list[str]:
    """``lmms-eval`` arguments for :func:`run_cli_batch`: a quick run on ``tasks`` (2 new tokens, failures raise)."""
    return [
        "lmms_eval",
        "--model",
        model,
        "--model_args",
        model_args,
        "--tasks",
        tasks,
        "--include_path",
        str(tasks_path()),
        "--limit",
        str(limit),
        "--gen_kwargs",
        "max_new_tokens=2",
        "--output_path",
        str(output),
        "--verbosity",
        "DEBUG",
        *extra,
    ]


def pope_argv(model: str, model_args: str, output: pathlib.Path, *extra: str) -> list[str]:
    """``lmms-eval`` arguments for a quick run on ``lostattn_pope`` (``--limit 2``, 2 new tokens, failures raise)."""
    return lmms_eval_argv(model, model_args, output, *extra)


def run_cli_batch(runs: list[list[str]], cwd: pathlib.Path, host: str = "lmms_eval", processes: int = 1) -> str:
    """Run several command lines of ``host`` in ``processes`` subprocesses at once, each of which imports the host
    once and calls its command's entry point for its share of the runs (every ``processes``-th), in order
    (``lmms_eval``: lmms-eval's ``cli_evaluate``; ``lm_eval``: ``lostattn-lm-eval``'s ``main``). A run that raises
    leaves its traceback in ``<its --output_path>/error.txt`` (as does one that exits non-zero, its message on stderr)
    and the others go on; check each run's outputs
    (:func:`run_error`, :func:`results_of`). Returns the processes' stderr (every run's log)."""
    cwd.mkdir(parents=True, exist_ok=True)  # the working directory: the checkout must not shadow the install
    shares = [runs[index::processes] for index in range(min(processes, len(runs)))]

    def run(share: list[list[str]]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, __file__, host, json.dumps(share)], env={**os.environ, **OFFLINE},
                              capture_output=True, text=True, timeout=1800, cwd=cwd)

    with ThreadPoolExecutor(max_workers=len(shares)) as pool:
        done = list(pool.map(run, shares))
    for process in done:
        assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]
    return "".join(process.stderr for process in done)


def run_error(output: pathlib.Path) -> str:
    """The traceback a :func:`run_cli_batch` run with this ``--output_path`` left, or ``""``."""
    error = output / "error.txt"
    return error.read_text() if error.is_file() else ""


def _reusing(build: Callable[..., dict], key: Callable[..., object]) -> Callable[..., dict]:
    """``build`` run once per ``key(*args, **kwargs)``; every call gets a deep copy of that first result."""
    built: dict[object, dict] = {}

    def reused(*args: object, **kwargs: object) -> dict:
        name = key(*args, **kwargs)
        if name not in built:
            built[name] = build(*args, **kwargs)
        return copy.deepcopy(built[name])

    return reused


def _lmms_eval_indexing_tasks_once() -> Callable[[], None]:
    """lmms-eval's CLI entry point, its task index (a parse of ~3000 task YAMLs, ~8 s) reused across the runs of one
    process."""
    from lmms_eval.__main__ import cli_evaluate
    from lmms_eval.tasks import TaskManager

    def index_key(manager: TaskManager, include_path=None, include_defaults: bool = True) -> tuple:
        return repr(include_path), include_defaults

    TaskManager.initialize_tasks = _reusing(TaskManager.initialize_tasks, index_key)
    return cli_evaluate


def _lm_eval_indexing_tasks_once() -> Callable[[], None]:
    """``lostattn-lm-eval``'s entry point, lm-eval's task index (its ~10000 task YAMLs, ~9 s) reused likewise
    (``TaskManager`` hands ``TaskIndex.build`` a list of paths)."""
    from lm_eval.tasks._index import TaskIndex

    from lmms_lostattn.model_wrappers.lm_eval.launcher import main

    def index_key(paths: list, **kwargs: object) -> tuple:
        return repr(paths), repr(sorted(kwargs.items()))

    TaskIndex.build = staticmethod(_reusing(TaskIndex.build, index_key))
    return main


if __name__ == "__main__":  # run_cli_batch's subprocess: each argv list through the host's CLI entry point
    import traceback

    entry_points = {"lmms_eval": _lmms_eval_indexing_tasks_once, "lm_eval": _lm_eval_indexing_tasks_once}
    cli_evaluate = entry_points[sys.argv[1]]()
    for argv in json.loads(sys.argv[2]):
        sys.argv = argv
        try:
            cli_evaluate()
        except (Exception, SystemExit) as error:
            if isinstance(error, SystemExit) and not error.code:
                continue
            output = pathlib.Path(argv[argv.index("--output_path") + 1])
            output.mkdir(parents=True, exist_ok=True)
            (output / "error.txt").write_text(traceback.format_exc())
