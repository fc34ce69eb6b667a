"""The ``lostattn`` command (also ``python -m lmms_lostattn``).

* ``lostattn tasks-path [--host lm_eval]``: the directory to pass to ``lmms-eval --include_path`` (or
  ``lostattn-lm-eval --include_path``) for the shipped local tasks.
* ``lostattn build-tiny DIR [--variant V]``: a tiny random-weight model of any supported family (default LLaVA-1.5),
  loadable with ``from_pretrained(DIR)``.
* ``lostattn demo``: the README's main job: lmms-eval on the shipped trained model (shapes-llava) and the local tasks,
  learned attention vs. Gaussian, uniform and knocked-out attention over image tokens, with RID/MixIG; a comparison
  table, the report and the leaderboard.
* ``lostattn reproduce --model M --model_args ... --tasks T [--seeds 0,1,2] [-o DIR]``: the paper's Table 1 (both
  RID references) and Table 2 (vanilla against SAP over seeds, paired tests) through lmms-eval; finished runs are
  kept, interrupted ones redone.
* ``lostattn doctor``: the installed versions against the tested ranges, every contact point with an upstream
  internal, and a tiny model through prefill and cached decoding with edits and statistics; exit 0 when supported.
* ``lostattn shapes-llava-path``: the directory of the shipped trained model (``pretrained=`` of lmms-eval).
* ``lostattn report RUN...``, ``lostattn compare RUN...``, ``lostattn check RUN --baseline RUN``: per-layer plots and
  the paper's tables, a leaderboard with paired tests, and a CI regression gate over lmms-eval or lm-eval output
  folders. Unusable input exits 2 with a message naming the file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from lmms_lostattn.testing import FAMILY_VARIANTS

if TYPE_CHECKING:
    from lmms_lostattn.compare import Table

DEMO_TASKS = ("lostattn_pope", "lostattn_shapes_color")
DEMO_RUNS = {
    "learned": "attn=none",
    "gaussian": "attn=gaussian,attn_preset=paper,attn_layers=1:",
    "uniform": "attn=uniform,attn_layers=all",
    "knockout": "attn=knockout,attn_layers=all,attn_rows=text",
}
DEMO_ROWS = (
    ("lostattn_pope", "pope_accuracy"),
    ("lostattn_pope", "pope_f1_score"),
    ("lostattn_shapes_color", "exact_match"),
    *(("lostattn_pope", f"lostattn_{m}_{u}") for m in ("rid", "mixig") for u in ("attn", "ffn")),
)


def _run_lmms_eval(model_args: str, tasks: Sequence[str], limit: int | None, output: pathlib.Path) -> dict:
    """One demo run of ``lostattn_llava`` (4 new tokens, the shipped tasks); returns its results."""
    from lmms_lostattn.runs import RunError, run_lmms_eval
    from lmms_lostattn.tasks import tasks_path

    extra = ["--include_path", str(tasks_path()), "--gen_kwargs", "max_new_tokens=4"]
    extra += ["--limit", str(limit)] if limit else []
    try:
        found = run_lmms_eval("lostattn_llava", model_args, tasks, output, *extra)
    except RunError as error:
        raise SystemExit(f"lostattn demo: {error}") from error
    return json.loads(found.read_text())["results"]


def demo(output: pathlib.Path, limit: int | None) -> None:
    """The shipped trained model on the local tasks: learned attention vs. Gaussian (paper SAP), uniform and knocked-out
    attention over image tokens, each with RID/MixIG; a comparison table, then the report and leaderboard."""
    from lmms_lostattn.shapes_llava import SHAPES_LLAVA_DIR
    from lmms_lostattn.upstream import require_tested_versions

    require_tested_versions()
    base = f"pretrained={SHAPES_LLAVA_DIR},device=cpu,device_map=cpu,dtype=float32,stats=paper"
    results = {}
    for step, (name, args) in enumerate(DEMO_RUNS.items(), start=1):
        folder = output / name
        folder.mkdir(parents=True, exist_ok=True)
        print(f"\n=== run {step}/{len(DEMO_RUNS)}: {name} ({args}) ===", flush=True)
        results[name] = _run_lmms_eval(f"{base},{args}", DEMO_TASKS, limit, folder)
    print("\n| task | metric | " + " | ".join(results) + " |\n|---|---|" + "---:|" * len(results))
    for task, metric in DEMO_ROWS:
        cells = [f"{r[task][f'{metric},none']:.4f}" if f"{metric},none" in r.get(task, {}) else "n/a"
                 for r in results.values()]
        print(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    print("\nshapes-llava answers from the image: knocking out every text token's attention to the image tokens should "
          "drop its accuracy to chance (POPE 0.5, colour 0.2); see its model card for what it is and is not.")
    folders = [output / name for name in DEMO_RUNS]
    report(folders, output / "report", force=True)
    compare(folders, folders[0], output / "compare", force=True, echo=False)
    print(f"\nOutputs: {output}")


def _write(files: Mapping[pathlib.Path, str | bytes], force: bool) -> None:
    """Write every file, or none when one exists and ``force`` is off."""
    from lmms_lostattn.runs import RunError

    existing = [str(path) for path in files if path.exists()]
    if existing and not force:
        more = f" (and {len(existing) - 1} more output files)" if len(existing) > 1 else ""
        raise RunError(f"{existing[0]}{more} already exists; pass --force to overwrite")
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        print(f"wrote {path}")


def _tables(stem: pathlib.Path, table: Table) -> dict[pathlib.Path, str]:
    from lmms_lostattn.compare import csv_text, markdown

    return {stem.with_suffix(".md"): markdown(table), stem.with_suffix(".csv"): csv_text(table)}


def report(paths: Sequence[pathlib.Path], output: pathlib.Path, force: bool = False) -> None:
    """Per-layer plots (PNG, SVG) and the paper's module-level and accuracy tables (Markdown, CSV) in ``output``."""
    from lmms_lostattn.compare import accuracy_table, module_table
    from lmms_lostattn.plots import layer_images
    from lmms_lostattn.runs import load_runs

    runs = load_runs(list(paths))
    files: dict[pathlib.Path, str | bytes] = {**_tables(output / "modules", module_table(runs)),
                                              **_tables(output / "accuracy", accuracy_table(runs))}
    for task, images in layer_images(runs, ("png", "svg")).items():
        files.update({output / f"layers_{task}.{fmt}": data for fmt, data in images.items()})
    _write(files, force)


def compare(
    paths: Sequence[pathlib.Path], baseline: pathlib.Path | None, output: pathlib.Path, force: bool, echo: bool = True
) -> None:
    """Leaderboard (Markdown, CSV, HTML with the plots) against ``baseline`` (default: the first vanilla run); the
    Markdown table is also printed when ``echo`` is on."""
    from lmms_lostattn.compare import leaderboard, markdown
    from lmms_lostattn.html import page
    from lmms_lostattn.plots import layer_images
    from lmms_lostattn.runs import find_results, load_runs

    if baseline is not None:
        chosen = find_results(baseline).resolve()
        paths = [baseline, *(path for path in paths if find_results(path).resolve() != chosen)]
    runs = load_runs(list(paths))
    base = runs[0] if baseline is not None else next((r for r in runs if r.mode == "none"), runs[0])
    table = leaderboard(runs, base)
    images = {task: pngs["png"] for task, pngs in layer_images(runs).items()}
    if echo:
        print(markdown(table))
    _write({**_tables(output / "leaderboard", table),
            output / "leaderboard.html": page("lostattn leaderboard", table, images)}, force)


def check(path: pathlib.Path, baseline: pathlib.Path, max_drop: float, metrics: Sequence[str]) -> int:
    """The CI gate: 0 when no selected metric drops beyond ``max_drop`` and noise, 1 otherwise."""
    from lmms_lostattn.compare import check as gate
    from lmms_lostattn.runs import load_run, version_changes

    base, run = load_run(baseline), load_run(path)
    lines = gate(base, run, max_drop, metrics)
    failures = sum(status == "FAILED" for status, _ in lines)
    print(f"baseline {base.path} ({base.model}, {base.label}) vs {run.path} ({run.model}, {run.label})")
    changes = version_changes(base, run)
    if changes:
        print(f"note: versions differ ({', '.join(changes)})")
    print("\n".join(f"{status:8}{line}" for status, line in lines))
    print(f"{failures} regression(s)" if failures else "no regression")
    return 1 if failures else 0


def reproduce(args: argparse.Namespace) -> int:
    """``lostattn reproduce``: check everything, run what is not done, write and print the two tables and the
    per-layer plots; exit 2 on unusable input, before any run."""
    from lmms_lostattn.model_wrappers.lmms_eval.reproduce import (
        ReproduceError,
        make_plan,
        parse_seeds,
        run_plan,
        tables,
    )

    extra = ["--limit", str(args.limit)] if args.limit else []
    extra += ["--gen_kwargs", args.gen_kwargs] if args.gen_kwargs else []
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    try:
        seeds = parse_seeds(args.seeds)
        plan = make_plan(args.model, args.model_args, tasks, seeds, args.sap_args, args.include_path, extra)
        folders = run_plan(plan, args.output)
        files = tables(folders)
    except ReproduceError as error:
        print(f"lostattn reproduce: {error}", file=sys.stderr)
        return 2
    _write({args.output / name: content for name, content in files.items()}, force=True)
    print("\n" + files["table1.md"] + "\n" + files["table2.md"])
    report(list(folders.values()), args.output / "report", force=True)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lostattn", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    paths = commands.add_parser("tasks-path", help="print the --include_path directory of the shipped tasks")
    paths.add_argument("--host", choices=("lmms_eval", "lm_eval"), default="lmms_eval", help="whose tasks")
    build = commands.add_parser("build-tiny", help="build a tiny random-weight model of a supported family")
    build.add_argument("directory", type=pathlib.Path)
    build.add_argument("--variant", default="llava", help=" | ".join(FAMILY_VARIANTS))
    commands.add_parser("shapes-llava-path", help="print the directory of the shipped trained model")
    commands.add_parser("doctor", help="check this environment: versions, upstream internals, a tiny model end to end")
    repro = commands.add_parser("reproduce", help="the paper's Tables 1 and 2 for a model and tasks, via lmms-eval")
    repro.add_argument("--model", required=True, help="a lostattn model id, e.g. lostattn_qwen2_5_vl")
    repro.add_argument("--model_args", required=True, help="the base wrapper's arguments, with pretrained=")
    repro.add_argument("--tasks", required=True, help="lmms-eval tasks, comma-separated")
    repro.add_argument("--seeds", default="0,1,2", help="seeds of the SAP runs (default 0,1,2)")
    repro.add_argument("--sap-args", default="", help="attention arguments added to the SAP runs (attn_layers=1:)")
    repro.add_argument("--include_path", default=None, help="lmms-eval --include_path for local tasks")
    repro.add_argument("--limit", type=int, default=None, help="documents per task and run")
    repro.add_argument("--gen_kwargs", default=None, help="lmms-eval --gen_kwargs")
    repro.add_argument("-o", "--output", type=pathlib.Path, default=pathlib.Path("lostattn-reproduce"))
    run = commands.add_parser("demo", help="learned vs. edited attention on the shipped trained model, with RID/MixIG")
    run.add_argument("--output", type=pathlib.Path, default=None, help="where lmms-eval writes (default: a temp dir)")
    run.add_argument("--limit", type=int, default=None, help="documents per task and run (default: all)")
    rep = commands.add_parser(
        "report", help="per-layer plots and the paper's tables from lmms-eval or lm-eval output folders"
    )
    rep.add_argument("runs", nargs="+", type=pathlib.Path)
    rep.add_argument("-o", "--output", type=pathlib.Path, default=pathlib.Path("lostattn-report"))
    rep.add_argument("--force", action="store_true", help="overwrite existing outputs")
    cmp = commands.add_parser("compare", help="leaderboard with paired tests against a baseline run")
    cmp.add_argument("runs", nargs="+", type=pathlib.Path)
    cmp.add_argument("--baseline", type=pathlib.Path, default=None, help="default: the first run with attn=none")
    cmp.add_argument("-o", "--output", type=pathlib.Path, default=pathlib.Path("lostattn-compare"))
    cmp.add_argument("--force", action="store_true", help="overwrite existing outputs")
    gate = commands.add_parser("check", help="exit 1 when a metric falls below the baseline beyond noise")
    gate.add_argument("run", type=pathlib.Path)
    gate.add_argument("--baseline", type=pathlib.Path, required=True)
    gate.add_argument("--max-drop", type=float, default=0.01, help="allowed absolute drop (default 0.01)")
    gate.add_argument("--metrics", nargs="+", default=[], help="metric or task/metric (default: every task metric)")
    args = parser.parse_args(argv)
    if args.command in ("report", "compare", "check"):
        from lmms_lostattn.runs import RunError

        try:
            if args.command == "report":
                report(args.runs, args.output, args.force)
            elif args.command == "compare":
                compare(args.runs, args.baseline, args.output, args.force)
            else:
                sys.exit(check(args.run, args.baseline, args.max_drop, args.metrics))
        except RunError as error:
            print(f"lostattn {args.command}: {error}", file=sys.stderr)
            sys.exit(2)
    elif args.command == "tasks-path":
        from lmms_lostattn.tasks import tasks_path

        print(tasks_path(host=args.host))
    elif args.command == "shapes-llava-path":
        from lmms_lostattn.shapes_llava import SHAPES_LLAVA_DIR

        print(SHAPES_LLAVA_DIR)
    elif args.command == "reproduce":
        sys.exit(reproduce(args))
    elif args.command == "doctor":
        from lmms_lostattn.doctor import doctor
        from lmms_lostattn.model_wrappers.lmms_eval.contacts import CONTACT_POINTS

        points = CONTACT_POINTS
        if importlib.util.find_spec("lm_eval") is not None:  # the optional second host
            from lmms_lostattn.model_wrappers.lm_eval.contacts import CONTACT_POINTS as LM_EVAL_POINTS

            points = (*points, *LM_EVAL_POINTS)
        sys.exit(doctor(points))
    elif args.command == "build-tiny":
        from lmms_lostattn.testing import build_tiny_model

        print(build_tiny_model(args.directory, args.variant))
    else:
        demo(args.output or pathlib.Path(tempfile.mkdtemp(prefix="lostattn-demo-")), args.limit)


if __name__ == "__main__":
    main()
