"""``lostattn reproduce``: the paper's Tables 1 and 2 for a model and tasks, through lmms-eval."""

from __future__ import annotations

import argparse
import sys

from lmms_lostattn.cli.outputs import write_files
from lmms_lostattn.cli.report import report
from lmms_lostattn.model_wrappers.lmms_eval.reproduce import ReproduceError, make_plan, parse_seeds, run_plan, tables


def reproduce(args: argparse.Namespace) -> int:
    """``lostattn reproduce``: check everything, run what is not done, write and print the two tables and the
    per-layer plots; exit 2 on unusable input, before any run (a failed run is a
    :class:`~lmms_lostattn.model_wrappers.lmms_eval.launch.LaunchError`)."""
    output = args.output.resolve()  # lmms-eval runs in each run's folder: a relative path would nest there
    extra = ["--limit", str(args.limit)] if args.limit is not None else []
    extra += ["--gen_kwargs", args.gen_kwargs] if args.gen_kwargs else []
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    try:
        seeds = parse_seeds(args.seeds)
        plan = make_plan(args.model, args.model_args, tasks, seeds, args.sap_args, args.include_path, extra)
        folders = run_plan(plan, output)
        files = tables(folders)
    except ReproduceError as error:
        print(f"lostattn reproduce: {error}", file=sys.stderr)
        return 2
    write_files({output / name: content for name, content in files.items()}, force=True)
    print("\n" + files["table1.md"] + "\n" + files["table2.md"])
    report(list(folders.values()), output / "report", force=True)
    return 0
