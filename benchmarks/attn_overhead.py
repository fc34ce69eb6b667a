"""Time per prefill and per generated token: lostattn wrappers vs lmms-eval's own ``llava_hf``, in one run.

Every setting is a model loaded through the real lmms-eval classes (``LlavaHf`` and ``LostAttnLlavaSimple``) from
one random-weight LLaVA-1.5-style checkpoint written to a temporary directory. Settings are interleaved round by
round (the order rotates each round) and reported as min and median over rounds, with ratios against the base
computed from the same run. See benchmarks/README.md.

    python benchmarks/attn_overhead.py [--config cpu|7b] [--rounds N] [--new-tokens N] [--json out.json]
"""

from __future__ import annotations

import os

# Before torch starts OpenMP: with the default spin-waiting, two threads on a shared 2-core host stall at every
# parallel region whenever another process holds a core (10x slower prefills, worse for many small ops). Set
# OMP_WAIT_POLICY=ACTIVE to measure the default behaviour.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import hashlib
import json
import math
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

import numpy as np
import torch
from lmms_eval.models.simple.llava_hf import LlavaHf
from loguru import logger
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlavaForConditionalGeneration
from transformers.utils import logging as transformers_logging

from lmms_lostattn.model_wrappers.lmms_eval.wrappers import LostAttnLlavaSimple
from lmms_lostattn.testing import build_tokenizer, llava_config_and_processor

IMAGE_TOKEN = "<image>"
QUESTION = "Is there a cat in the image? Answer the question using a single word or phrase."  # 576 + 33 tokens


@dataclass(frozen=True)
class BenchConfig:
    """Model shape and where it runs. The vision tower is small on purpose: the decoder is what is timed."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int | None  # None = the local tokenizer's size
    dtype: str
    device: str
    threads: int | None  # torch.set_num_threads, CPU only
    image_size: int = 336
    patch: int = 14
    vision_hidden: int = 64
    vision_layers: int = 2
    extra_args: dict[str, dict[str, str]] = field(default_factory=dict)  # setting name -> model_args added for it


PAPER, KNOCKOUT = "plugin paper preset", "plugin knockout (paper layers and rows)"
PAPER_SHARE = "plugin paper preset, the 7B's share of layers"
CONFIGS = {
    # 8 layers: the LLaVA preset's layers 18-23 do not exist, so the paper setting edits every layer but 0; the
    # share setting edits the part of the depth they are on the 7B (18-23 of 32: 4-5 of 8).
    "cpu": BenchConfig(
        "cpu", 512, 8, 8, 8, 1376, None, "float32", "cpu", 2,
        extra_args={PAPER: {"attn_layers": "1:"}, KNOCKOUT: {"attn_layers": "1:"}, PAPER_SHARE: {"attn_layers": "4-5"}},
    ),
    # LLaVA-1.5-7B decoder: the preset itself (layers 18-23, heads p0.3-0.6).
    "7b": BenchConfig(
        "7b", 4096, 32, 32, 32, 11008, 32064, "float16", "cuda", None, extra_args={KNOCKOUT: {"attn_layers": "18-23"}}
    ),
}


@dataclass(frozen=True)
class Setting:
    """One timed configuration: which lmms-eval class, with which model_args, and which setting it is judged on."""

    name: str
    plugin: bool
    args: dict[str, str]
    reference: str | None = None  # setting the target ratio is measured against
    target: float | None = None  # max ratio vs reference
    target_on: tuple[str, ...] = ()  # which timings the target applies to: "prefill", "per_token"


BASE, EAGER, CONTROL = "base (llava_hf, sdpa)", "base (llava_hf, eager)", "plugin attn=none"
SETTINGS = (
    Setting(BASE, False, {}),
    Setting(EAGER, False, {"attn_implementation": "eager"}),
    Setting(CONTROL, True, {"attn": "none"}, BASE, 1.02, ("prefill", "per_token")),
    Setting(PAPER, True, {"attn": "gaussian", "attn_preset": "paper"}, BASE, 1.10, ("prefill", "per_token")),
    # no target: the cheapest edit (one multiply) on the preset's layers, rows and keys, i.e. what materialising the
    # edited rows costs before any pattern, head scores or score scale
    Setting(KNOCKOUT, True, {"attn": "knockout"}, BASE),
    # no target: the preset's cost where it edits the part of the decoder it edits on LLaVA-1.5-7B (on the 7B config,
    # the paper setting itself)
    Setting(PAPER_SHARE, True, {"attn": "gaussian", "attn_preset": "paper"}, BASE),
    Setting(
        "plugin uniform/probs/all rows/all layers",
        True,
        {"attn": "uniform", "attn_space": "probs", "attn_rows": "all", "attn_layers": "all"},
        EAGER,
        1.5,
        ("prefill", "per_token"),
    ),
)
TIMINGS = ("prefill", "gen_1", "gen_n")


# -- the checkpoint ------------------------------------------------------------------------------------------------


def build_checkpoint(cfg: BenchConfig, out: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Write a random-weight LLaVA-1.5-style model (CLIP 336/14 -> 576 image tokens) with its processor to ``out``."""
    tokenizer = build_tokenizer()
    vision = dict(
        image_size=cfg.image_size,
        patch_size=cfg.patch,
        hidden_size=cfg.vision_hidden,
        intermediate_size=2 * cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=2,
    )
    text = dict(
        vocab_size=cfg.vocab or len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=4096,
    )
    config, processor = llava_config_and_processor(tokenizer, vision=vision, text=text)
    with torch.random.fork_rng(devices=[]), torch.device(cfg.device):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(config, dtype=getattr(torch, cfg.dtype)).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    del model
    processor.save_pretrained(out)
    return out


# -- loading through lmms-eval ---------------------------------------------------------------------------------------


def load(setting: Setting, path: pathlib.Path, cfg: BenchConfig) -> Any:
    """Construct the lmms-eval model object for ``setting`` exactly as lmms-eval would from ``model_args``."""
    cls = LostAttnLlavaSimple if setting.plugin else LlavaHf
    args = {**setting.args, **cfg.extra_args.get(setting.name, {})}
    return cls(pretrained=str(path), device=cfg.device, device_map=cfg.device, dtype=cfg.dtype, **args)


def share_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    """Point every parameter of ``model`` at the identical tensor of ``reference`` (one copy of the weights in memory).

    All settings load the same checkpoint, so this changes no number; it keeps five 7B models within one GPU.
    """
    ours = dict(model.named_parameters(remove_duplicate=False))
    theirs = dict(reference.named_parameters(remove_duplicate=False))
    if ours.keys() != theirs.keys():
        raise RuntimeError("share_weights: the two models have different parameters")
    with torch.no_grad():
        for name, param in ours.items():
            if not torch.equal(param, theirs[name]):
                raise RuntimeError(f"share_weights: {name} differs between two loads of the same checkpoint")
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._parameters[attr] = theirs[name]


def prompt_inputs(lm: Any) -> Any:
    """One ~600-token image prompt, built the way lmms-eval's simple ``llava_hf.generate_until`` builds it."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{QUESTION}"}]
    text = lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return lm._image_processor(images=[image], text=text, return_tensors="pt").to(lm.device, lm.model.dtype)


# -- timing ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def request_scope(lm: Any) -> Iterator[Callable[[Callable[[], Any]], Any]]:
    """What ``LostAttnMixin._run_scoped`` wraps around each request: the intervention scope (none for attn=none).

    Yields ``call(fn)``, which runs ``fn`` as one request (sample id set, errors from inside the model re-raised).
    """
    plugin = getattr(lm, "lostattn", None)
    if plugin is None or not plugin.active:
        yield lambda fn: fn()
        return
    with plugin.scope(lm.model) as (scope, _):

        def call(fn: Callable[[], Any]) -> Any:
            scope.set_samples(["bench/test/0"])
            result = fn()
            scope.raise_pending()
            return result

        yield call


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """Seconds ``fn`` takes (device work included) and its result."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - start, result


class OpCounter(TorchDispatchMode):
    """Records the aten ops that do work (views excluded): a cost measure that no other process can disturb."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if not func.is_view:
            self.names.append(str(func))
        return func(*args, **(kwargs or {}))

    @property
    def signature(self) -> str:
        """Hash of the op sequence: equal signatures = the same kernels called in the same order."""
        return hashlib.sha256("\n".join(self.names).encode()).hexdigest()[:12]


def time_call(lm: Any, inputs: Any, new_tokens: int, device: str, counter: OpCounter | None = None) -> float:
    """Seconds for one request of ``lm``: a prefill forward (``new_tokens == 0``) or ``generate`` of that many tokens.

    The intervention scope is opened outside the timer, as the wrapper opens it once per ``generate_until`` call.
    With ``counter``, the request runs under it (the time is then not meaningful).
    """
    eot = lm.eot_token_id

    def request() -> torch.Tensor:
        if new_tokens == 0:
            return lm.model(**inputs).logits
        return lm.model.generate(
            **inputs,
            do_sample=False,
            temperature=None,
            top_p=None,
            num_beams=1,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            use_cache=True,
            pad_token_id=eot,
            eos_token_id=eot,
        )

    with torch.no_grad(), request_scope(lm) as call, counter or contextlib.nullcontext():
        seconds, out = timed(lambda: call(request), device)
    if new_tokens and out.shape[1] != inputs["input_ids"].shape[1] + new_tokens:
        raise RuntimeError(f"generate returned {out.shape[1] - inputs['input_ids'].shape[1]} tokens, not {new_tokens}")
    return seconds


def summarise(rounds: list[dict[str, dict[str, float]]], new_tokens: int) -> dict[str, dict[str, dict[str, float]]]:
    """min and median (seconds) per setting and timing, and ratios vs each setting's reference and vs the base.

    per-token = (gen_n - gen_1) / N from the min (resp. median) of each over rounds: a per-round difference of two
    noisy timings is far noisier than either. Three ratios: of the mins, of the medians, and ``paired``: the median
    over rounds of the ratio within a round, where a setting and its reference ran back to back under the same load.
    """

    def value(record: dict[str, float], key: str) -> float:
        return (record["gen_n"] - record["gen_1"]) / new_tokens if key == "per_token" else record[key]

    summary: dict[str, dict[str, dict[str, float]]] = {}
    for setting in SETTINGS:
        stats = {
            key: {
                "min": min(r[setting.name][key] for r in rounds),
                "median": statistics.median(r[setting.name][key] for r in rounds),
            }
            for key in TIMINGS
        }
        stats["per_token"] = {k: (stats["gen_n"][k] - stats["gen_1"][k]) / new_tokens for k in ("min", "median")}
        summary[setting.name] = stats
    for setting in SETTINGS:
        for key in ("prefill", "per_token"):
            stats = summary[setting.name][key]
            for label, ref in (("base", BASE), ("ref", setting.reference)):
                if ref is not None:
                    stats[f"x_{label}_min"] = stats["min"] / summary[ref][key]["min"]
                    stats[f"x_{label}_median"] = stats["median"] / summary[ref][key]["median"]
                    within = [value(r[setting.name], key) / value(r[ref], key) for r in rounds
                              if value(r[setting.name], key) > 0 and value(r[ref], key) > 0]  # a time, not noise
                    stats[f"x_{label}_paired"] = statistics.median(within) if within else math.nan
    return summary


def ratios_text(stats: dict[str, float], label: str) -> str:
    """``1.011x paired (1.133x of mins, 0.990x of medians)`` for ratios vs ``label`` ("base" or "ref")."""
    return (
        f"{stats[f'x_{label}_paired']:.3f}x paired ({stats[f'x_{label}_min']:.3f}x of mins, "
        f"{stats[f'x_{label}_median']:.3f}x of medians)"
    )


def verdicts(summary: dict[str, dict[str, dict[str, float]]], same_ops: list[str]) -> list[str]:
    """One line per target, judged on the paired ratio (the least load-sensitive); min and median ratios shown too.

    A setting that dispatches the same op sequence as its reference (``same_ops``) meets any target >= 1 by
    construction, whatever the noise says.
    """
    lines = []
    for setting in SETTINGS:
        for key in setting.target_on:
            stats, reference = summary[setting.name][key], summary[setting.reference][key]
            paired = stats["x_ref_paired"]
            if setting.name in same_ops:
                met = "MET by construction: same aten op sequence as the reference, the ratio is noise"
            elif paired > 0 and min(stats["min"], stats["median"], reference["min"], reference["median"]) > 0:
                met = "MET" if paired <= setting.target else "MISSED"
            else:
                met = "NOT MEASURED (too noisy: a per-token time at or below 0)"
            lines.append(
                f"- {setting.name}, {key.replace('_', '-')}: {ratios_text(stats, 'ref')} of {setting.reference}; "
                f"target <= {setting.target:g}x: **{met}**"
            )
    return lines


def table(summary: dict[str, dict[str, dict[str, float]]], ops: dict[str, dict[str, float]]) -> str:
    """The Markdown results table (milliseconds; aten ops per prefill and per generated token)."""
    rows = [
        "| setting | prefill ms min / median | per-token ms min / median | prefill x base paired (min, median) "
        "| per-token x base paired (min, median) | aten ops prefill / token |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def ratios(stats: dict[str, float]) -> str:
        return f"{stats['x_base_paired']:.3f} ({stats['x_base_min']:.3f}, {stats['x_base_median']:.3f})"

    for setting in SETTINGS:
        pre, tok = summary[setting.name]["prefill"], summary[setting.name]["per_token"]
        rows.append(
            f"| {setting.name} | {1e3 * pre['min']:.1f} / {1e3 * pre['median']:.1f} "
            f"| {1e3 * tok['min']:.2f} / {1e3 * tok['median']:.2f} | {ratios(pre)} | {ratios(tok)} "
            f"| {ops[setting.name]['prefill']} / {ops[setting.name]['per_token']:.0f} |"
        )
    return "\n".join(rows)


# -- main ------------------------------------------------------------------------------------------------------------


def run(cfg: BenchConfig, rounds: int, new_tokens: int, workdir: pathlib.Path) -> dict[str, Any]:
    """Build, load every setting, warm up, time ``rounds`` interleaved rounds; return the raw and summarised data."""
    started = time.perf_counter()
    path = build_checkpoint(cfg, workdir / "model")
    models: dict[str, Any] = {}
    for setting in SETTINGS:
        models[setting.name] = load(setting, path, cfg)
        if setting.name != BASE:
            share_weights(models[setting.name].model, models[BASE].model)
        if cfg.device == "cuda":
            torch.cuda.empty_cache()
    inputs = prompt_inputs(models[BASE])
    image_tokens = int((inputs["input_ids"] == models[BASE].model.config.image_token_index).sum())
    tokens = {"prefill": 0, "gen_1": 1, "gen_n": new_tokens + 1}
    for setting in SETTINGS:  # warm-up round, not recorded
        for n in tokens.values():
            time_call(models[setting.name], inputs, n, cfg.device)
    ops: dict[str, dict[str, int]] = {s.name: {} for s in SETTINGS}
    signatures: dict[str, list[str]] = {s.name: [] for s in SETTINGS}
    for setting in SETTINGS:
        for key, n in tokens.items():
            counter = OpCounter()
            time_call(models[setting.name], inputs, n, cfg.device, counter)
            ops[setting.name][key] = len(counter.names)
            signatures[setting.name].append(counter.signature)
    for setting in SETTINGS:
        edits = setting.plugin and models[setting.name].lostattn.intervention.mode != "none"
        if edits and signatures[setting.name] == signatures[BASE]:
            raise RuntimeError(f"{setting.name}: the base's exact aten op sequence, so the intervention did not run")
    print(f"loaded, warmed up and counted in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    load_before = os.getloadavg()
    records: list[dict[str, dict[str, float]]] = []
    for index in range(rounds):
        shift = index % len(SETTINGS)
        order = SETTINGS[shift:] + SETTINGS[:shift]
        record: dict[str, dict[str, float]] = {s.name: {} for s in SETTINGS}
        for key, n in tokens.items():  # each timing back to back across settings: paired under the same load
            for setting in order:
                record[setting.name][key] = time_call(models[setting.name], inputs, n, cfg.device)
        records.append(record)
        print(f"round {index + 1}/{rounds} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return {
        "config": asdict(cfg),
        "settings": [asdict(s) for s in SETTINGS],
        "interventions": {s.name: models[s.name].lostattn.intervention.to_dict() for s in SETTINGS if s.plugin},
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "image_tokens": image_tokens,
        "rounds": rounds,
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "versions": versions(cfg.device),
        "wall_s": time.perf_counter() - started,
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "ops": {
            name: {"prefill": n["prefill"], "per_token": (n["gen_n"] - n["gen_1"]) / new_tokens}
            for name, n in ops.items()
        },
        "same_ops_as_reference": [
            s.name for s in SETTINGS if s.reference and signatures[s.name] == signatures[s.reference]
        ],
        "raw_s": records,
        "summary_s": summarise(records, new_tokens),
    }


def versions(device: str) -> dict[str, str]:
    """The releases the timings come from, and the machine."""
    return {**{name: metadata.version(name) for name in ("torch", "transformers", "lmms-eval")},
            "device": describe_device(device)}


def describe_device(device: str) -> str:
    """A short name of the machine the timings come from."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (after one warm-up round)")
    parser.add_argument("--new-tokens", type=int, default=32, help="N: per-token = (t(gen N+1) - t(gen 1)) / N")
    parser.add_argument("--json", type=pathlib.Path, help="also write raw timings and the summary here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.new_tokens < 1:
        parser.error("--rounds and --new-tokens must be >= 1")
    cfg = CONFIGS[args.config]
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--config {cfg.name} runs on a CUDA GPU (fp16 LLaVA-1.5-7B-sized decoder), but torch "
            f"{torch.__version__} sees no CUDA device here. Use --config cpu on this machine."
        )
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    transformers_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="lostattn-bench-") as tmp:
        result = run(cfg, args.rounds, args.new_tokens, pathlib.Path(tmp))
    load = result["load_average_1_5_15"]
    print(
        f"config {cfg.name}: {result['prompt_tokens']}-token prompt ({result['image_tokens']} image tokens), "
        f"{args.rounds} rounds, per-token over {args.new_tokens} tokens, {result['versions']['device']}, "
        f"OMP_WAIT_POLICY={result['omp_wait_policy']}, "
        f"{result['wall_s']:.0f} s; load average (1 min) {load['before'][0]:.2f} before timing, "
        f"{load['after'][0]:.2f} after\n"
    )
    print(table(result["summary_s"], result["ops"]))
    print("\nTargets:")
    print("\n".join(verdicts(result["summary_s"], result["same_ops_as_reference"])))
    if CONTROL in result["same_ops_as_reference"]:
        noise, base = result["summary_s"][CONTROL], result["ops"][BASE]
        print(
            f"\nNoise check: {CONTROL} dispatches the very same aten op sequence as the base ({base['prefill']} ops "
            f"per prefill, {base['per_token']:.0f} per token), so its deviation from 1.000x is measurement noise: "
            f"prefill {ratios_text(noise['prefill'], 'base')}, per-token {ratios_text(noise['per_token'], 'base')}."
        )
    print("\nResolved interventions:")
    for name, inter in result["interventions"].items():
        print(f"- {name}: " + ", ".join(f"{key}={value}" for key, value in inter.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
