"""``lostattn demo``: the README's main job, on the shipped trained model (shapes-llava) and the local tasks."""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Sequence

from lmms_lostattn.cli.compare import compare
from lmms_lostattn.cli.report import report
from lmms_lostattn.compat.versions import require_tested_versions
from lmms_lostattn.model_wrappers.lmms_eval.launch import run_lmms_eval
from lmms_lostattn.models import SHAPES_LLAVA_DIR
from lmms_lostattn.tasks import tasks_path

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
    """One demo run of ``lostattn_llava`` (4 new tokens, the shipped tasks, per-sample logs for the paired tests);
    lmms-eval's log goes to ``output/lmms-eval.log``, its table to the terminal. Returns the run's results."""
    extra = ["--include_path", str(tasks_path()), "--gen_kwargs", "max_new_tokens=4", "--log_samples"]
    extra += ["--limit", str(limit)] if limit is not None else []
    log = output / "lmms-eval.log"
    found = run_lmms_eval("lostattn_llava", model_args, tasks, output, *extra, log=log)
    print("\n".join(line for line in log.read_text().splitlines() if line.startswith("|")))
    print(f"(lmms-eval's log: {log})", flush=True)
    return json.loads(found.read_text())["results"]


def demo(output: pathlib.Path, limit: int | None) -> None:
    """The shipped trained model on the local tasks: learned attention vs. Gaussian (paper SAP), uniform and knocked-out
    attention over image tokens, each with RID/MixIG; a comparison table, then the report and leaderboard.
    ``limit``: documents per task and run, None for all."""
    require_tested_versions()
    output = output.resolve()  # lmms-eval runs in each run's folder: a relative path would nest there
    base = f"pretrained={SHAPES_LLAVA_DIR},device=cpu,device_map=cpu,dtype=float32,stats=paper"
    results = {}
    for step, (name, args) in enumerate(DEMO_RUNS.items(), start=1):
        folder = output / name
        shutil.rmtree(folder, ignore_errors=True)  # a demo run again into the same --output redoes its runs
        folder.mkdir(parents=True)
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
