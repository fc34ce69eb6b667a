"""GPU check of the hub kernels policy: the plugin runs what its base class runs, with transformers' kernels on or off.

For each dtype (float16, bfloat16) and each ``USE_HUB_KERNELS`` setting (0, 1), three lmms-eval models are loaded
from one random-weight LLaVA-1.5-style checkpoint (the CPU benchmark shape: 8 layers, hidden 512, 576 image
tokens): lmms-eval's ``llava_hf``, the plugin with ``attn=none`` and the plugin with ``stats=paper``. Checked:

* the kernels each load runs (``kernels_record``: ``use_kernels`` and the kernelized layers), equal across the three;
* base vs ``attn=none``: the last prompt position's logits (max |difference|) and the generated answer;
* base vs ``stats=paper``: the answer, and the statistics row (mean RID and MixIG of attention and FFN) finite;
* kernels on vs off, per dtype: the logits gap and the statistics rows side by side.

Exit status 1 when an answer differs from the base's, a logit gap between base and ``attn=none`` is not 0, the
three loads run different kernels, or a statistic is not finite. Without a hub (no network) the kernels are not
fetched: when the hub is unreachable the script starts again with ``HF_HUB_OFFLINE=1`` (read once, when
huggingface_hub is imported), and the kernels rows then say ``none``.

    python benchmarks/gpu_check.py [--device cuda] [--dtypes float16,bfloat16] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import statistics
import sys
import tempfile
from typing import Any

import numpy as np
import torch
from attn_overhead import CONFIGS, build_checkpoint, prompt_inputs
from lmms_eval.models.simple.llava_hf import LlavaHf
from PIL import Image
from stats_overhead import _request

from lmms_lostattn.compat.kernels import ENV, describe_layers, hub_problem, kernels_record
from lmms_lostattn.model_wrappers.lmms_eval.wrappers import LostAttnLlavaSimple

NEW_TOKENS = 8
ROWS = (("attn", "rid"), ("attn", "mixig"), ("ffn", "rid"), ("ffn", "mixig"))


def _load(path: pathlib.Path, device: str, dtype: str) -> dict[str, Any]:
    args = {"pretrained": str(path), "device": device, "device_map": device, "dtype": dtype}
    models = {
        "base": LlavaHf(**args),
        "attn=none": LostAttnLlavaSimple(**args, attn="none"),
        "stats=paper": LostAttnLlavaSimple(**args, stats="paper"),
    }
    pixels = np.random.default_rng(0).integers(0, 256, size=(336, 336, 3), dtype=np.uint8)
    for lm in models.values():
        lm.task_dict = {"bench": {"test": [{"image": Image.fromarray(pixels)}]}}
    return models


def _statistics_row(lm: Any) -> dict[str, float]:
    """Mean over layers of each statistic of the one request ``lm`` answered."""
    (records,) = lm.lostattn.run.records.values()
    values = records[-1]["values"]
    return {f"{module}_{metric}": statistics.fmean(values[module]["all"][metric]) for module, metric in ROWS}


def check(path: pathlib.Path, device: str, dtype: str, kernels: str) -> dict[str, Any]:
    """One (dtype, kernels) cell: what each model ran and answered, and the gaps to the base."""
    os.environ[ENV] = kernels
    models = _load(path, device, dtype)
    with torch.no_grad():
        logits = {name: lm.model(**prompt_inputs(lm)).logits[:, -1].float().cpu() for name, lm in models.items()}
    answers = {name: lm.generate_until([_request(NEW_TOKENS)])[0] for name, lm in models.items()}
    return {
        "kernels": {name: kernels_record(lm.model) for name, lm in models.items()},
        "answers": answers,
        "logits": logits["base"],
        "gap_attn_none": (logits["attn=none"] - logits["base"]).abs().max().item(),
        "statistics": _statistics_row(models["stats=paper"]),
    }


def problems_of(cell: dict[str, Any]) -> list[str]:
    found = []
    if len({json.dumps(record, sort_keys=True) for record in cell["kernels"].values()}) != 1:
        found.append(f"the loads ran different kernels: {cell['kernels']}")
    if cell["gap_attn_none"] != 0:
        found.append(f"attn=none logits differ from the base's by {cell['gap_attn_none']:.3g}")
    if len(set(cell["answers"].values())) != 1:
        found.append(f"answers differ: {cell['answers']}")
    if not all(math.isfinite(value) for value in cell["statistics"].values()):
        found.append(f"statistics not finite: {cell['statistics']}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: no CUDA device is visible (--device cpu runs the same check on the CPU)")
    if os.environ.get("HF_HUB_OFFLINE") is None and hub_problem() is not None:
        # huggingface_hub reads HF_HUB_OFFLINE once, when imported (above): start again with it set
        command = [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)]
        os.execve(sys.executable, command, {**os.environ, "HF_HUB_OFFLINE": "1"})
    cfg = dataclasses.replace(CONFIGS["cpu"], name="gpu-check", device="cpu", threads=None)
    cells, failures = {}, []
    with tempfile.TemporaryDirectory() as workdir:
        path = build_checkpoint(cfg, pathlib.Path(workdir) / "model")
        for dtype in args.dtypes.split(","):
            for kernels in ("0", "1"):
                cells[dtype, kernels] = cell = check(path, args.device, dtype, kernels)
                failures += [f"{dtype}, {ENV}={kernels}: {problem}" for problem in problems_of(cell)]
    print(f"| dtype | {ENV} | kernel layers | base vs attn=none max abs logit gap | answers equal | "
          "RID attn | MixIG attn | RID ffn | MixIG ffn |")
    print("|---|---|---|---:|---|---:|---:|---:|---:|")
    for (dtype, kernels), cell in cells.items():
        layers = describe_layers(cell["kernels"]["base"]["layers"])
        stats = " | ".join(f"{value:.4f}" for value in cell["statistics"].values())
        equal = len(set(cell["answers"].values())) == 1
        print(f"| {dtype} | {kernels} | {layers} | {cell['gap_attn_none']:.3g} | {equal} | {stats} |")
    for dtype in args.dtypes.split(","):
        on, off = cells[dtype, "1"], cells[dtype, "0"]
        gap = (on["logits"] - off["logits"]).abs().max().item()
        stats = max(abs(on["statistics"][key] - off["statistics"][key]) for key in on["statistics"])
        print(f"- {dtype}: kernels on vs off: max abs logit gap {gap:.3g}, max abs statistics gap {stats:.3g}")
    if args.json:
        serialisable = {f"{d},{k}": {**c, "logits": None} for (d, k), c in cells.items()}
        args.json.write_text(json.dumps(serialisable, indent=2))
    print("\n".join(f"FAILED {failure}" for failure in failures) or "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
