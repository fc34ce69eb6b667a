"""The ``lostattn`` command (also ``python -m lmms_lostattn``).

* ``lostattn tasks-path``: the directory to pass to ``lmms-eval --include_path`` for the shipped local tasks.
* ``lostattn build-tiny DIR``: a tiny random-weight LLaVA-family model, loadable with ``from_pretrained(DIR)``.
* ``lostattn demo``: the README's main job: lmms-eval on the tiny model and the local POPE-format task, learned
  attention vs. the paper's Gaussian attention over image tokens, with RID/MixIG, then a side-by-side summary.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Sequence

DEMO_RUNS = {
    "learned attention": "attn=none",
    "gaussian (paper SAP)": "attn=gaussian,attn_preset=paper,attn_layers=1:",
}
DEMO_ROWS = ("pope_accuracy", "pope_f1_score", "lostattn_rid_attn", "lostattn_rid_ffn", "lostattn_mixig_attn",
             "lostattn_mixig_ffn")


def _run_lmms_eval(model_args: str, task: str, limit: int, output: pathlib.Path) -> dict:
    """One lmms-eval run in a subprocess (its own table goes to the terminal); returns its results JSON."""
    from lmms_lostattn.tasks import tasks_path

    command = [sys.executable, "-m", "lmms_eval", "--model", "lostattn_llava", "--model_args", model_args,
               "--tasks", task, "--include_path", str(tasks_path()), "--limit", str(limit),
               "--gen_kwargs", "max_new_tokens=4", "--output_path", str(output)]
    print("$ " + " ".join(command), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(command, env=env, check=True, cwd=output)
    found = sorted(output.rglob("*_results.json"))
    if not found:  # lmms-eval exits 0 even when the evaluation raised
        raise SystemExit(f"lostattn demo: lmms-eval wrote no results under {output}; see its log above")
    return json.loads(found[-1].read_text())["results"][task]


def demo(output: pathlib.Path, limit: int) -> None:
    from lmms_lostattn.testing import tiny_llava_dir

    model = tiny_llava_dir("llava")
    base = f"pretrained={model},device=cpu,device_map=cpu,dtype=float32,stats=paper"
    results = {}
    for name, args in DEMO_RUNS.items():
        folder = output / name.split()[0]
        folder.mkdir(parents=True, exist_ok=True)
        print(f"\n=== {name}: {args} ===", flush=True)
        results[name] = _run_lmms_eval(f"{base},{args}", "lostattn_pope", limit, folder)
    print("\n| metric | " + " | ".join(results) + " |\n|---|" + "---:|" * len(results))
    for row in DEMO_ROWS:
        cells = [f"{r[f'{row},none']:.4f}" if f"{row},none" in r else "n/a" for r in results.values()]
        print(f"| {row} | " + " | ".join(cells) + " |")
    print("\nThe tiny model has random weights and does not answer yes/no, so POPE scores stay at 0: the demo shows"
          f" the pipeline (interventions, statistics, lmms-eval outputs), not the paper's effect. Outputs: {output}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lostattn", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("tasks-path", help="print the --include_path directory of the shipped tasks")
    build = commands.add_parser("build-tiny", help="build a tiny random-weight LLaVA-family model")
    build.add_argument("directory", type=pathlib.Path)
    build.add_argument("--variant", default="llava", help="llava | llava_next")
    run = commands.add_parser("demo", help="learned vs. Gaussian attention on the tiny model, with RID/MixIG")
    run.add_argument("--output", type=pathlib.Path, default=None, help="where lmms-eval writes (default: a temp dir)")
    run.add_argument("--limit", type=int, default=40, help="documents of the local POPE-format task per run")
    args = parser.parse_args(argv)
    if args.command == "tasks-path":
        from lmms_lostattn.tasks import tasks_path

        print(tasks_path())
    elif args.command == "build-tiny":
        from lmms_lostattn.testing import build_tiny_llava

        print(build_tiny_llava(args.directory, args.variant))
    else:
        demo(args.output or pathlib.Path(tempfile.mkdtemp(prefix="lostattn-demo-")), args.limit)


if __name__ == "__main__":
    main()
