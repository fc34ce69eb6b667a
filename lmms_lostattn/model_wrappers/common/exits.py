"""The exit status of the plugin's command lines. lmms-eval 0.7.3 logs an exception raised during a run and exits 0;
a CI job must never read that as a pass. :data:`REFUSALS` are what the plugin refuses before a model loads (ended
with status 2 and the message alone, :func:`exit_refused`); :class:`HostRuns` judges a harness's command line by the
calls of its evaluation function (1 for a failure it swallowed, 2 for a run without results, or whose results file
was not written, as ``lostattn check`` exits on a folder without results)."""

from __future__ import annotations

import functools
import importlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from lmms_lostattn.compat.internals import internal
from lmms_lostattn.compat.versions import UpstreamError
from lmms_lostattn.config.spec import SpecError
from lmms_lostattn.families import UnsupportedFamilyError
from lmms_lostattn.model_wrappers.common.patching import swapped

#: What the plugin refuses before a model loads: a bad argument, untested or moved upstream packages, a checkpoint
#: of a family it has no adapter for.
REFUSALS: tuple[type[Exception], ...] = (SpecError, UpstreamError, UnsupportedFamilyError)


def exit_refused(error: BaseException) -> NoReturn:
    """End the process with status 2 and the plugin's message on stderr, without a traceback."""
    print(error, file=sys.stderr)
    raise SystemExit(2) from None


def _main_process() -> bool:
    """Whether this process is the one a harness returns results on (rank 0, or a run without ranks)."""
    return all(int(os.environ.get(name) or 0) == 0 for name in ("RANK", "LOCAL_RANK"))


@dataclass
class HostRuns:
    """The outcome of each call of a harness's evaluation function during one of its command lines, which the
    harness may log and swallow (lmms-eval 0.7.3 exits 0 after any exception): the plugin's command lines judge
    their exit status by it. ``has_results`` tells from the function's return value whether it produced results."""

    command: str  # the plugin's command, e.g. ``lostattn-lmms-eval``
    has_results: Callable[[Any], bool]
    #: What is wrong with the evaluation function's arguments where the harness would exit 0 on it without
    #: evaluating (None: nothing); such a run ends with status 2 and this message.
    usage_error: Callable[..., str | None] = lambda *args, **kwargs: None
    #: Where a call saves its results file, from its arguments: (folder, glob), or None where it saves none (no
    #: ``--output_path``). The harnesses log a failed save (a full disk, a file where the folder should be) and go on.
    saved_under: Callable[..., tuple[Path, str] | None] = lambda *args, **kwargs: None
    refused: Exception | None = None
    failures: list[str] = field(default_factory=list)
    without_results: bool = False  # a call on the main process returned without results (and raised nothing)
    saves: list[tuple[Path, str, float]] = field(default_factory=list)  # (folder, glob, start) of calls with results

    def run(self, cli: Callable[[], Any] | str, module: str, name: str) -> None:
        """Run the harness's command line ``cli`` (or the internal it names, ``module:function``), recording every
        call of ``module.name`` (which the harness must look up when it calls it); then end the process with status
        2 where the plugin refused the run (:data:`REFUSALS`, a moved internal included) or the call's arguments
        (:attr:`usage_error`), 1 where a call failed, 2 where one returned no results on the main process or wrote
        no results file where it saves one. Returns when every call produced results, or there was none (a command
        that evaluates nothing, e.g. a listing)."""
        try:
            internal(module, name)
            if isinstance(cli, str):
                cli = internal(*cli.split(":"))
            with swapped([importlib.import_module(module)], name, self._recording):
                cli()
        except REFUSALS as error:
            exit_refused(error)
        if self.refused is not None:
            exit_refused(self.refused)
        if self.failures:
            print(f"{self.command}: the run failed: {self.failures[0]}", file=sys.stderr)
            raise SystemExit(1)
        if self.without_results:
            print(f"{self.command}: the run produced no results", file=sys.stderr)
            raise SystemExit(2)
        for folder, pattern, started in self.saves:  # the file system's clock may round down a second
            if not any(path.stat().st_mtime >= started - 1 for path in folder.glob(pattern)):
                print(f"{self.command}: the run wrote no results file ({pattern} under {folder}); the harness's log "
                      "says why", file=sys.stderr)
                raise SystemExit(2)

    def _recording(self, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            problem = self.usage_error(*args, **kwargs)
            if problem is not None:
                print(f"{self.command}: {problem}", file=sys.stderr)
                raise SystemExit(2)
            started = time.time()
            try:
                returned = function(*args, **kwargs)
            except REFUSALS as error:
                self.refused = self.refused or error
                raise
            except Exception as error:
                first_line = next(iter(str(error).strip().splitlines()), "")
                self.failures.append(f"{type(error).__name__}: {first_line}")
                raise
            if not _main_process():
                return returned
            if not self.has_results(returned):
                self.without_results = True
            elif (saved := self.saved_under(*args, **kwargs)) is not None:
                self.saves.append((*saved, started))
            return returned

        return recorded
