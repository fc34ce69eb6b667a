"""Requests per second of lm-eval's ``hf`` and of ``lostattn-hf`` on a loglikelihood workload at batch 8, in one run.

Every setting is an lm-eval model (``HFLM`` or the plugin's ``LostAttnHFLM``) loaded from one random-weight Llama
checkpoint written to a temporary directory, scoring the same multiple-choice requests through ``loglikelihood``
(the loop lm-eval runs: tokenization, its Collator, right-padded batches, log-softmax). Settings alternate round by
round in a rotating order; ratios against ``hf`` are taken within each round (paired) and reported as their median.
See benchmarks/README.md.

    python benchmarks/lm_eval_overhead.py [--rounds N] [--documents N] [--json out.json]
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

import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as transformers_logging

from lmms_lostattn.model_wrappers.lm_eval.models import LostAttnHFLM
from lmms_lostattn.testing import CORPUS, build_tokenizer

# A CPU-sized Llama decoder: hidden 512, 8 layers, 8 query / 2 key-value heads.
SHAPE = {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2}
BATCH = 8
THREADS = 2
BASE = "hf"
SETTINGS = {  # name -> the plugin's model_args (None: lm-eval's own HFLM), target ratio
    BASE: (None, None),
    "lostattn-hf attn=none": ({"attn": "none"}, 0.98),
    "lostattn-hf last-row edit": ({"attn": "gaussian", "attn_keys": "all", "attn_rows": "last"}, 0.95),
    "lostattn-hf stats=paper": ({"stats": "paper"}, None),
}
# 1, 5, 8 and 2 tokens: no two requests of a document share context + continuation[:-1], so each has its own row
CHOICES = [" red", " green and blue", " a small white cat", " the car"]


def build_checkpoint(out: pathlib.Path) -> pathlib.Path:
    tokenizer = build_tokenizer(padding_side="left", extra_special_tokens={})
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        intermediate_size=1376,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SHAPE,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_requests(documents: int) -> list[Instance]:
    """Four choices per document over contexts of 105-348 tokens (16 documents) cut from the built-in corpus."""
    lines = CORPUS.splitlines()
    requests = []
    for doc_id in range(documents):
        context = " ".join(lines[(doc_id + k) % len(lines)] for k in range(4 + doc_id % 4)) + " Answer:"
        for index, choice in enumerate(CHOICES):
            requests.append(Instance("loglikelihood", {}, (context, choice), index, ("bench", doc_id, 1)))
    return requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--json", type=pathlib.Path)
    options = parser.parse_args()
    if options.rounds < 1 or options.documents < 1:
        parser.error("--rounds and --documents must be >= 1")
    torch.set_num_threads(THREADS)
    transformers_logging.set_verbosity_error()
    started = time.perf_counter()
    requests = make_requests(options.documents)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(build_checkpoint(pathlib.Path(tmp)))
        common = {"pretrained": path, "device": "cpu", "dtype": "float32", "batch_size": BATCH}
        models = {
            name: HFLM(**common) if args is None else LostAttnHFLM(**common, **args)
            for name, (args, _) in SETTINGS.items()
        }
        names = list(SETTINGS)
        load_before = os.getloadavg()
        seconds: dict[str, list[float]] = {name: [] for name in names}
        scores: dict[str, list[float]] = {}
        for round_index in range(options.rounds + 1):  # round 0 warms up and is not recorded
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                scores[name] = [value for value, _ in models[name].loglikelihood(requests, disable_tqdm=True)]
                if round_index:
                    seconds[name].append(time.perf_counter() - start)
    load = {"before": load_before, "after": os.getloadavg()}
    report(options, requests, seconds, scores, time.perf_counter() - started, load)


def report(
    options: argparse.Namespace, requests: list, seconds: dict, scores: dict, wall: float, load: dict
) -> None:
    n = len(requests)
    print(f"Llama {SHAPE}; {n} loglikelihood requests at batch {BATCH}; {THREADS} threads; {options.rounds} rounds")
    print(f"{'setting':28} {'requests/s (median)':>20} {'vs hf (paired)':>15}  target")
    rows = []
    for name, times in seconds.items():
        paired = statistics.median(b / t for b, t in zip(seconds[BASE], times, strict=True))
        target = SETTINGS[name][1]
        verdict = "" if target is None else ("met" if paired >= target else "MISSED") + f" (>= {target}x)"
        rate = n / statistics.median(times)
        print(f"{name:28} {rate:>20.2f} {paired:>14.3f}x  {verdict}")
        rows.append(
            {"setting": name, "requests_per_s": rate, "vs_hf_paired": paired, "target": target, "seconds": times}
        )
    same = max(abs(a - b) for a, b in zip(scores[BASE], scores["lostattn-hf attn=none"], strict=True))
    print(f"attn=none vs hf: max |loglikelihood difference| {same:.2e}")
    print(f"wall {wall:.0f} s; load average (1, 5, 15 min) {load['before']} before timing, {load['after']} after")
    if options.json:
        versions = {pkg: __import__(pkg).__version__ for pkg in ("torch", "transformers", "lm_eval")}
        payload = {
            "model": SHAPE,
            "batch": BATCH,
            "requests": n,
            "rounds": options.rounds,
            "rows": rows,
            "attn_none_max_abs_diff": same,
            "versions": versions,
            "machine": platform.machine(),
            "python": sys.version.split()[0],
            "wall_s": wall,
            "load_average_1_5_15": load,
        }
        options.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
