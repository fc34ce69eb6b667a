"""Loading and validating one lmms-eval output of a lostattn model: results JSON, sidecar, samples logs.

A run is given as a ``*_results.json`` file or a folder holding exactly one (searched recursively, so lmms-eval's
``--output_path`` works). Its ``<date>_lostattn.json`` sidecar and ``<date>_samples_<task>.jsonl`` logs are the
files with the same date id next to it; both are optional (no ``stats``, no ``--log_samples``). Anything
malformed, truncated or belonging to another run raises :class:`RunError` naming the file and the problem.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

RESULTS_SUFFIX = "_results.json"
SIDECAR_SUFFIX = "_lostattn.json"


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


class RunError(ValueError):
    """A run folder that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Run:
    """One lmms-eval run of a lostattn model."""

    name: str  # the folder given (or holding the results file given), as shown in tables
    path: pathlib.Path  # the results JSON
    results: dict[str, Any]
    sidecar: dict[str, Any] | None
    samples: dict[str, dict[int, dict[str, Any]]]  # task -> doc_id -> logged sample

    @property
    def model(self) -> str:
        return str(self.results.get("model_name") or self.results["config"].get("model_args", "?"))

    @property
    def block(self) -> dict[str, Any]:
        return self.results["lostattn"]

    @property
    def mode(self) -> str:
        return self.block["intervention"]["mode"]

    @property
    def label(self) -> str:
        """The intervention as shown in tables: mode, preset when set, and the spec hash."""
        preset = self.block["intervention"].get("preset")
        return f"{self.mode}{f' ({preset})' if preset else ''} [{self.block['spec_hash']}]"

    def stat_row(self, metric: str, module: str) -> str:
        """The table row of a module's RID or MixIG under this run's statistics definitions (runs written before
        the definitions were recorded used the paper's: the module's input, ΔD as a mean)."""
        from lmms_lostattn.stats import table_row

        stats = self.block.get("stats", {})
        return table_row(metric, module, stats.get("stats_reference", "module"), stats.get("stats_combine", "mean"))

    @property
    def tasks(self) -> list[str]:
        return sorted(self.results["results"])

    def metric(self, task: str, name: str) -> float | None:
        """The aggregate ``name`` (filter ``none``) of ``task``, or None when absent or not a number."""
        value = self.results["results"].get(task, {}).get(f"{name},none")
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    def stderr(self, task: str, name: str) -> float | None:
        """Bootstrap stderr of a metric when lmms-eval computed one, else its CLT stderr."""
        bootstrap = self.metric(task, f"{name}_stderr")
        return bootstrap if bootstrap is not None else self.metric(task, f"{name}_stderr_clt")

    def metrics(self, task: str) -> list[str]:
        """Metric names of ``task`` in the results JSON's order (no stderr rows, no ``lostattn_samples``)."""
        names = [key.split(",")[0] for key in self.results["results"].get(task, {}) if "," in key]
        return [n for n in names if "_stderr" not in n and n != "lostattn_samples" and self.metric(task, n) is not None]


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RunError(f"{path}: not valid JSON ({error}); truncated or not an lmms-eval output?") from None
    if not isinstance(data, dict):
        raise RunError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _read_samples(path: pathlib.Path) -> dict[int, dict[str, Any]]:
    samples: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)
        except json.JSONDecodeError as error:
            raise RunError(f"{path}: line {number} is not valid JSON ({error}); truncated file?") from None
        if not isinstance(sample, dict) or not isinstance(sample.get("doc_id"), int):
            raise RunError(f"{path}: line {number} has no integer doc_id; not an lmms-eval samples log")
        if sample["doc_id"] in samples:
            raise RunError(f"{path}: doc_id {sample['doc_id']} appears twice (line {number}); files mixed up?")
        samples[sample["doc_id"]] = sample
    return samples


def find_results(path: pathlib.Path) -> pathlib.Path:
    """The one results JSON that ``path`` names or holds."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise RunError(f"{path}: no such file or folder")
    found = sorted(path.rglob(f"*{RESULTS_SUFFIX}"))
    if not found:
        raise RunError(f"{path}: no *{RESULTS_SUFFIX} in this folder; not an lmms-eval --output_path?")
    if len(found) > 1:
        listed = ", ".join(str(p.relative_to(path)) for p in found)
        raise RunError(f"{path}: several results files ({listed}); pass one of them instead of the folder")
    return found[0]


def load_run(path: pathlib.Path) -> Run:
    """Load and validate the run at ``path`` (a results JSON or a folder holding exactly one)."""
    path = pathlib.Path(path)
    results_path = find_results(path)
    if not results_path.name.endswith(RESULTS_SUFFIX):
        raise RunError(f"{results_path}: not an lmms-eval results file (name should end in {RESULTS_SUFFIX})")
    results = _read_json(results_path)
    for key in ("results", "lostattn", "config"):
        if not isinstance(results.get(key), dict):
            raise RunError(f"{results_path}: no {key!r} block; not the results of a lostattn model run")
    if "spec_hash" not in results["lostattn"] or "mode" not in results["lostattn"].get("intervention", {}):
        raise RunError(f"{results_path}: the 'lostattn' block lacks spec_hash or intervention.mode")
    folder, date = results_path.parent, results_path.name.removesuffix(RESULTS_SUFFIX)
    for stray in sorted(folder.glob("*_lostattn.json")) + sorted(folder.glob("*_samples_*.jsonl")):
        if not stray.name.startswith(f"{date}_"):
            raise RunError(f"{stray}: belongs to another run than {results_path.name} (date id differs); mixed up?")
    sidecar_path = folder / f"{date}{SIDECAR_SUFFIX}"
    sidecar = _read_json(sidecar_path) if sidecar_path.exists() else None
    spec_hash = results["lostattn"].get("spec_hash")
    if sidecar is not None and sidecar.get("spec_hash") != spec_hash:
        raise RunError(f"{sidecar_path}: spec_hash {sidecar.get('spec_hash')} differs from the results file's "
                       f"{spec_hash}; files from different runs mixed up?")
    samples = {}
    for path_ in sorted(folder.glob(f"{date}_samples_*.jsonl")):
        task = path_.name.removeprefix(f"{date}_samples_").removesuffix(".jsonl")
        if task not in results["results"]:
            raise RunError(f"{path_}: task {task!r} is not in {results_path.name}; files mixed up?")
        samples[task] = _read_samples(path_)
        expected = results.get("n-samples", {}).get(task, {}).get("effective")
        if expected is not None and len(samples[task]) != expected:
            raise RunError(f"{path_}: {len(samples[task])} samples, but {results_path.name} says {expected}; "
                           "truncated?")
    return Run(path.name if path.is_dir() else folder.name, results_path, results, sidecar, samples)


def load_runs(paths: list[pathlib.Path]) -> list[Run]:
    """Load several runs; the same results file given twice is an error."""
    runs = [load_run(p) for p in paths]
    seen: set[pathlib.Path] = set()
    for run in runs:
        if run.path.resolve() in seen:
            raise RunError(f"{run.path}: given twice")
        seen.add(run.path.resolve())
    return runs


def version_changes(base: Run, other: Run) -> list[str]:
    """Package versions recorded differently in the two runs, as ``name a -> b``."""
    old, new = (run.block.get("versions", {}) for run in (base, other))
    changed = sorted(name for name in {*old, *new} if old.get(name) != new.get(name))
    return [f"{name} {old.get(name)} -> {new.get(name)}" for name in changed]


def comparability(base: Run, other: Run, task: str) -> str | None:
    """Why ``other`` cannot be compared with ``base`` on ``task`` (None when it can).

    Checked: both ran the task, with the same ``--limit``/offset, on the same documents (doc_id -> doc_hash from
    the samples logs when both have them, else the same effective sample count).
    """
    if task not in base.results["results"] or task not in other.results["results"]:
        return f"{task} is not in both runs"
    for key in ("limit", "offset"):
        if base.results["config"].get(key) != other.results["config"].get(key):
            return f"different --{key} ({base.results['config'].get(key)} vs {other.results['config'].get(key)})"
    if task in base.samples and task in other.samples:
        hashes = [{doc: s.get("doc_hash") for doc, s in run.samples[task].items()} for run in (base, other)]
        if hashes[0] != hashes[1]:
            return f"different documents in {task} (doc_id/doc_hash of the samples logs differ)"
        return None
    counts = [run.results.get("n-samples", {}).get(task, {}).get("effective") for run in (base, other)]
    return None if counts[0] == counts[1] else f"different sample counts in {task} ({counts[0]} vs {counts[1]})"
