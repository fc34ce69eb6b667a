"""Cost of ``stats=paper`` / ``stats=all``: one lmms-eval evaluation step with vs. without statistics, in one run.

An evaluation step is ``generate_until`` of the real ``LostAttnLlavaSimple`` wrapper on one image request
(generating ``--new-tokens`` tokens), exactly what lmms-eval calls per document. The three settings share one
checkpoint and are interleaved round by round; the table gives min and median seconds and the ratio of the medians
to ``stats=none``. ``--prompt-lengths`` sweeps the number of image tokens (the image size is chosen so the CLIP
tower yields that many) to show how the cost grows with S. On CUDA the peak memory of each setting is measured
with ``torch.cuda.max_memory_allocated``.

    python benchmarks/stats_overhead.py [--config cpu|7b] [--prompt-lengths 256,1024,4096] [--rounds N]
"""

from __future__ import annotations

import os

# Before torch loads OpenMP, as in attn_overhead.py: spin-waiting threads stall on a shared 2-core host.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import json
import math
import pathlib
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch
from attn_overhead import CONFIGS, IMAGE_TOKEN, QUESTION, BenchConfig, build_checkpoint, timed, versions
from lmms_eval.api.instance import Instance
from PIL import Image

from lmms_lostattn.model_wrappers.lmms_eval.wrappers import LostAttnLlavaSimple

SETTINGS = ("none", "paper", "all")


def _request(new_tokens: int) -> Instance:
    def to_visual(doc: dict) -> list[Image.Image]:
        return [doc["image"]]

    gen_kwargs = {"max_new_tokens": new_tokens, "temperature": 0}
    args = (f"{IMAGE_TOKEN}\n{QUESTION}", gen_kwargs, to_visual, 0, "bench", "test")
    return Instance("generate_until", args, 0, {"task": "bench", "doc_id": 0, "repeats": 1, "split": "test"})


def _step(lm: Any, new_tokens: int, device: str) -> tuple[float, float | None]:
    """Seconds (and CUDA peak GiB) of one ``generate_until`` call on a fresh request."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, _ = timed(lambda: lm.generate_until([_request(new_tokens)]), device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return seconds, peak


def measure(cfg: BenchConfig, image_tokens: int, rounds: int, new_tokens: int, workdir: pathlib.Path) -> dict:
    side = math.isqrt(image_tokens)
    if side * side != image_tokens:
        raise SystemExit(f"--prompt-lengths: {image_tokens} is not a square number of image tokens")
    cfg = dataclasses.replace(cfg, image_size=side * cfg.patch)
    path = build_checkpoint(cfg, workdir / f"model-{image_tokens}")
    models = {
        kind: LostAttnLlavaSimple(pretrained=str(path), device=cfg.device, device_map=cfg.device, dtype=cfg.dtype,
                                  stats=kind)
        for kind in SETTINGS
    }
    pixels = np.random.default_rng(0).integers(0, 256, size=(cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    for lm in models.values():
        lm.task_dict = {"bench": {"test": [{"image": Image.fromarray(pixels)}]}}
        _step(lm, new_tokens, cfg.device)  # warm-up
    times: dict[str, list[float]] = {kind: [] for kind in SETTINGS}
    peaks: dict[str, list[float]] = {kind: [] for kind in SETTINGS}
    for round_index in range(rounds):
        order = SETTINGS[round_index % 3:] + SETTINGS[: round_index % 3]
        for kind in order:
            seconds, peak = _step(models[kind], new_tokens, cfg.device)
            times[kind].append(seconds)
            if peak is not None:
                peaks[kind].append(peak)
    base = statistics.median(times["none"])
    base_peak = max(peaks["none"]) if peaks["none"] else None
    return {
        kind: {
            "min_s": min(times[kind]),
            "median_s": statistics.median(times[kind]),
            "ratio": statistics.median(times[kind]) / base,
            "added_s": statistics.median(times[kind]) - base,
            "peak_gib": max(peaks[kind]) if peaks[kind] else None,
            "added_gib": max(peaks[kind]) - base_peak if base_peak is not None else None,
        }
        for kind in SETTINGS
    }


def _cell(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


# The GPU targets for stats=paper on the 7B config: step time and peak memory added to stats=none.
TARGET_RATIO, TARGET_GIB = 1.10, 1.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--prompt-lengths", default="576", help="image tokens per prompt, comma-separated squares")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.new_tokens < 1:
        parser.error("--rounds and --new-tokens must be >= 1")
    cfg = CONFIGS[args.config]
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--config 7b needs a CUDA device; none is visible")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    results, started, load_before = {}, time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory() as workdir:
        for length in map(int, args.prompt_lengths.split(",")):
            results[length] = measure(cfg, length, args.rounds, args.new_tokens, pathlib.Path(workdir))
    print(f"\nconfig {cfg.name}, {args.new_tokens} new tokens, {args.rounds} rounds\n")
    print("| image tokens | stats | min s | median s | ratio vs none | + s | peak GiB | + GiB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for length, by_kind in results.items():
        for kind, row in by_kind.items():
            print(
                f"| {length} | {kind} | {row['min_s']:.3f} | {row['median_s']:.3f} | {row['ratio']:.2f} | "
                f"{row['added_s']:+.3f} | {_cell(row['peak_gib'], '.2f')} | {_cell(row['added_gib'], '+.3f')} |"
            )
    print(f"\nstats=paper targets (for the 7B GPU config): ratio <= {TARGET_RATIO}, + GiB <= {TARGET_GIB}")
    for length, by_kind in results.items():
        row = by_kind["paper"]
        memory = "not measured (CPU)" if row["added_gib"] is None else f"{row['added_gib']:+.3f} GiB"
        met = row["ratio"] <= TARGET_RATIO and (row["added_gib"] is None or row["added_gib"] <= TARGET_GIB)
        print(f"- {length} image tokens: {row['ratio']:.3f}x, {memory}: {'met' if met else 'NOT met'}")
    wall, load = time.perf_counter() - started, {"before": load_before, "after": os.getloadavg()}
    releases = versions(cfg.device)
    print(f"\nwall {wall:.0f} s; load averages (1, 5, 15 min) {load}; {releases}")
    if args.json:
        args.json.write_text(json.dumps({
            "config": cfg.name, "rounds": args.rounds, "new_tokens": args.new_tokens, "versions": releases,
            "wall_s": wall, "load_average_1_5_15": load, "results": results,
        }, indent=2))


if __name__ == "__main__":
    main()
