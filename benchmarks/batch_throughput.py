"""Samples per second of lmms-eval's ``qwen2_5_vl`` and of ``lostattn_qwen2_5_vl`` at batch 1 and 8, in one run.

Every setting is an lmms-eval model (lmms-eval's chat ``Qwen2_5_VL`` or the plugin's ``LostAttnQwen2_5_VLChat``) loaded
from one random-weight Qwen2.5-VL checkpoint written to a temporary directory, answering the same requests through
``generate_until`` (the loop lmms-eval runs: its Collator, processor, ``generate`` and decoding). Settings alternate
round by round in a rotating order; ratios against the base at the same batch size are taken within each round
(paired) and reported as their median. See benchmarks/README.md.

    python benchmarks/batch_throughput.py [--config cpu|7b] [--rounds N] [--requests N] [--json out.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as attn_overhead.py: no spin-waiting on a shared host

import argparse
import json
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from lmms_eval.api.instance import Instance
from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL
from loguru import logger
from PIL import Image
from transformers.utils import logging as transformers_logging

from lmms_lostattn.model_wrappers.lmms_eval.wrappers import LostAttnQwen2_5_VLChat
from lmms_lostattn.testing import tiny_parts

QUESTIONS = [
    "Is there a cat in the image?",
    "What colour is the large shape near the top left corner of the picture?",
    "How many circles are there?",
    "Is the square to the left of the triangle?",
]
SUFFIX = "\nAnswer the question using a single word or phrase."


@dataclass(frozen=True)
class BenchConfig:
    """The Qwen2.5-VL decoder's shape and where it runs; the vision tower stays small (the decoder is what is timed)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    image_side: int  # px; (side / 28)^2 image tokens after the 2x2 merge
    device: str
    threads: int | None
    new_tokens: int


CONFIGS = {
    "cpu": BenchConfig("cpu", 512, 8, 8, 2, 1376, 448, "cpu", 2, 8),  # 256 image tokens per prompt
    "7b": BenchConfig("7b", 3584, 28, 28, 4, 18944, 448, "cuda", None, 32),  # Qwen2.5-VL-7B's decoder
}
BATCH_SIZES = (1, 8)
BASE = "base (qwen2_5_vl)"
SETTINGS = {  # name -> the plugin's model_args (None: lmms-eval's own class), target ratio at batch 8
    BASE: (None, None),
    "plugin attn=none": ({"attn": "none"}, 0.98),
    "plugin paper preset": ({"attn": "gaussian", "attn_preset": "paper"}, 0.9),
    "plugin uniform, all rows": ({"attn": "uniform", "attn_rows": "all"}, None),
    "plugin stats=paper": ({"stats": "paper"}, None),
}


def build_checkpoint(cfg: BenchConfig, out: pathlib.Path) -> pathlib.Path:
    """A random-weight Qwen2.5-VL of ``cfg``'s decoder shape, with the tiny model's tokenizer and processor."""
    model_cls, config, processor = tiny_parts("qwen2_5_vl", cfg.layers)
    head_dim = cfg.hidden // cfg.heads
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.head_dim = cfg.hidden, cfg.intermediate, head_dim
    text.num_attention_heads, text.num_key_value_heads = cfg.heads, cfg.kv_heads
    unit = head_dim // 16  # M-RoPE sections (t, h, w) over head_dim / 2 frequencies, in Qwen's 2:3:3 proportion
    text.rope_parameters = {**text.rope_parameters, "mrope_section": [2 * unit, 3 * unit, 3 * unit]}
    config.vision_config.out_hidden_size = cfg.hidden
    side = cfg.image_side
    processor.image_processor.size = {"shortest_edge": side * side, "longest_edge": side * side}
    torch.manual_seed(0)
    model = model_cls(config).eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def make_requests(count: int, cfg: BenchConfig) -> tuple[list[Instance], list[dict]]:
    """``count`` chat ``generate_until`` requests (as lmms-eval's chat tasks build them) over noise images."""
    rng = np.random.default_rng(0)
    side = cfg.image_side
    docs = [
        {
            "question": QUESTIONS[i % len(QUESTIONS)] + SUFFIX,
            "image": Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)),
        }
        for i in range(count)
    ]
    gen_kwargs = {"max_new_tokens": cfg.new_tokens, "temperature": 0}  # the class passes no min_new_tokens on

    def to_messages(doc: dict) -> list[dict]:
        return [
            {
                "role": "user",
                "content": [{"type": "image", "url": doc["image"]}, {"type": "text", "text": doc["question"]}],
            }
        ]

    requests = [
        Instance(
            "generate_until",
            (doc["question"], to_messages, dict(gen_kwargs), doc_id, "bench", "test"),
            0,
            {"task": "bench", "doc_id": doc_id, "repeats": 1, "split": "test"},
        )
        for doc_id, doc in enumerate(docs)
    ]
    return requests, docs


def load(path: pathlib.Path, cfg: BenchConfig, args: dict[str, str] | None) -> Any:
    pixels = cfg.image_side * cfg.image_side
    common = {
        "pretrained": str(path),
        "device": cfg.device,
        "device_map": cfg.device,
        "min_pixels": pixels,
        "max_pixels": pixels,
    }
    lm = Qwen2_5_VL(**common) if args is None else LostAttnQwen2_5_VLChat(**common, **args)
    if cfg.device == "cpu":
        lm.model.to(torch.float32)  # lmms-eval loads bfloat16, which has no fast CPU kernels here; GPU runs keep it
    return lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--json", type=pathlib.Path)
    options = parser.parse_args()
    if options.rounds < 1 or options.requests < 1:
        parser.error("--rounds and --requests must be >= 1")
    cfg = CONFIGS[options.config]
    if cfg.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--config {cfg.name} runs on a CUDA device, and torch sees none")
    if cfg.device == "cuda":  # the 7B decoder: built in bfloat16 on the GPU, as lmms-eval loads it
        torch.set_default_dtype(torch.bfloat16)
        torch.set_default_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    transformers_logging.set_verbosity_error()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(cfg, pathlib.Path(tmp))
        requests, docs = make_requests(options.requests, cfg)
        models = {name: load(path, cfg, args) for name, (args, _) in SETTINGS.items()}
        reference = models[BASE].model.state_dict()
        for name, lm in models.items():
            assert all(torch.equal(t, reference[k]) for k, t in lm.model.state_dict().items()), name
            lm.task_dict = {"bench": {"test": docs}}
        image_tokens = (cfg.image_side // 28) ** 2
        runs = [(name, size) for size in BATCH_SIZES for name in SETTINGS]
        seconds: dict[tuple[str, int], list[float]] = {run: [] for run in runs}
        answers: dict[tuple[str, int], list[str]] = {}
        for round_index in range(options.rounds + 1):  # round 0 warms up and is not recorded
            shift = round_index % len(runs)
            for name, size in runs[shift:] + runs[:shift]:
                lm = models[name]
                lm.batch_size_per_gpu = size
                if cfg.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                outputs = lm.generate_until(requests)
                if cfg.device == "cuda":
                    torch.cuda.synchronize()
                if round_index:
                    seconds[name, size].append(time.perf_counter() - start)
                answers[name, size] = [getattr(out, "text", out) for out in outputs]
    report(cfg, options, seconds, answers, image_tokens, time.perf_counter() - started)


def report(
    cfg: BenchConfig, options: argparse.Namespace, seconds: dict, answers: dict, image_tokens: int, wall: float
) -> None:
    n = options.requests
    print(
        f"config {cfg.name}: decoder hidden {cfg.hidden}, {cfg.layers} layers, {cfg.heads}/{cfg.kv_heads} heads; "
        f"{image_tokens} image tokens per prompt; {n} requests x {cfg.new_tokens} new tokens; {options.rounds} rounds"
    )
    print(f"{'setting':28} {'batch':>5} {'samples/s (median)':>19} {'vs base (paired)':>17}  target")
    rows, verdicts = [], []
    for (name, size), times in seconds.items():
        base_times = seconds[BASE, size]
        paired = statistics.median(b / t for b, t in zip(base_times, times, strict=True))
        target = SETTINGS[name][1] if size == 8 else None
        verdict = "" if target is None else ("met" if paired >= target else "MISSED") + f" (>= {target}x)"
        rate = n / statistics.median(times)
        print(f"{name:28} {size:>5} {rate:>19.2f} {paired:>16.3f}x  {verdict}")
        rows.append(
            {
                "setting": name,
                "batch": size,
                "samples_per_s": rate,
                "vs_base_paired": paired,
                "target": target,
                "seconds": times,
            }
        )
        verdicts.append(verdict)
    same = {name: answers[name, 8] == answers[name, 1] for name in SETTINGS}
    print("answers at batch 8 equal to batch 1:", same)
    print(f"wall {wall:.0f} s; load average {os.getloadavg()}")
    if options.json:
        versions = {pkg: __import__(pkg).__version__ for pkg in ("torch", "transformers")}
        payload = {
            "config": asdict(cfg),
            "requests": n,
            "rounds": options.rounds,
            "rows": rows,
            "answers_equal": same,
            "versions": versions,
            "machine": platform.machine(),
            "wall_s": wall,
        }
        options.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
