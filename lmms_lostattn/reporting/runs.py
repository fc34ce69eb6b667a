"""Loading and validating one run of a lostattn model, as lmms-eval or lm-eval wrote it: results JSON, per-layer
statistics, samples logs.

A run is given as a results JSON or a folder holding exactly one (searched recursively, so either harness's
``--output_path`` works). The files of one run share its date id (:class:`Layout`): lmms-eval writes
``<date>_results.json``, a ``<date>_lostattn.json`` sidecar with the per-layer statistics and
``<date>_samples_<task>.jsonl`` logs; lm-eval writes ``results_<date>.json`` (``<name>_<date>.json`` for an
``--output_path`` naming a .json file), whose ``lostattn`` block holds the per-layer statistics, and
``samples_<task>_<date>.jsonl``. Sidecar and samples logs are optional (no ``stats``, no ``--log_samples``). Either
harness writes every run of one model into the same folder: the other runs' files are left alone, but a samples log or
sidecar whose date id matches no results file there, and anything malformed or truncated, raises :class:`RunError`
naming the file and the problem.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from lmms_lostattn.compat.kernels import describe_layers
from lmms_lostattn.reporting.aggregations import default_aggregation
from lmms_lostattn.statistics.collector import table_row

RESULTS_SUFFIX = "_results.json"  # lmms-eval's


@dataclass(frozen=True)
class Layout:
    """How a harness names the files of one run: templates with ``{date}`` (the run's date id, matching the regular
    expression ``date``), ``{task}`` and ``{stem}`` (a name the user chose)."""

    harness: str
    results: str
    samples: str
    sidecar: str | None  # None: the per-layer statistics are in the results JSON's ``lostattn`` block
    date: str = ".+"

    def glob(self, template: str, **known: str) -> str:
        return template.format(**{"date": "*", "task": "*", "stem": "*", **known})

    def match(self, template: str, name: str, **known: str) -> dict[str, str] | None:
        """The date id, task and stem a file name holds, or None when it is not named by ``template``."""
        fields = {"date": f"(?P<date>{self.date})", "task": "(?P<task>.+)", "stem": "(?P<stem>.+)"}
        fields |= {key: re.escape(value) for key, value in known.items()}
        pattern = re.escape(template).replace(r"\{", "{").replace(r"\}", "}").format(**fields)
        found = re.fullmatch(pattern, name)
        return found.groupdict() if found else None


LAYOUTS = (
    Layout("lmms-eval", "{date}_results.json", "{date}_samples_{task}.jsonl", "{date}_lostattn.json"),
    # ``<output_path>/<model>/results_<date>.json``, or ``<stem>_<date>.json`` for an --output_path naming a .json
    # file (its samples logs beside it); the date id is ``datetime.now().isoformat()`` with ``-`` for ``:``
    Layout("lm-eval", "{stem}_{date}.json", "samples_{task}_{date}.jsonl", None,
           date=r"\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(?:\.\d+)?"),
)
RESULTS_NAMES = "<date>_results.json (lmms-eval) or results_<date>.json, <name>_<date>.json (lm-eval)"

STATISTICS_PREFIX = "lostattn_"  # the plugin's statistics rows: each a mean over documents of per-sample values


def metric_id(metric: str, filter_: str) -> str:
    """How a metric is named in tables, ``check`` lines and ``--metrics``: ``exact_match`` under the harnesses'
    default filter ``none``, else as the results JSON keys it, ``exact_match,strict-match``."""
    return metric if filter_ == "none" else f"{metric},{filter_}"


def split_metric(name: str) -> tuple[str, str]:
    """``(metric, filter)`` of a :func:`metric_id`."""
    metric, _, filter_ = name.partition(",")
    return metric, filter_ or "none"


class RunError(ValueError):
    """A run folder that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class LoadedRun:
    """One run of a lostattn model, by either harness."""

    name: str  # the folder given (or holding the results file given), as shown in tables
    path: pathlib.Path  # the results JSON
    layout: Layout
    results: dict[str, Any]
    sidecar: dict[str, Any] | None  # the per-layer statistics: {"tasks": {task: {"samples", "per_layer"}}, ...}
    samples: dict[str, dict[int, dict[str, Any]]]  # task -> doc_id -> logged sample (the "none" filter's, or first)
    filtered: dict[str, dict[str, dict[int, dict[str, Any]]]]  # task -> filter -> doc_id -> sample (lm-eval's lines)

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
        stats = self.block.get("stats", {})
        return table_row(metric, module, stats.get("stats_reference", "module"), stats.get("stats_combine", "mean"))

    @property
    def tasks(self) -> list[str]:
        return sorted(self.results["results"])

    def metric(self, task: str, name: str) -> float | None:
        """The aggregate ``name`` of ``task`` (:func:`metric_id`), or None when absent or not a finite number."""
        metric, filter_ = split_metric(name)
        value = self.results["results"].get(task, {}).get(f"{metric},{filter_}")
        number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if number else None

    def stderr(self, task: str, name: str) -> float | None:
        """Bootstrap stderr of a metric when the harness computed one, else its CLT stderr (lmms-eval)."""
        metric, filter_ = split_metric(name)
        for suffix in ("_stderr", "_stderr_clt"):
            value = self.metric(task, metric_id(f"{metric}{suffix}", filter_))
            if value is not None:
                return value
        return None

    def higher_is_better(self, task: str, name: str) -> bool | None:
        """The metric's recorded direction (None where the results do not record one)."""
        return self.results.get("higher_is_better", {}).get(task, {}).get(split_metric(name)[0])

    def sample_log(self, task: str, name: str) -> dict[int, dict[str, Any]] | None:
        """The samples log lines that hold the per-sample values of metric ``name`` (None without a log): each
        filter's lines where the log has them (lm-eval's, lmms-eval's of a task with several filters; the statistics
        rows' values are in every one), else the log's one line per document."""
        metric, filter_ = split_metric(name)
        by_filter = self.filtered.get(task)
        if not by_filter or metric.startswith(STATISTICS_PREFIX):
            return self.samples.get(task)
        return by_filter.get(filter_)

    @property
    def groups(self) -> dict[str, list[str]]:
        """Each group of the run and its tasks (``group_subtasks``; a group has no samples log of its own)."""
        return {name: list(tasks) for name, tasks in self.results.get("group_subtasks", {}).items() if tasks}

    def aggregation(self, task: str, name: str) -> str | None:
        """How the harness aggregated metric ``name`` of ``task``: as the task's config declares it (``mean``, an
        aggregation function's name as either harness records it: its repr or its source), else the metric's
        registered default where the harness uses it (:func:`default_aggregation`), else None (not known)."""
        metric = split_metric(name)[0]
        config = self.results.get("configs", {}).get(task, {})
        entries = [entry for entry in config.get("metric_list") or () if isinstance(entry, dict)]
        for entry in entries:
            declared = entry.get("aggregation") if entry.get("metric") == metric else None
            if isinstance(declared, str):
                function = re.match(r"\s*(?:<function |def )(\w+)", declared)
                return function.group(1) if function else declared.strip()
        listed = any(entry.get("metric") == metric and entry.get("aggregation") is None for entry in entries)
        return default_aggregation(self.layout.harness, config, metric, listed)

    def metrics(self, task: str, numbers_only: bool = True) -> list[str]:
        """Metric ids (:func:`metric_id`) of ``task`` in the results JSON's order (no stderr rows, no
        ``lostattn_samples``), those whose value is a finite number unless ``numbers_only`` is false."""
        names = [metric_id(*key.split(",", 1)) for key in self.results["results"].get(task, {}) if "," in key]
        return [name for name in names if "_stderr" not in split_metric(name)[0] and name != "lostattn_samples"
                and (not numbers_only or self.metric(task, name) is not None)]


# The objects of a results JSON that are read, and the type of each of their values: per task (or group) an object,
# a group's list of members; in the ``lostattn`` block (and lmms-eval's sidecar), the settings and the statistics of
# each task.
RESULTS_BLOCKS = {"results": dict, "n-samples": dict, "configs": dict, "higher_is_better": dict, "group_subtasks": list}
STATISTICS_BLOCKS = {"intervention": object, "stats": object, "tasks": dict, "versions": object}
_HOLDING = {dict: " of objects", list: " of lists", object: ""}


def _check_blocks(data: dict[str, Any], blocks: dict[str, type], path: pathlib.Path, within: str = "") -> None:
    """Each of ``blocks`` present in ``data`` is an object whose every value is of its type, else :class:`RunError`."""
    for key, kind in blocks.items():
        block = data.get(key, {})
        if not isinstance(block, dict) or not all(isinstance(value, kind) for value in block.values()):
            raise RunError(f"{path}: {within}{key!r} is not an object{_HOLDING[kind]}; edited, or not a harness's "
                           "output?")


def _check_record(block: dict[str, Any], path: pathlib.Path) -> None:
    """The values of a ``lostattn`` block the commands read besides its blocks: the table's token group (a name) and
    the hub kernels record (an object whose ``layers`` counts each kernel layer), else :class:`RunError`."""
    group = block.get("stats", {}).get("table_group")
    kernels = block.get("kernels")
    layers = kernels.get("layers", {}) if isinstance(kernels, dict) else None
    if group is not None and not isinstance(group, str):
        raise RunError(f"{path}: lostattn.stats.table_group is not a name; edited, or not a harness's output?")
    if kernels is not None and not (isinstance(layers, dict) and all(isinstance(n, int) for n in layers.values())):
        raise RunError(f"{path}: lostattn.kernels is not an object whose 'layers' counts kernel layers; edited, or "
                       "not a harness's output?")


def _is_number_or_null(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_per_layer(tasks: dict[str, Any], path: pathlib.Path) -> None:
    """Every per-layer entry of the per-task statistics (each module, group and metric) holds ``mean`` and
    ``stderr`` (numbers, or null where a layer has too few samples) and ``n`` (counts), one value per decoder layer:
    the same length throughout."""
    try:
        entries = [metric["layers"] for entry in tasks.values() for groups in entry.get("per_layer", {}).values()
                   for metrics in groups.values() for metric in metrics.values() if "layers" in metric]
        lengths = {len(entry[key]) for entry in entries for key in ("mean", "stderr", "n")}
    except (AttributeError, TypeError, KeyError):
        raise RunError(f"{path}: the per-layer statistics are not nested as a run writes them (task -> per_layer -> "
                       "module -> group -> metric -> layers -> mean, stderr, n); edited?") from None
    if not all(_is_number_or_null(value) for entry in entries for key in ("mean", "stderr") for value in entry[key]) \
            or not all(_is_count(value) for entry in entries for value in entry["n"]):
        raise RunError(f"{path}: a per-layer mean or stderr is neither a number nor null, or a count is not a "
                       "non-negative integer; edited?")
    if len(lengths) > 1:
        raise RunError(f"{path}: per-layer statistics of different lengths ({', '.join(map(str, sorted(lengths)))}); "
                       "edited, or files of different models mixed up?")


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise RunError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); truncated, or not a "
                       "harness's output?") from None


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise RunError(f"{path}: not valid JSON ({error}); truncated, or not a harness's output?") from None
    if not isinstance(data, dict):
        raise RunError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _read_samples(
    path: pathlib.Path, filters: Sequence[str] = ()
) -> tuple[dict[int, dict[str, Any]], dict[str, dict[int, dict[str, Any]]]]:
    """A samples log by doc_id, and by filter and doc_id. lm-eval logs a document once per filter, naming it: the
    ``none`` filter's line is the document's (the statistics rows' filter), or the first filter's where the task has
    no ``none`` filter. lmms-eval names no filter: one line per document, or for a task with several ``filters``
    (its ``filter_list``) one per document and filter, the i-th line of a document being the i-th filter's."""
    lines: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)
        except json.JSONDecodeError as error:
            raise RunError(f"{path}: line {number} is not valid JSON ({error}); truncated file?") from None
        if not isinstance(sample, dict) or not isinstance(sample.get("doc_id"), int):
            raise RunError(f"{path}: line {number} has no integer doc_id; not a samples log")
        lines.append((number, sample))
    by_filter: dict[Any, dict[int, dict[str, Any]]] = {}
    seen: dict[int, int] = {}  # lines so far of each document (unnamed lines of a task with several filters)
    for number, sample in lines:
        name = sample.get("filter")
        if name is None and len(filters) > 1:
            seen[sample["doc_id"]] = seen.get(sample["doc_id"], -1) + 1
            name = filters[seen[sample["doc_id"]]] if seen[sample["doc_id"]] < len(filters) else None
        log = by_filter.setdefault(name, {})
        if sample["doc_id"] in log:
            unnamed = "" if "filter" in sample else " (or a task with several filters, which lmms-eval logs unnamed)"
            raise RunError(f"{path}: doc_id {sample['doc_id']} appears twice (line {number}); files mixed up"
                           f"{unnamed}?")
        log[sample["doc_id"]] = sample
    if len({frozenset(log) for log in by_filter.values()}) > 1:
        raise RunError(f"{path}: the filters' lines log different documents; truncated, or files mixed up?")
    kept = "none" if "none" in by_filter else next(iter(by_filter), None)
    return by_filter.get(kept, {}), {name: log for name, log in by_filter.items() if isinstance(name, str)}


def _layout_of(path: pathlib.Path) -> tuple[Layout, str] | None:
    """The layout naming a results file, and the run's date id."""
    for layout in LAYOUTS:
        found = layout.match(layout.results, path.name)
        if found:
            return layout, found["date"]
    return None


def find_results(path: pathlib.Path) -> pathlib.Path:
    """The one results JSON that ``path`` names or holds."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise RunError(f"{path}: no such file or folder")
    found = sorted({p for layout in LAYOUTS for p in path.rglob(layout.glob(layout.results))
                    if layout.match(layout.results, p.name)})
    if not found:
        raise RunError(f"{path}: no {RESULTS_NAMES} in this folder; not an lmms-eval or lm-eval --output_path?")
    if len(found) > 1:
        listed = ", ".join(str(p.relative_to(path)) for p in found)
        raise RunError(f"{path}: several results files ({listed}); pass one of them instead of the folder")
    return found[0]


def load_run(path: pathlib.Path) -> LoadedRun:
    """Load and validate the run at ``path`` (a results JSON or a folder holding exactly one)."""
    path = pathlib.Path(path)
    results_path = find_results(path)
    named = _layout_of(results_path)
    if named is None:
        raise RunError(f"{results_path}: not a results file of lmms-eval or lm-eval (named {RESULTS_NAMES})")
    layout, date = named
    results = _read_json(results_path)
    for key in ("results", "lostattn", "config"):
        if not isinstance(results.get(key), dict):
            raise RunError(f"{results_path}: no {key!r} block; not the results of a lostattn model run")
    _check_blocks(results, RESULTS_BLOCKS, results_path)
    _check_blocks(results["lostattn"], STATISTICS_BLOCKS, results_path, "lostattn.")
    _check_record(results["lostattn"], results_path)
    if "spec_hash" not in results["lostattn"] or "mode" not in results["lostattn"].get("intervention", {}):
        raise RunError(f"{results_path}: the 'lostattn' block lacks spec_hash or intervention.mode")
    folder = results_path.parent
    dates = {found["date"] for other in folder.glob(layout.glob(layout.results))
             if (found := layout.match(layout.results, other.name))}
    for template in (layout.samples, layout.sidecar):
        for stray in sorted(folder.glob(layout.glob(template))) if template else ():
            if all(layout.match(template, stray.name, date=other) is None for other in dates):
                raise RunError(f"{stray}: belongs to no results file in {folder} (its date id matches none); "
                               "a results file missing, or files mixed up?")
    sidecar = results["lostattn"] if "tasks" in results["lostattn"] else None
    if layout.sidecar is not None:
        sidecar_path = folder / layout.sidecar.format(date=date)
        sidecar = _read_json(sidecar_path) if sidecar_path.exists() else None
        spec_hash = results["lostattn"].get("spec_hash")
        if sidecar is not None and sidecar.get("spec_hash") != spec_hash:
            raise RunError(f"{sidecar_path}: spec_hash {sidecar.get('spec_hash')} differs from the results file's "
                           f"{spec_hash}; files from different runs mixed up?")
        if sidecar is not None:
            _check_blocks(sidecar, STATISTICS_BLOCKS, sidecar_path)
    if sidecar is not None:
        _check_per_layer(sidecar.get("tasks", {}), sidecar_path if layout.sidecar else results_path)
    samples, filtered = {}, {}
    for path_ in sorted(folder.glob(layout.glob(layout.samples, date=date))):
        task = layout.match(layout.samples, path_.name, date=date)["task"]
        if task not in results["results"]:
            raise RunError(f"{path_}: task {task!r} is not in {results_path.name}; files mixed up?")
        filters = [entry.get("name") for entry in results.get("configs", {}).get(task, {}).get("filter_list") or ()
                   if isinstance(entry, dict)]
        samples[task], filtered[task] = _read_samples(path_, filters)
        expected = results.get("n-samples", {}).get(task, {}).get("effective")
        if expected is not None and len(samples[task]) != expected:
            raise RunError(f"{path_}: {len(samples[task])} samples, but {results_path.name} says {expected}; "
                           "truncated?")
    name = path.name if path.is_dir() else folder.name
    return LoadedRun(name, results_path, layout, results, sidecar, samples, filtered)


def load_runs(paths: list[pathlib.Path]) -> list[LoadedRun]:
    """Load several runs; the same results file given twice is an error. Runs that would be shown under one name
    (results files given from one folder) are named ``<folder>/<results file stem>``."""
    runs = [load_run(p) for p in paths]
    seen: set[pathlib.Path] = set()
    for run in runs:
        if run.path.resolve() in seen:
            raise RunError(f"{run.path}: given twice")
        seen.add(run.path.resolve())
    names = [run.name for run in runs]
    return [replace(run, name=f"{run.name}/{run.path.stem}") if names.count(run.name) > 1 else run for run in runs]


def version_changes(base: LoadedRun, other: LoadedRun) -> list[str]:
    """Package versions recorded differently in the two runs, as ``name a -> b``, and the hub kernel layers where
    both runs record them (``hub kernels a -> b``: the two loads ran different layers)."""
    old, new = (run.block.get("versions", {}) for run in (base, other))
    changed = sorted(name for name in {*old, *new} if old.get(name) != new.get(name))
    changes = [f"{name} {old.get(name)} -> {new.get(name)}" for name in changed]
    old_kernels, new_kernels = (_kernel_layers(run) for run in (base, other))
    if None not in (old_kernels, new_kernels) and old_kernels != new_kernels:
        changes.append(f"hub kernels {old_kernels} -> {new_kernels}")
    return changes


def _kernel_layers(run: LoadedRun) -> str | None:
    """The hub kernel layers a run records (``LigerRMSNorm x65, Silu x32``, ``none``), None where it has no record."""
    record = run.block.get("kernels")
    if record is None:
        return None
    return describe_layers(record.get("layers", {}))


# What identifies a logged document besides its doc_id, best first: lm-eval's hashes of its prompt and target text,
# lmms-eval's prompt text and target, else the harness's doc_hash. Neither harness's doc_hash is usable where another
# field is logged: lm-eval hashes the document as JSON with an image's repr (which holds its memory address, so it
# changes from run to run), lmms-eval its request's empty ``doc`` (``null``, the same for every document).
DOCUMENT_FIELDS = (("prompt_hash", "target_hash"), ("input", "target"), ("doc_hash",))


def _identity_fields(*logs: dict[int, dict[str, Any]]) -> tuple[str, ...]:
    """The first of :data:`DOCUMENT_FIELDS` that every sample of every log carries (none: doc_id alone)."""
    for fields in DOCUMENT_FIELDS:
        if all(field in sample for log in logs for sample in log.values() for field in fields):
            return fields
    return ()


def _doc_ids(docs: Sequence[int], most: int = 5) -> str:
    shown = ", ".join(str(doc) for doc in docs[:most])
    return f"{shown}, … ({len(docs)} in all)" if len(docs) > most else shown


def _document_difference(task: str, base: dict[int, dict[str, Any]], other: dict[int, dict[str, Any]]) -> str | None:
    """How the documents of two samples logs of ``task`` differ (None when they are the same)."""
    only = [sorted(set(a) - set(b)) for a, b in ((base, other), (other, base))]
    if any(only):
        where = "; ".join(f"doc_id {_doc_ids(docs)} only in {side}"
                          for docs, side in zip(only, ("the baseline", "this run"), strict=True) if docs)
        return f"different documents in {task} ({len(base)} in the baseline, {len(other)} in this run: {where})"
    fields = _identity_fields(base, other)

    def key(sample: dict[str, Any]) -> list[str]:
        return [json.dumps(sample[field], sort_keys=True) for field in fields]

    changed = [doc for doc in sorted(base) if key(base[doc]) != key(other[doc])]
    if changed:
        return f"different documents in {task} (doc_id {_doc_ids(changed)}: {'/'.join(fields)} differ)"
    return None


# The statistics settings that change what a statistics row holds without changing its name (the reference and the
# ΔD combination are in the name): the token group in the table, the token cap and its rule, MixIG's α, the rank
# tolerance, and the pass measured.
STATISTICS_DEFINITIONS = ("table_group", "stats_max_tokens", "token_cap_rule", "mixig", "rank_tolerance", "computed_on")


def statistics_difference(base: LoadedRun, other: LoadedRun) -> str | None:
    """Why the statistics rows of ``other`` measure something else than ``base``'s (None when they do not): one of
    the runs measured none, or the :data:`STATISTICS_DEFINITIONS` both runs record differ."""
    old, new = (run.block.get("stats", {}) for run in (base, other))
    unmeasured = [str(run.path) for run, settings in ((base, old), (other, new)) if settings.get("stats") == "none"]
    if len(unmeasured) == 1:  # both: neither run has statistics rows to compare
        return f"no statistics measured in {unmeasured[0]} (stats=none)"
    differ = [f"{key} {old[key]} vs {new[key]}" for key in STATISTICS_DEFINITIONS
              if key in old and key in new and old[key] != new[key]]
    return f"statistics defined differently ({'; '.join(differ)})" if differ else None


def comparability(base: LoadedRun, other: LoadedRun, task: str) -> str | None:
    """Why ``other`` cannot be compared with ``base`` on ``task`` (None when it can); a message names the task once
    and gives the baseline's value first.

    Checked: both ran the task, with the same ``--limit``/offset, on the same documents: from the samples logs when
    both have them (the same doc_ids, each with the same prompt and target, :data:`DOCUMENT_FIELDS`), else the same
    effective sample count.
    """
    if task not in base.results["results"] or task not in other.results["results"]:
        return f"{task} is not in both runs"
    for key in ("limit", "offset"):
        if base.results["config"].get(key) != other.results["config"].get(key):
            return f"different --{key} ({base.results['config'].get(key)} vs {other.results['config'].get(key)})"
    if task in base.samples and task in other.samples:
        return _document_difference(task, base.samples[task], other.samples[task])
    counts = [run.results.get("n-samples", {}).get(task, {}).get("effective") for run in (base, other)]
    if counts[0] == counts[1]:
        return None
    return f"different documents in {task} ({counts[0]} in the baseline, {counts[1]} in this run)"
