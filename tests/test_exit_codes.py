"""A failed run exits non-zero: the plugin's refusals (status 2, the message alone) under ``lmms-eval``,
``lostattn-lmms-eval`` and ``lostattn-lm-eval``, and every other failure (status 1) under the plugin's own commands,
through the installed command lines on tiny models; the launcher's status passed on by the commands that run it
(``lostattn demo``, ``lostattn reproduce``); and :class:`HostRuns`' verdicts in-process."""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from cli_helpers import OFFLINE

from lmms_lostattn.cli import main
from lmms_lostattn.config.spec import SpecError
from lmms_lostattn.model_wrappers.common.exits import HostRuns
from lmms_lostattn.model_wrappers.lm_eval import launcher as lm_eval_launcher
from lmms_lostattn.model_wrappers.lmms_eval import base
from lmms_lostattn.model_wrappers.lmms_eval import launcher as lmms_eval_launcher
from lmms_lostattn.model_wrappers.lmms_eval import reporting as lmms_eval_reporting
from lmms_lostattn.model_wrappers.lmms_eval import reproduce as reproduce_runs
from lmms_lostattn.model_wrappers.lmms_eval.launch import LaunchError, run_lmms_eval
from lmms_lostattn.models import SHAPES_LLAVA_DIR
from lmms_lostattn.tasks import tasks_path

BIN = pathlib.Path(sys.executable).parent
TYPO = "did you mean attn?"
LAYERS = "attn_layers='99' is not valid"
FAILED = "lostattn-lmms-eval: the run failed: ValueError:"
# run name -> (the exit status, what its stderr names); see the command lines in ``exits``. A misspelt argument and a
# layer out of range are refused on one path (the spec, as the model is built): each command runs one of the two.
EXPECTED: dict[str, tuple[int, str]] = {
    "lmms-eval typo": (2, TYPO),
    "python -m lmms_eval layers": (2, LAYERS),
    "lostattn-lmms-eval layers": (2, LAYERS),
    "lostattn-lmms-eval model": (1, f"{FAILED} Model 'lostattn_nosuch' not found"),
    "lostattn-lmms-eval task": (1, f"{FAILED} Tasks not found: nosuch_task"),
    "lostattn-lmms-eval no tasks": (2, "lostattn-lmms-eval: no --tasks given"),
    "lostattn-lmms-eval ok": (0, ""),
    "lostattn-lm-eval typo": (2, TYPO),
    "lostattn-lm-eval task": (1, "Tasks not found: nosuch_task"),
    "lostattn-lm-eval ok": (0, ""),
}


@pytest.fixture(scope="module")
def exits(
    tiny_llava: pathlib.Path, tiny_model: Callable[[str], pathlib.Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[subprocess.CompletedProcess, pathlib.Path]]:
    """Every command line of :data:`EXPECTED`, two at a time: each run's process and output folder."""
    root = tmp_path_factory.mktemp("exit_codes")
    llava = f"pretrained={tiny_llava},device=cpu,device_map=cpu"
    llama = f"pretrained={tiny_model('llama')},dtype=float32"
    lmms_eval_tail = ["--include_path", str(tasks_path()), "--limit", "2", "--gen_kwargs", "max_new_tokens=2"]
    lm_eval_tail = ["--include_path", str(tasks_path(host="lm_eval")), "--limit", "2", "--batch_size", "1"]
    lm_eval_tail += ["--device", "cpu", "--gen_kwargs", "max_gen_toks=2"]

    def lmms_eval(*command: str, model: str = "lostattn_llava", args: str = "", task: str | None = "lostattn_pope"):
        tasks = ["--tasks", task] if task else []
        return [*command, "--model", model, "--model_args", llava + args, *tasks, *lmms_eval_tail]

    def lm_eval(args: str = "", task: str = "lostattn_shapes_text_gen") -> list[str]:
        command = [str(BIN / "lostattn-lm-eval"), "--model", "lostattn-hf", "--model_args", llama + args]
        return [*command, "--tasks", task, *lm_eval_tail]

    ours = str(BIN / "lostattn-lmms-eval")
    runs = {
        "lmms-eval typo": lmms_eval(str(BIN / "lmms-eval"), args=",atn=uniform"),
        "python -m lmms_eval layers": lmms_eval(sys.executable, "-m", "lmms_eval", args=",attn=uniform,attn_layers=99"),
        "lostattn-lmms-eval layers": lmms_eval(ours, args=",attn=uniform,attn_layers=99"),
        "lostattn-lmms-eval model": lmms_eval(ours, model="lostattn_nosuch"),
        "lostattn-lmms-eval task": lmms_eval(ours, task="nosuch_task"),
        "lostattn-lmms-eval no tasks": lmms_eval(ours, task=None),
        "lostattn-lmms-eval ok": lmms_eval(ours, args=",attn=uniform,attn_layers=1"),
        "lostattn-lm-eval typo": lm_eval(",atn=uniform"),
        "lostattn-lm-eval task": lm_eval(task="nosuch_task"),
        "lostattn-lm-eval ok": lm_eval(",attn=uniform,attn_layers=1,attn_keys=all"),
    }

    def run(name: str) -> tuple[subprocess.CompletedProcess, pathlib.Path]:
        output = root / name.replace(" ", "_")
        output.mkdir()  # also the working directory: the checkout must not shadow the install
        command = [*runs[name], "--output_path", str(output)]
        done = subprocess.run(command, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=600,
                              cwd=output)  # fmt: skip
        return done, output

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(runs, pool.map(run, runs), strict=True))


@pytest.mark.cli
@pytest.mark.parametrize("name", list(EXPECTED))
def test_a_failed_run_exits_non_zero_and_names_the_problem(
    exits: dict[str, tuple[subprocess.CompletedProcess, pathlib.Path]], name: str
) -> None:
    (done, output), (status, named) = exits[name], EXPECTED[name]
    log = f"{name}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == status, log
    results = list(output.rglob("*results*.json"))
    if status == 0:
        assert results, log
        return
    assert not results, log
    last_line = done.stderr.strip().splitlines()[-1]
    assert named in last_line, log
    if status == 2:  # the plugin's message alone, without a traceback before it
        assert "Traceback" not in done.stderr, log


@pytest.mark.cli
def test_run_lmms_eval_carries_the_launcher_s_status(tiny_llava: pathlib.Path, tmp_path: pathlib.Path) -> None:
    args = f"pretrained={tiny_llava},device=cpu,device_map=cpu,atn=uniform"
    with pytest.raises(LaunchError) as refused:
        run_lmms_eval("lostattn_llava", args, ["lostattn_pope"], tmp_path, "--include_path", str(tasks_path()),
                      log=tmp_path / "log")  # fmt: skip
    assert refused.value.status == 2
    assert str(refused.value) == f"lmms-eval failed (exit status 2); see its log {tmp_path / 'log'}"
    assert TYPO in (tmp_path / "log").read_text()


# -- in-process ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("returncode", "status", "says"),
    [(0, 2, "lmms-eval wrote no results under"), (1, 1, "lmms-eval failed (exit status 1)"),
     (-9, 1, "lmms-eval failed (exit status -9)")],
)  # fmt: skip
def test_launch_error_status_by_the_launcher_s_exit(
    returncode: int, status: int, says: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def finished(command: list[str], **_: Any) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(command, returncode)

    monkeypatch.setattr(subprocess, "run", finished)
    with pytest.raises(LaunchError) as failed:
        run_lmms_eval("lostattn_llava", "pretrained=x", ["lostattn_pope"], tmp_path)
    assert failed.value.status == status
    assert str(failed.value).startswith(says)


@pytest.mark.parametrize("status", [1, 2])
@pytest.mark.parametrize("command", ["demo", "reproduce"])
def test_commands_that_run_lmms_eval_end_with_its_status_and_one_line(
    command: str, status: int, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    def failed_run(*_: Any, **__: Any) -> pathlib.Path:
        raise LaunchError(f"lmms-eval failed (exit status {status}); see its log", status)

    monkeypatch.setattr("lmms_lostattn.cli.demo.run_lmms_eval", failed_run)
    monkeypatch.setattr(reproduce_runs, "run_lmms_eval", failed_run)
    argv = {
        "demo": ["demo", "--output", str(tmp_path / "out"), "--limit", "1"],
        "reproduce": ["reproduce", "--model", "lostattn_llava", "--model_args", f"pretrained={SHAPES_LLAVA_DIR}",
                      "--tasks", "lostattn_pope", "--seeds", "0", "--include_path", str(tasks_path()),
                      "--sap-args", "attn_layers=1:", "-o", str(tmp_path / "out")],
    }  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv[command])
    assert exit_info.value.code == status
    assert capsys.readouterr().err == f"lostattn {command}: lmms-eval failed (exit status {status}); see its log\n"


def _evaluate(returned: Any) -> Any:
    """A harness's evaluation function: returns ``returned``, or raises it."""
    if isinstance(returned, Exception):
        raise returned
    return returned


def _command_line(returned: Any) -> Callable[[], None]:
    """A harness's command line: calls :func:`_evaluate` once (looked up when it runs), logs and swallows any
    exception, and returns."""

    def command_line() -> None:
        try:
            _evaluate(returned)
        except Exception as error:
            print(f"logged: {error}")

    return command_line


@pytest.mark.parametrize(
    ("returned", "rank", "status", "says"),
    [
        ({"results": {}}, None, None, ""),
        (None, "1", None, ""),  # off the main process a harness returns nothing
        (None, None, 2, "lostattn-x: the run produced no results\n"),
        (ValueError("no task x\nmore"), None, 1, "lostattn-x: the run failed: ValueError: no task x\n"),
        (SpecError("lostattn: attn='x' is not valid"), None, 2, "lostattn: attn='x' is not valid\n"),
    ],
)
def test_host_runs_exit_status(
    returned: Any, rank: str | None, status: int | None, says: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    for name in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    if rank is not None:
        monkeypatch.setenv("RANK", rank)
    runs = HostRuns("lostattn-x", has_results=lambda value: value is not None)
    if status is None:
        runs.run(_command_line(returned), __name__, "_evaluate")
    else:
        with pytest.raises(SystemExit) as exit_info:
            runs.run(_command_line(returned), __name__, "_evaluate")
        assert exit_info.value.code == status
    assert capsys.readouterr().err == says
    assert _evaluate.__name__ == "_evaluate" and not hasattr(_evaluate, "__wrapped__")  # restored


@pytest.mark.parametrize(("written", "folder"), [(True, "model"), (True, ""), (False, "model")])
def test_a_run_whose_results_file_was_not_written_exits_2(
    written: bool, folder: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The harnesses log a failed save (a file where the output folder should be, a full disk) and go on: a run with
    results but no results file where it saves one ends with status 2."""
    for name in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "model").mkdir()
    earlier = tmp_path / "model" / "20261201_000000_results.json"  # an earlier run's file
    earlier.write_text("{}")
    os.utime(earlier, (earlier.stat().st_atime - 3600,) * 2)

    def command_line() -> None:  # lmms-eval writes into <output>/<model>/, or <output>/ without pretrained= etc.
        _evaluate({"results": {}})
        if written:
            (tmp_path / folder / "20261205_000000_results.json").write_text("{}")

    runs = HostRuns("lostattn-x", has_results=lambda value: value is not None,
                    saved_under=lambda *args: lmms_eval_launcher.saved_under(argparse.Namespace(output_path=tmp_path)))
    if written:
        runs.run(command_line, __name__, "_evaluate")
    else:
        with pytest.raises(SystemExit) as exit_info:
            runs.run(command_line, __name__, "_evaluate")
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.startswith(f"lostattn-x: the run wrote no results file (**/*_results.json "
                                                  f"under {tmp_path})")


@pytest.mark.parametrize("saved", [False, True])
def test_the_statistics_sidecar_is_written_only_beside_a_saved_results_file(saved: bool, tmp_path: pathlib.Path
                                                                            ) -> None:
    """lmms-eval logs a failed save and goes on, without setting ``date_id``: the sidecar is then not written (the
    run ends as a run without a results file does), instead of an AttributeError the launcher reads as a failure."""
    model = type("Config", (), {"model_name_sanitized": "model"})()
    tracker = type("Tracker", (), {"output_path": str(tmp_path), "general_config_tracker": model})()

    def save(tracker: Any, results: dict[str, Any]) -> None:  # as lmms-eval's, which catches its own failure
        if saved:
            tracker.date_id = "20261205_000000"
            (tmp_path / "model").mkdir()
            (tmp_path / "model" / f"{tracker.date_id}_results.json").write_text("{}")

    lmms_eval_reporting._save_results_aggregated(save, tracker, {"lostattn": {"spec_hash": "h", "tasks": {"t": {}}}})
    assert [path.name for path in tmp_path.glob("*/*_lostattn.json")] == (["20261205_000000_lostattn.json"] if saved
                                                                          else [])


def test_where_each_harness_saves_its_results_file() -> None:
    tracker = type("Tracker", (), {})
    for output, expected in (("out", (pathlib.Path("out"), "*/results_*.json")),
                             ("out/run.json", (pathlib.Path("out"), "run_*.json")), (None, None)):
        tracker.output_path = output
        assert lm_eval_launcher.saved_under(evaluation_tracker=tracker()) == expected
    assert lmms_eval_launcher.saved_under(argparse.Namespace(output_path="out")) == (pathlib.Path("out"),
                                                                                     "**/*_results.json")
    assert lmms_eval_launcher.saved_under(argparse.Namespace(output_path=None)) is None


def test_refusals_end_the_process_only_under_lmms_eval_s_command_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not base.running_cli()  # pytest: library use, the error is raised
    for program in ("/venv/bin/lmms-eval", "lostattn-lmms-eval"):
        monkeypatch.setattr(sys, "argv", [program, "--model", "x"])
        assert base.running_cli(), program
    monkeypatch.setattr(sys, "argv", ["lmms_eval"])
    assert not base.running_cli()


@pytest.mark.parametrize(
    ("launcher", "module", "name"),
    [
        (lmms_eval_launcher, "lmms_eval.__main__", "cli_evaluate_single"),
        (lm_eval_launcher, "lm_eval.__main__", "cli_evaluate"),
    ],
    ids=["lmms-eval", "lm-eval"],
)
def test_a_moved_host_entry_point_is_a_refusal_that_names_it(
    launcher: Any, module: str, name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib

    monkeypatch.delattr(importlib.import_module(module), name)
    monkeypatch.setattr(sys, "argv", ["launcher", "--tasks", "x"])
    with pytest.raises(SystemExit) as stopped:
        launcher.main()
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and name in err and "Traceback" not in err, err
