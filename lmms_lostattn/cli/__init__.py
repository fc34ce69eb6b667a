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
* ``lostattn show --pretrained DIR (--image I --question Q | --task T --doc-ids 0,3) [--model_args attn=...]``, or
  ``lostattn show --run RUN --doc-ids 0,3``: the last prompt token's attention over the image patches per layer,
  learned and as the intervention ran it, one PNG per document.
* ``lostattn report RUN...``, ``lostattn compare RUN...``, ``lostattn check RUN --baseline RUN``: per-layer plots and
  the paper's tables, a leaderboard with paired tests, and a CI regression gate over lmms-eval or lm-eval output
  folders. Unusable input exits 2 with a message naming the file.

The parser is here; each command lives in a module of its own, imported when it runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence


def _positive_int(text: str) -> int:
    """A ``--limit``: a positive number of documents (absent means all; 0 is not a way to say so)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected a positive number of documents (omit it for all)")
    return value


def _max_drop(text: str) -> float:
    """A ``--max-drop``: a finite number in [0, 1] (:func:`lmms_lostattn.reporting.gate.check_max_drop`)."""
    from lmms_lostattn.reporting.gate import check_max_drop

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    try:
        return check_max_drop(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lostattn", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    paths = commands.add_parser("tasks-path", help="print the --include_path directory of the shipped tasks")
    paths.add_argument("--host", choices=("lmms_eval", "lm_eval"), default="lmms_eval", help="whose tasks")
    build = commands.add_parser("build-tiny", help="build a tiny random-weight model of a supported family")
    build.add_argument("directory", type=pathlib.Path, help="where to write the model (from_pretrained loads it)")
    build.add_argument("--variant", default="llava", help="a family's tiny variant (an unknown one lists them)")
    commands.add_parser("shapes-llava-path", help="print the directory of the shipped trained model")
    commands.add_parser("doctor", help="check this environment: versions, upstream internals, a tiny model end to end")
    repro = commands.add_parser("reproduce", help="the paper's Tables 1 and 2 for a model and tasks, via lmms-eval")
    repro.add_argument("--model", required=True, help="a lostattn model id, e.g. lostattn_qwen2_5_vl")
    repro.add_argument("--model_args", required=True, help="the base wrapper's arguments, with pretrained=")
    repro.add_argument("--tasks", required=True, help="lmms-eval tasks, comma-separated")
    repro.add_argument("--seeds", default="0,1,2", help="seeds of the SAP runs (default 0,1,2)")
    repro.add_argument("--sap-args", default="", help="attention arguments added to the SAP runs (attn_layers=1:)")
    repro.add_argument("--include_path", default=None, help="lmms-eval --include_path for local tasks")
    repro.add_argument("--limit", type=_positive_int, default=None, help="documents per task and run (default: all)")
    repro.add_argument("--gen_kwargs", default=None, help="lmms-eval --gen_kwargs")
    repro.add_argument("-o", "--output", type=pathlib.Path, default=pathlib.Path("lostattn-reproduce"),
                       help="the runs, tables and plots (default: lostattn-reproduce); finished runs are kept")
    run = commands.add_parser("demo", help="learned vs. edited attention on the shipped trained model, with RID/MixIG")
    run.add_argument("--output", type=pathlib.Path, default=None,
                     help="where lmms-eval writes (default: a temp dir); a rerun redoes the run folders there")
    run.add_argument("--limit", type=_positive_int, default=None, help="documents per task and run (default: all)")
    rep = commands.add_parser(
        "report", help="per-layer plots and the paper's tables from lmms-eval or lm-eval output folders"
    )
    rep.add_argument("runs", nargs="+", type=pathlib.Path, help="output folders (or results files) of the runs")
    rep.add_argument("-o", "--output", type=pathlib.Path, default=pathlib.Path("lostattn-report"),
                     help="where the plots and tables go (default: lostattn-report)")
    rep.add_argument("--force", action="store_true", help="overwrite existing outputs")
    cmp = commands.add_parser("compare", help="leaderboard with paired tests against a baseline run")
    cmp.add_argument("runs", nargs="+", type=pathlib.Path, help="output folders (or results files) of the runs")
    cmp.add_argument("--baseline", type=pathlib.Path, default=None, help="default: the first run with attn=none")
    cmp.add_argument("-o", "--output", type=pathlib.Path, default=pathlib.Path("lostattn-compare"),
                     help="where the leaderboard goes (default: lostattn-compare)")
    cmp.add_argument("--force", action="store_true", help="overwrite existing outputs")
    gate = commands.add_parser("check", help="exit 1 when a metric falls below the baseline beyond noise")
    gate.add_argument("run", type=pathlib.Path, help="output folder (or results file) of the run to check")
    gate.add_argument("--baseline", type=pathlib.Path, required=True, help="the run it must not fall below")
    gate.add_argument("--max-drop", type=_max_drop, default=0.01,
                      help="allowed absolute drop, a number in [0, 1]: metrics are fractions, 0.01 is one point of "
                           "accuracy (default 0.01); a statistics row (lostattn_*) may change by this much either way")
    gate.add_argument("--metrics", nargs="+", default=[], help="metric or task/metric (default: every task metric)")
    look = commands.add_parser("show", help="PNGs of where the last prompt token attends over the image, per layer")
    look.add_argument("--pretrained", default=None,
                      help="a checkpoint directory or hub id whose image tokens are one per vision patch (LLaVA-1.5); "
                           "with --run, default: the run's")
    look.add_argument("--image", action="append", default=[],
                      help="an image file; repeat for several documents, each with its own --question")
    look.add_argument("--question", action="append", default=[],
                      help="the question asked about the --image of the same position (repeat likewise)")
    look.add_argument("--task", default=None,
                      help="instead of --image/--question: the documents --doc-ids of this lmms-eval task, with the "
                           "image and prompt text lmms-eval builds for them")
    look.add_argument("--run", type=pathlib.Path, default=None,
                      help="instead: an lmms-eval run's output folder: its model, attn* arguments (--model_args "
                           "adds to them) and tasks")
    look.add_argument("--doc-ids", default="0", help="with --task or --run: document ids, e.g. 0,3,7 (default 0)")
    look.add_argument("--include_path", action="append", default=[],
                      help="with --task or --run: a folder of task YAMLs, as lmms-eval's --include_path")
    look.add_argument("--model_args", default="",
                      help="the plugin's attn* arguments, as in lmms-eval (e.g. attn=gaussian,attn_preset=paper,"
                           "attn_layers=1:); the edited map is drawn beside the learned one (default: learned only)")
    look.add_argument("--layers", default="all",
                      help="decoder layers to draw, in attn_layers syntax (all, 3, 1-3, 1:, 18,19,20; default all)")
    look.add_argument("-o", "--output", type=pathlib.Path, default=pathlib.Path("lostattn-show"),
                      help="where the PNGs go, one per document (default: lostattn-show)")
    args = parser.parse_args(argv)
    if args.command in ("report", "compare", "check"):
        from lmms_lostattn.cli.check import check
        from lmms_lostattn.cli.compare import compare
        from lmms_lostattn.cli.report import report
        from lmms_lostattn.reporting.runs import RunError

        try:
            if args.command == "report":
                report(args.runs, args.output, args.force)
            elif args.command == "compare":
                compare(args.runs, args.baseline, args.output, args.force)
            else:
                sys.exit(check(args.run, args.baseline, args.max_drop, args.metrics))
        except (RunError, OSError) as error:  # OSError: an output path that cannot be written (a file, no space)
            print(f"lostattn {args.command}: {error}", file=sys.stderr)
            sys.exit(2)
        except Exception:  # a bug: the gate cannot judge, which its status 1 (a regression) would not say
            if args.command != "check":
                raise
            traceback.print_exc()
            print("lostattn check: cannot judge (an unexpected error, above)", file=sys.stderr)
            sys.exit(2)
    elif args.command == "tasks-path":
        from lmms_lostattn.tasks import tasks_path

        print(_written(args.command, lambda: tasks_path(host=args.host)))
    elif args.command == "shapes-llava-path":
        from lmms_lostattn.models import SHAPES_LLAVA_DIR

        print(SHAPES_LLAVA_DIR)
    elif args.command in ("reproduce", "demo"):
        from lmms_lostattn.model_wrappers.lmms_eval.launch import LaunchError

        try:
            if args.command == "reproduce":
                from lmms_lostattn.cli.reproduce import reproduce

                sys.exit(reproduce(args))
            from lmms_lostattn.cli.demo import demo

            demo(args.output or pathlib.Path(tempfile.mkdtemp(prefix="lostattn-demo-")), args.limit)
        except LaunchError as error:  # a failed lmms-eval run: its exit status and one line naming its log
            print(f"lostattn {args.command}: {error}", file=sys.stderr)
            sys.exit(error.status)
        except OSError as error:  # an output folder that cannot be made or written (a file there, no space)
            print(f"lostattn {args.command}: {error}", file=sys.stderr)
            sys.exit(2)
    elif args.command == "doctor":
        from lmms_lostattn.cli.doctor import doctor
        from lmms_lostattn.model_wrappers.lmms_eval.contacts import CONTACT_POINTS

        points = CONTACT_POINTS
        if importlib.util.find_spec("lm_eval") is not None:  # the optional second host
            from lmms_lostattn.model_wrappers.lm_eval.contacts import CONTACT_POINTS as LM_EVAL_POINTS

            points = (*points, *LM_EVAL_POINTS)
        sys.exit(doctor(points))
    elif args.command == "show":
        from lmms_lostattn.cli.show import show

        sys.exit(show(args))
    elif args.command == "build-tiny":
        from lmms_lostattn.testing import FAMILY_VARIANTS, build_tiny_model

        if args.variant not in FAMILY_VARIANTS:
            accepted = ", ".join(FAMILY_VARIANTS)
            parser.exit(2, f"lostattn build-tiny: unknown --variant {args.variant!r}; one of {accepted}\n")
        print(_written(args.command, lambda: build_tiny_model(args.directory, args.variant)))


def _written(command: str, write: Callable[[], pathlib.Path]) -> pathlib.Path:
    """What ``write`` wrote, or exit 2 with a message where it could not write it (a file where its folder goes, a
    read-only or full disk)."""
    try:
        return write()
    except OSError as error:
        print(f"lostattn {command}: {error}", file=sys.stderr)
        sys.exit(2)

