"""``lostattn reproduce``: the paper's two experiments for a user's model and tasks, through lmms-eval.

Runs, each an lmms-eval process writing under ``<output>/<run>/``:

* ``vanilla`` (``attn=none,stats=all``): Table 1's attention and FFN rows, the FFN under both references, and
  Table 2's baseline (statistics do not change the answers);
* ``noise_delta`` and ``noise_qkv`` (``attn_layers=all``, ``stats=all``): Table 1's noise rows;
* ``sap_seed<s>`` per seed (``attn=gaussian,attn_preset=paper,attn_seed=<s>``): Table 2.

A run whose folder holds a results file written for the same command is kept; any other (interrupted, or from
another command) is run again. Everything the user gave is checked before the first run starts: the model id, the
arguments the runs set themselves, the seeds, the tasks (through lmms-eval's task index) and the preset's layers
and heads against the model's config. Paths the runs take (``pretrained=`` a local directory, ``--include_path``) are
made absolute: each run's lmms-eval works in the run's folder.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace

from transformers import AutoConfig

from lmms_lostattn.compat.internals import internal
from lmms_lostattn.config.spec import InterventionSpec, SpecError
from lmms_lostattn.families import adapter_for
from lmms_lostattn.model_wrappers.common.plugin import looks_like_plugin_arg
from lmms_lostattn.model_wrappers.lmms_eval.base import model_args_pieces
from lmms_lostattn.model_wrappers.lmms_eval.launch import run_lmms_eval
from lmms_lostattn.reporting.paper import reproduction_table1, reproduction_table2
from lmms_lostattn.reporting.runs import LoadedRun, RunError, load_run, version_changes
from lmms_lostattn.reporting.tables import csv_text, markdown

COMMAND_FILE = "command.json"
RUN_SET = ("attn", "attn_preset", "attn_seed")  # what the SAP runs set themselves
FIXED_RUNS = {
    "vanilla": "attn=none,stats=all",
    "noise_delta": "attn=noise_delta,attn_layers=all,stats=all",
    "noise_qkv": "attn=noise_qkv,attn_layers=all,stats=all",
}


class ReproduceError(ValueError):
    """Input ``lostattn reproduce`` cannot run (the message names it and what is accepted)."""


@dataclass(frozen=True)
class Plan:
    """What to run: lmms-eval's model, base ``model_args``, tasks and extra flags; each run's own arguments."""

    model: str
    model_args: str
    tasks: tuple[str, ...]
    extra: tuple[str, ...]
    runs: dict[str, str]

    def model_args_of(self, run: str) -> str:
        return f"{self.model_args},{self.runs[run]}"

    def command(self, run: str) -> dict[str, object]:
        """What identifies a run's output (recorded next to it)."""
        return {
            "model": self.model,
            "model_args": self.model_args_of(run),
            "tasks": list(self.tasks),
            "extra": list(self.extra),
        }


def parse_seeds(text: str) -> tuple[int, ...]:
    pieces = [piece.strip() for piece in text.split(",") if piece.strip()]
    if not pieces or not all(re.fullmatch(r"-?\d+", piece) for piece in pieces):
        raise ReproduceError(f"--seeds {text!r}: expected integers separated by commas (e.g. 0,1,2)")
    return tuple(dict.fromkeys(int(piece) for piece in pieces))


def _pieces(text: str) -> list[tuple[str, str, str]]:
    """``key=value,...`` as lmms-eval splits ``--model_args`` (list values may be written plainly), each piece
    partitioned at its first ``=``."""
    try:
        return model_args_pieces(text)
    except SpecError as error:
        raise ReproduceError(str(error)) from None


def _arguments(text: str) -> dict[str, str]:
    return {key: value for key, _, value in _pieces(text)}


def _absolute_pretrained(model_args: str) -> str:
    """``model_args`` with a relative ``pretrained=`` that names a local directory made absolute."""
    pieces = _pieces(model_args)
    if not any(key == "pretrained" and not pathlib.Path(value).is_absolute() and pathlib.Path(value).exists()
               for key, _, value in pieces):
        return model_args
    return ",".join(f"pretrained={pathlib.Path(value).resolve()}" if key == "pretrained" else "".join((key, eq, value))
                    for key, eq, value in pieces)


def make_plan(
    model: str,
    model_args: str,
    tasks: Sequence[str],
    seeds: Sequence[int],
    sap_args: str = "",
    include_path: str | None = None,
    extra: Sequence[str] = (),
) -> Plan:
    """The runs for ``model``, after checking every input before anything runs."""
    internal("lmms_eval.models", "get_model")  # lmms-eval's registry first: it imports our manifests itself
    from lmms_lostattn.model_wrappers.lmms_eval.manifests import get_manifests

    ours = sorted(manifest.model_id for manifest in get_manifests())
    if model not in ours:
        raise ReproduceError(f"--model {model!r} is not a lostattn model; accepted: {', '.join(ours)}")
    given = _arguments(model_args)
    if "pretrained" not in given:
        raise ReproduceError("--model_args needs pretrained=<model id or directory>")
    misspelt = {key: value for key, value in given.items() if looks_like_plugin_arg(key) and key not in
                InterventionSpec.ARGS}
    if misspelt:
        try:
            InterventionSpec.from_model_args(misspelt)
        except SpecError as error:
            raise ReproduceError(f"--model_args: {error}") from None
    taken = [key for key in given if key in InterventionSpec.ARGS]
    if taken:
        raise ReproduceError(
            f"--model_args sets {', '.join(taken)}, which the runs set themselves; give SAP options with --sap-args"
        )
    sap = _arguments(sap_args)
    unknown = [key for key in sap if key not in InterventionSpec.ARGS or key.startswith("stats") or key in RUN_SET]
    if unknown:
        accepted = ", ".join(k for k in InterventionSpec.ARGS if k.startswith("attn_") and k not in RUN_SET)
        raise ReproduceError(f"--sap-args: {', '.join(unknown)} cannot be given; accepted: {accepted}")
    include_path = str(pathlib.Path(include_path).resolve()) if include_path else None
    model_args = _absolute_pretrained(model_args)
    _check_tasks(tasks, include_path)
    runs = dict(FIXED_RUNS)
    for seed in seeds:
        runs[f"sap_seed{seed}"] = ",".join(
            ["attn=gaussian,attn_preset=paper", f"attn_seed={seed}", *(f"{k}={v}" for k, v in sap.items())]
        )
    _check_runs(given, runs)
    flags = [*(["--include_path", include_path] if include_path else []), "--log_samples", *extra]
    return Plan(model, model_args, tuple(tasks), tuple(flags), runs)


def _check_tasks(tasks: Sequence[str], include_path: str | None) -> None:
    if not tasks:
        raise ReproduceError("--tasks: give at least one task")
    known = set(internal("lmms_eval.tasks", "TaskManager")(include_path=include_path).all_tasks)
    missing = [task for task in tasks if task not in known]
    if missing:
        where = f" (with --include_path {include_path})" if include_path else " (add --include_path for local tasks)"
        raise ReproduceError(f"--tasks: lmms-eval knows no task {', '.join(missing)}{where}")


def _check_runs(given: dict[str, str], runs: dict[str, str]) -> None:
    """Resolve and check every run's arguments against the model's config (no weights), so a run the model cannot
    take (a preset that does not fit it, noise_qkv on fused q/k/v projections) fails now, not after the others."""
    remote = given.get("trust_remote_code", "").lower() == "true"
    try:
        config = AutoConfig.from_pretrained(given["pretrained"], trust_remote_code=remote)
        adapter = adapter_for(config)
    except (OSError, ValueError) as error:  # no such checkpoint; a model type transformers or the plugin lacks
        raise ReproduceError(f"pretrained={given['pretrained']}: {str(error).splitlines()[0]}") from None
    for name, arguments in runs.items():
        try:
            adapter.resolve(config, InterventionSpec.from_model_args(_arguments(arguments)))
        except SpecError as error:
            if name.startswith("sap_"):
                raise ReproduceError(f"the {name} run cannot run on this model: {error} (pass it with --sap-args)"
                                     ) from error
            raise ReproduceError(f"Table 1 needs the {name} run ({arguments}), which this model cannot run: {error}"
                                 ) from error


def _unfinished(folder: pathlib.Path, command: dict[str, object]) -> str | None:
    """Why ``folder`` must be run, or None where it holds a finished run of ``command`` that still loads: its command
    file is written once lmms-eval has returned and its output loaded, so an interrupted or failed run has none."""
    try:
        recorded = json.loads((folder / COMMAND_FILE).read_text())
    except (OSError, ValueError):
        return "not finished"
    if recorded != command:
        return "run with other arguments"
    try:
        load_run(folder)
    except (OSError, RunError) as error:
        return f"its output no longer loads ({error})"
    return None


def run_plan(plan: Plan, output: pathlib.Path) -> dict[str, pathlib.Path]:
    """Run what is not finished yet; ``run -> its folder``."""
    folders = {}
    for name in plan.runs:
        folder, command = output / name, plan.command(name)
        why = _unfinished(folder, command)
        if why is None:
            print(f"lostattn reproduce: {name} is done ({folder}), not run again", flush=True)
        else:
            if folder.exists():
                print(f"lostattn reproduce: {name} in {folder}: {why}; running it again", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            run_lmms_eval(plan.model, plan.model_args_of(name), plan.tasks, folder, *plan.extra)
            try:
                load_run(folder)
            except RunError as error:
                raise ReproduceError(f"{name}: lmms-eval ended, but its output does not load: {error}") from error
            (folder / COMMAND_FILE).write_text(json.dumps(command))
        folders[name] = folder
    return folders


def _version_notes(runs: dict[str, LoadedRun], names: Sequence[str]) -> list[str]:
    """The runs among ``names`` recorded under other package versions or hub kernels than most of them (a run kept
    from an earlier invocation), each against the run that differs from the fewest others (the first on a tie)."""
    differing = {a: sum(bool(version_changes(runs[a], runs[b])) for b in names) for a in names}
    reference = min(names, key=differing.__getitem__)
    return [f"{name}: versions differ from {reference} ({', '.join(changes)})" for name in names
            if (changes := version_changes(runs[reference], runs[name]))]


def tables(folders: dict[str, pathlib.Path]) -> dict[str, str]:
    """``file name -> content`` of Table 1 and Table 2 (Markdown and CSV)."""
    try:
        runs = {name: load_run(folder) for name, folder in folders.items()}
    except RunError as error:
        raise ReproduceError(str(error)) from error
    saps = [name for name in runs if name.startswith("sap_seed")]
    table1 = reproduction_table1(runs["vanilla"], runs["noise_delta"], runs["noise_qkv"])
    table1 = replace(table1, notes=[*table1.notes, *_version_notes(runs, ["vanilla", "noise_delta", "noise_qkv"])])
    table2 = reproduction_table2(runs["vanilla"], [runs[name] for name in saps])
    table2 = replace(table2, notes=[*table2.notes, *_version_notes(runs, ["vanilla", *saps])])
    return {
        "table1.md": markdown(table1),
        "table1.csv": csv_text(table1),
        "table2.md": markdown(table2),
        "table2.csv": csv_text(table2),
    }
