"""``lostattn doctor``: is this environment one the package is tested on, and does the mechanism work in it?

Four parts, each line ``ok`` or what is wrong: the installed versions against the declared (tested) ranges; every
contact point with an upstream internal (:data:`lmms_lostattn.intervention.contacts.CONTACT_POINTS`, plus the host
glue's; an internal that moved from under the mechanism's modules is reported, not raised); the hub kernels setting
(:mod:`lmms_lostattn.compat.kernels`) and what a load here runs; and a tiny LLaVA, saved and loaded through
``from_pretrained`` as users load checkpoints, through a prefill and cached decoding, with edits and statistics, against
the same generation recomputed without the KV cache. Ends with ``supported`` (exit 0) or what to install (exit 1).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from lmms_lostattn.compat.contacts import ContactPoint
from lmms_lostattn.compat.kernels import (
    ENV,
    HubKernelsError,
    accelerator_load,
    describe_layers,
    hub_offline,
    kernels_by_default,
    kernels_record,
    require_reachable_kernels,
)
from lmms_lostattn.compat.versions import (
    ALLOW_UNTESTED,
    in_force,
    install_command,
    installed,
    tested_requirements,
    version_problems,
)

# Interventions run end to end: image keys on the last rows (the paper's edit), and every key (positions matter).
END_TO_END = (
    {"attn": "gaussian", "attn_layers": "all", "stats": "paper"},
    {"attn": "uniform", "attn_keys": "all", "attn_layers": "all", "stats": "paper"},
)
QUESTIONS = ("Is there a red circle?", "What colour is the big square in the picture on the left?")
NEW_TOKENS = 4
TOLERANCE = 1e-5  # float32: cached decoding and recomputation differ only by reassociation


def _tiny_inputs(processor: Any) -> tuple[list[dict], dict]:
    """One unpadded prompt per question (no attention mask reaches the model) and both left-padded in one batch."""
    from PIL import Image

    processor.tokenizer.padding_side = "left"
    images = [Image.new("RGB", (40, 32), (40 + 90 * i, 200 - 60 * i, 90)) for i in range(len(QUESTIONS))]
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True,
        )
        for question in QUESTIONS
    ]
    singles = [
        processor(images=[image], text=[text], return_tensors="pt") for image, text in zip(images, prompts, strict=True)
    ]
    return singles, processor(images=images, text=prompts, padding=True, return_tensors="pt")


def _generate(model: Any, inputs: dict, use_cache: bool) -> tuple[Any, Any]:
    import torch

    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            use_cache=use_cache,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out.sequences, torch.stack(out.scores, dim=1)


def _check_intervention(model: Any, singles: list[dict], batch: dict, args: dict[str, str]) -> None:
    """Cached decoding equals recomputation, single prompts and the padded batch; the edit changes the logits;
    statistics are measured once per prompt (on its prefill), finite in every layer."""
    import torch

    from lmms_lostattn.config.spec import InterventionSpec
    from lmms_lostattn.families import adapter_for
    from lmms_lostattn.intervention.scope import intervene
    from lmms_lostattn.statistics.collector import StatsCollector

    text = model.config.get_text_config()
    spec = InterventionSpec.from_model_args(args)
    intervention = spec.resolve(text.num_hidden_layers, text.num_attention_heads)
    adapter = adapter_for(model.config)
    collector = StatsCollector(spec.stats, text.num_hidden_layers)
    prefills: list[int] = []

    def on_layer(layer: int, *rest: Any) -> None:
        prefills.extend([layer] if layer == 0 else [])
        collector(layer, *rest)

    for inputs in (*singles, batch):
        _, learned = _generate(model, inputs, use_cache=True)
        with intervene(model, intervention, adapter, on_layer=on_layer) as scope:
            prefills.clear()
            tokens, scores = _generate(model, inputs, use_cache=True)
            scope.raise_pending()
            records, measured = collector.take(), len(prefills)
            tokens_again, scores_again = _generate(model, inputs, use_cache=False)
            scope.raise_pending()
            collector.take()
        if not torch.equal(tokens, tokens_again) or not torch.allclose(scores, scores_again, atol=TOLERANCE):
            gap = (scores - scores_again).abs().max().item()
            raise AssertionError(
                f"cached decoding differs from recomputation without the cache (max |logit gap| {gap:.3g})"
            )
        if torch.allclose(scores[:, 0], learned[:, 0], atol=TOLERANCE):
            raise AssertionError("the edit did not change the first generated token's logits")
        if measured != 1:
            raise AssertionError(f"statistics measured on {measured} forward passes of one generate, expected 1")
        rid = [record["values"]["attn"]["all"]["rid"] for record in records]
        if len(rid) != inputs["input_ids"].shape[0] or not all(
            value is not None and math.isfinite(value) for row in rid for value in row
        ):
            raise AssertionError(f"statistics not finite in every layer and sample: {rid}")


def load_tiny_llava() -> tuple[Any, Any]:
    """``(model, processor)``: a tiny random-weight LLaVA saved to a temporary folder and loaded back through
    ``from_pretrained`` with its defaults (hub kernels included), on the CPU in float32."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging

    from lmms_lostattn.testing import build_tiny_model

    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory(prefix="lostattn-doctor-") as folder:
            build_tiny_model(folder, "llava", text_layers=2)
            model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
            return model, AutoProcessor.from_pretrained(folder)
    finally:
        if bars:
            logging.enable_progress_bar()


def kernels_lines(model: Any) -> tuple[list[str], int]:
    """The hub kernels part: the setting, what ``model`` (loaded here on the CPU) runs, and whether a load on this
    machine's accelerator could fetch its kernels; the lines and the number of problems."""
    from lmms_lostattn.compat.versions import installed

    record = kernels_record(model)
    default = "yes" if kernels_by_default() else "no"
    setting = f"{ENV} unset" if record[ENV] is None else f"{ENV}={record[ENV]!r}"
    lines = [
        _status(None, f"transformers {installed('transformers')} kernelizes at load by default: {default} ({setting})"),
        _status(
            None,
            f"tiny LLaVA loaded here (cpu): use_kernels={record['use_kernels']}, "
            f"kernel layers: {describe_layers(record['layers'])}",
        ),
    ]
    accelerator = accelerator_load()
    if accelerator is None:
        return [*lines, _status(None, "no accelerator here: hub kernels apply to GPU loads only")], 0
    if not kernels_by_default():
        return [*lines, _status(None, f"{accelerator}: a load here runs PyTorch's layers (no hub kernels)")], 0
    if hub_offline():
        return [*lines, _status(None, f"{accelerator}: offline (HF_HUB_OFFLINE): a load here runs the hub kernels in "
                                      "the local cache; missing ones fall back to PyTorch's layers")], 0
    try:
        require_reachable_kernels()
    except HubKernelsError as error:
        return [*lines, _status(str(error), "")], 1
    return [*lines, _status(None, f"{accelerator}: a load here can fetch its hub kernels")], 0


def end_to_end_checks(model: Any, processor: Any) -> list[tuple[str, Callable[[], None]]]:
    """``(description, check)`` pairs of the tiny-model run."""
    singles, batch = _tiny_inputs(processor)
    return [
        (
            ",".join(f"{k}={v}" for k, v in args.items()),
            lambda args=args: _check_intervention(model, singles, batch, args),
        )
        for args in END_TO_END
    ]


def _status(problem: str | None, ok: str) -> str:
    return f"  ok       {ok}" if problem is None else f"  FAILED   {problem}"


def _model_parts(model: Any, processor: Any, echo: Callable[[str], None]) -> int:
    """The hub kernels and end-to-end parts on the loaded tiny model; the number of problems."""
    try:
        lines, problems = kernels_lines(model)
    except Exception as error:  # a kernels internal that moved is the finding; the run below still runs
        lines, problems = [_status(f"hub kernels: {type(error).__name__}: {error}", "")], 1
    for line in lines:
        echo(line)
    echo(f"tiny LLaVA: prefill, {NEW_TOKENS} cached decoding steps vs recomputation, edits and statistics")
    for description, check in end_to_end_checks(model, processor):
        try:
            check()
            problem = None
        except Exception as error:  # every failure of the run is the finding
            problem = f"{description}: {type(error).__name__}: {error}"
        echo(_status(problem, f"{description}: cached decoding equals recomputation, statistics on the prefill"))
        problems += problem is not None
    return problems


def mechanism_points() -> tuple[Sequence[ContactPoint], str | None]:
    """The intervention's contact points, or why its modules do not load: an internal they resolve on import (the
    attention and mask interfaces) that has moved."""
    try:
        from lmms_lostattn.intervention.contacts import CONTACT_POINTS
    except Exception as error:  # the finding; the other parts still run
        return (), f"the intervention's modules: {type(error).__name__}: {error}"
    return CONTACT_POINTS, None


def doctor(host_points: Sequence[ContactPoint] = (), echo: Callable[[str], None] = print) -> int:
    """Print the four parts and the verdict; 0 when supported, 1 otherwise."""
    problems = 0
    echo(f"lmms-lostattn {installed('lmms-lostattn')}: versions installed against the tested ranges")
    outside = version_problems()
    allowed = os.environ.get(ALLOW_UNTESTED) == "1"
    untested = []  # installed outside their ranges, which the variable allows (a missing one is a problem still)
    for req in filter(in_force, tested_requirements()):  # a host extra's only where that host is installed
        line = next((p for p in outside if p.startswith(f"{req.name} ")), None)
        if line is not None and allowed and installed(req.name) is not None:
            untested.append(line)
            echo(f"  untested {line} ({ALLOW_UNTESTED}=1)")
        else:
            echo(_status(line, f"{req.name} {installed(req.name)} ({req.specifier or 'any'})"))
    missing_or_refused = len(outside) - len(untested)
    problems += missing_or_refused
    echo("contact points with upstream internals")
    points, unloaded = mechanism_points()
    if unloaded is not None:
        echo(_status(unloaded, ""))
        problems += 1
    for point in (*points, *host_points):
        problem = point.problem()
        echo(_status(problem, point.name))
        problems += problem is not None
    echo("hub kernels (transformers' use_kernels; the plugin loads as its base class does)")
    try:
        model, processor = load_tiny_llava()
    except Exception as error:  # a load that fails is the finding; nothing below can run without it
        echo(_status(f"the tiny LLaVA through from_pretrained: {type(error).__name__}: {error}", ""))
        problems += 1
    else:
        problems += _model_parts(model, processor, echo)
    if problems:
        fix = (f" Install the tested versions: {install_command()} (or, from a checkout, pip install . -c "
               "constraints.txt)") if missing_or_refused else ""
        echo(f"NOT supported: {problems} problem(s) above.{fix}")
        return 1
    if untested:
        echo(f"works here, untested: {len(untested)} version(s) outside the tested ranges ({ALLOW_UNTESTED}=1)")
        return 0
    echo("supported")
    return 0
