"""Regenerate the golden run folders in ``tests/data/runs/`` with the real pipeline (lmms-eval on the tiny model).

    /work/venv/bin/python tests/data/make_runs.py        # from the repository root; about 3 minutes on 2 CPU cores

Each run: ``lmms-eval --model lostattn_llava`` on the tiny random-weight LLaVA (``build_tiny_model``), tasks
``lostattn_pope`` and ``lostattn_shapes_color``, ``stats=paper``, ``--log_samples``, ``--limit 8``. The files lmms-eval
writes (results JSON, ``_lostattn.json`` sidecar, samples jsonl) are copied to ``runs/<name>/``.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/cli_helpers.py

from cli_helpers import run_cli  # noqa: E402

from lmms_lostattn.testing import build_tiny_model  # noqa: E402

RUNS = {
    "none": "attn=none",
    "gaussian": "attn=gaussian,attn_preset=paper,attn_layers=1:",
    "noise_delta": "attn=noise_delta",
    "knockout": "attn=knockout,attn_layers=1:",
}
TASKS = "lostattn_pope,lostattn_shapes_color"
LIMIT = 8


def main() -> None:
    target = HERE / "runs"
    with tempfile.TemporaryDirectory(prefix="lostattn-runs-") as tmp:
        model = build_tiny_model(pathlib.Path(tmp) / "tiny", "llava")
        base = f"pretrained={model},device=cpu,device_map=cpu,dtype=float32,stats=paper"
        for name, args in RUNS.items():
            out = pathlib.Path(tmp) / name
            run_cli("--model", "lostattn_llava", "--model_args", f"{base},{args}", "--tasks", TASKS, "--log_samples",
                    output=out, limit=LIMIT)
            folder = target / name
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            for path in out.rglob("*.json*"):
                shutil.copy(path, folder / path.name)
            print(f"{name}: {sorted(p.name for p in folder.iterdir())}", flush=True)


if __name__ == "__main__":
    main()
