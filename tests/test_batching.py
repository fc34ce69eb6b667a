"""Batched evaluation under the plugin: every row equals its batch-of-one run, named by its own document.

The plugin follows the base class's own batches (``LostAttnMixin.follows_batches``): each row is named
``task/split/doc_id`` for its draws and gets its own statistics. Rows of a batch are left-padded to different prompt
lengths, so a row differs from its batch-of-one run only by the base model's own batched-vs-unbatched float
differences. Measured on the tiny models (2026-12-02, CPU, transformers 5.24) as the largest per-layer RID/MixIG
difference of a row from its batch-of-one run: in float32 with attn=none, Qwen2.5-VL 5e-5 and Gemma 3 3e-7; in
bfloat16 (lmms-eval's Qwen and Gemma 3 classes load bfloat16), 2e-4 with attn=none and up to 6e-4 under an
intervention. The tolerances below cover those and stay under the smallest difference between two documents
(6e-3), so a row given another document's values fails.
"""

from __future__ import annotations

import itertools
import pathlib
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from cli_helpers import lmms_eval_argv, results_of, run_cli, run_cli_batch, run_error, samples_of
from lmms_eval.api.instance import Instance
from lmms_eval.models import get_model
from PIL import Image

from lmms_lostattn.intervention import patterns
from lmms_lostattn.intervention.scope import InterventionError
from lmms_lostattn.model_wrappers.lmms_eval.base import PROGRESS
from lmms_lostattn.testing import tiny_model_dir

MODES = ["none", "gaussian", "uniform", "identity", "sink", "shuffle", "knockout", "noise_delta", "noise_qkv"]
CONFIGS = {mode: f"attn={mode},stats=paper" for mode in MODES} | {
    "paper": "attn=gaussian,attn_preset=paper,stats=paper"
}
BATCH_SIZES = (1, 3, 4)  # in process, DOCUMENTS = 7: batches of 3+3+1 and 4+3
DOCUMENTS = 7
CLI_BATCH_SIZES = (1, 4)  # through the command line, LIMIT = 5: batches of 4+1
LIMIT = 5
BF16_TOLERANCE = 1e-3
F32_TOLERANCE = 2e-4
_QWEN_CPU = f"device=cpu,device_map=cpu,min_pixels={28 * 28 * 4},max_pixels={28 * 28 * 16}"
FAMILIES = {  # variant: (model id, CPU model_args, extra lmms-eval flags)
    "qwen2_5_vl": ("lostattn_qwen2_5_vl", _QWEN_CPU, ()),  # the chat class
    "gemma3": ("lostattn_gemma3", "device=cpu,device_map=cpu", ()),  # simple only
}


def _per_layer(sample: dict) -> list[float]:
    values = sample["lostattn_layers"]["values"]
    return [v for module in ("attn", "ffn") for metric in ("rid", "mixig") for v in values[module]["all"][metric]]


def _rows_match_their_documents(single: list[list[float]], batched: list[list[float]], tolerance: float) -> None:
    """Each batched row equals its own document's batch-of-one values within ``tolerance``, and no other's."""
    for doc, row in enumerate(batched):
        distances = [max(abs(a - b) for a, b in zip(row, other, strict=True)) for other in single]
        assert distances[doc] <= tolerance, (doc, distances[doc])
        assert min(d for i, d in enumerate(distances) if i != doc) > tolerance, (doc, distances)


def _safe(name: str) -> str:
    return re.sub(r"\W", "_", name)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Every configuration x CLI batch size x family through the lmms-eval command line, in two subprocesses."""
    root = tmp_path_factory.mktemp("batching")
    runs = []
    for variant, (model_id, cpu_args, extra) in FAMILIES.items():
        for (name, args), batch_size in itertools.product(CONFIGS.items(), CLI_BATCH_SIZES):
            output = root / variant / _safe(name) / str(batch_size)
            model_args = f"pretrained={tiny_model_dir(variant)},{cpu_args},{args}"
            flags = ("--batch_size", str(batch_size), "--log_samples", *extra)
            runs.append(lmms_eval_argv(model_id, model_args, output, *flags, limit=LIMIT))
    run_cli_batch(runs, root, processes=2)
    return root


@pytest.mark.cli
@pytest.mark.parametrize("variant", FAMILIES)
@pytest.mark.parametrize("config", CONFIGS)
def test_each_row_equals_its_batch_of_one_run_through_the_cli(
    cli_runs: pathlib.Path, variant: str, config: str
) -> None:
    outputs = {size: cli_runs / variant / _safe(config) / str(size) for size in CLI_BATCH_SIZES}
    for size, output in outputs.items():
        assert not run_error(output), f"batch {size}:\n{run_error(output)}"
    samples = {size: samples_of(output, "lostattn_pope") for size, output in outputs.items()}
    single = samples[1]
    assert [sample["doc_id"] for sample in single] == list(range(LIMIT))
    for size in CLI_BATCH_SIZES[1:]:
        assert [s["filtered_resps"] for s in samples[size]] == [s["filtered_resps"] for s in single], size
        _rows_match_their_documents(
            [_per_layer(s) for s in single], [_per_layer(s) for s in samples[size]], BF16_TOLERANCE
        )
        assert results_of(outputs[size])["results"]["lostattn_pope"]["lostattn_samples,none"] == LIMIT
        assert results_of(outputs[size])["lostattn"]["spec_hash"] == results_of(outputs[1])["lostattn"]["spec_hash"]


@pytest.mark.cli
def test_the_interventions_change_the_rows(cli_runs: pathlib.Path) -> None:
    """The equality above is that of runs of each intervention: every run records the mode it was given, and at
    batch size 1 its rows differ from attn=none's. (Not by much for an edit of the last prompt row alone, which the
    statistics of every token dilute: 3e-4 for uniform on qwen2_5_vl, about what the edited path's own bfloat16
    rounding gives. That the edits change the model's outputs is tested in process, tests/test_scope.py.)"""
    for variant in FAMILIES:
        learned = [_per_layer(s) for s in samples_of(cli_runs / variant / "none" / "1", "lostattn_pope")]
        for config in set(CONFIGS) - {"none"}:
            run = cli_runs / variant / _safe(config) / "1"
            mode = "gaussian" if config == "paper" else config
            assert results_of(run)["lostattn"]["intervention"]["mode"] == mode, (variant, config)
            edited = [_per_layer(s) for s in samples_of(run, "lostattn_pope")]
            assert edited != learned, (variant, config)


@pytest.mark.cli
def test_two_ranks_at_batch_two_aggregate_like_one_rank_at_batch_one(tmp_path: pathlib.Path) -> None:
    model_args = f"pretrained={tiny_model_dir('qwen2_5_vl')},{_QWEN_CPU},{CONFIGS['paper']}"
    common = ["--model", "lostattn_qwen2_5_vl", "--model_args", model_args, "--tasks", "lostattn_pope"]
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534")
    # CPU ranks presented as the GPU ranks lmms_eval expects: see cpu_ranks/sitecustomize.py
    cpu_ranks = {"PYTHONPATH": str(pathlib.Path(__file__).parent / "cpu_ranks"), "CPU_RANKS_HOST": "lmms_eval"}
    run_cli(*common, "--batch_size", "2", output=tmp_path / "two", limit=5, launcher=launcher, env=cpu_ranks)
    done = run_cli(*common, "--batch_size", "1", output=tmp_path / "one", limit=5)
    assert re.search(rf"{re.escape(PROGRESS)}: 100%.*\b5/5\b", done.stderr)  # one bar, counting requests
    two, one = results_of(tmp_path / "two")["results"], results_of(tmp_path / "one")["results"]
    assert two["lostattn_pope"]["lostattn_samples,none"] == one["lostattn_pope"]["lostattn_samples,none"] == 5
    for row in ("lostattn_rid_attn", "lostattn_rid_ffn", "lostattn_mixig_attn", "lostattn_mixig_ffn"):
        assert two["lostattn_pope"][f"{row},none"] == pytest.approx(one["lostattn_pope"][f"{row},none"], abs=1e-4)


# -- in process, float32: statistics to 1e-5 and the draws bit for bit ---------------------------------------------

QUESTIONS = [
    "Is it red?",
    "Is there a small blue star in the lower left corner of the picture?",
    "Any circle?",
    "Are there two squares?",
    "Is the triangle green?",
    "Do you see a yellow shape near the top edge?",
    "Is it dark?",
]
DOCS = [  # prompts of different lengths (left padding) and images of two sizes
    {"question": question, "image": Image.new("RGB", (56 + 28 * (i % 2), 56), (60 * i, 200 - 25 * i, 90))}
    for i, question in enumerate(QUESTIONS)
]


def _requests(simple: bool) -> list[Instance]:
    gen_kwargs = {"max_new_tokens": 3, "temperature": 0, "until": ["\n\n"]}

    def to_messages(doc: dict) -> list[dict]:
        return [
            {
                "role": "user",
                "content": [{"type": "image", "url": doc["image"]}, {"type": "text", "text": doc["question"]}],
            }
        ]

    requests = []
    for doc_id, doc in enumerate(DOCS):
        args = (
            (doc["question"], dict(gen_kwargs), lambda d: [d["image"]], doc_id, "toy", "test")
            if simple
            else (doc["question"], to_messages, dict(gen_kwargs), doc_id, "toy", "test")
        )
        requests.append(
            Instance("generate_until", args, 0, {"task": "toy", "doc_id": doc_id, "repeats": 1, "split": "test"})
        )
    return requests


@contextmanager
def _recorded_draws() -> Iterator[dict[tuple[int, int, int], torch.Tensor]]:
    """Every per-key draw the intervention makes, by (sample key, layer, real key position), over the real keys."""
    draws: dict[tuple[int, int, int], torch.Tensor] = {}
    original = patterns.Coordinates.key_draws

    def key_draws(coords: patterns.Coordinates, dist: str, num_heads: int) -> torch.Tensor:
        values = original(coords, dist, num_heads)
        for row, (key, first) in enumerate(zip(coords.sample_key.tolist(), coords.first_real.tolist(), strict=True)):
            for position in range(max(coords.keys.start, first), coords.keys.stop):
                draws[key, coords.layer, position - first] = values[row, :, 0, position - coords.keys.start].clone()
        return values

    patterns.Coordinates.key_draws = key_draws
    try:
        yield draws
    finally:
        patterns.Coordinates.key_draws = original


def _load(variant: str, batch_size: int, model_args: str, simple: bool = False):
    """The plugin's lmms-eval model for ``variant`` (its simple class if ``simple``), built from a ``--model_args``
    string as lmms-eval builds it."""
    model_id, cpu_args, _ = FAMILIES.get(variant, (f"lostattn_{variant}", _QWEN_CPU, ()))
    arg_string = f"pretrained={tiny_model_dir(variant)},{cpu_args},{model_args}"
    model_class = get_model(model_id, force_simple=simple)
    lm = model_class.create_from_arg_string(arg_string, {"batch_size": batch_size})
    lm.task_dict = {"toy": {"test": DOCS}}
    return lm


def _run(variant: str, simple: bool, batch_size: int, model_args: str) -> tuple[list[str], list[list[float]], dict]:
    lm = _load(variant, batch_size, model_args, simple)
    lm.model.to(torch.float32)
    with _recorded_draws() as draws:
        texts = [getattr(out, "text", out) for out in lm.generate_until(_requests(lm.is_simple))]
    stats = []
    for doc_id in range(DOCUMENTS):
        (record,) = lm.lostattn.run.records["toy", doc_id]
        values = record["values"]
        stats.append([v for m in ("attn", "ffn") for k in ("rid", "mixig") for v in values[m]["all"][k]])
    return texts, stats, draws


@pytest.mark.parametrize(
    ("variant", "simple"),
    [("qwen2_5_vl", False), ("gemma3", True), ("qwen3_vl", True)],  # qwen3_vl's simple class builds every batch first
    ids=["qwen2_5_vl-chat", "gemma3-simple", "qwen3_vl-simple"],
)
def test_rows_and_draws_do_not_depend_on_the_batch(variant: str, simple: bool) -> None:
    args = "attn=gaussian,attn_preset=paper,attn_draw=per_head,stats=paper"
    texts, stats, draws = _run(variant, simple, 1, args)
    assert len({key for key, _, _ in draws}) == DOCUMENTS  # one identity per document
    for batch_size in BATCH_SIZES[1:]:
        batched_texts, batched_stats, batched_draws = _run(variant, simple, batch_size, args)
        assert batched_texts == texts
        _rows_match_their_documents(stats, batched_stats, F32_TOLERANCE)
        assert draws.keys() <= batched_draws.keys()  # a batch also runs rows on after they stopped
        assert all(torch.equal(batched_draws[key], draws[key]) for key in draws)


def test_a_right_padded_batch_is_refused_with_what_to_do() -> None:
    """lmms-eval's qwen2_vl pads as its tokenizer says; the tiny one pads right, which generation cannot use."""
    lm = _load("qwen2_vl", 2, "attn=uniform")
    with pytest.raises(InterventionError, match=r"right-padded.*padding_side='left'.*batch size 1"):
        lm.generate_until(_requests(simple=True)[:2])


def test_a_class_that_runs_its_batches_one_prompt_at_a_time_falls_back_to_one_request_at_a_time() -> None:
    """lmms-eval's mistral3_vl generates each prompt of a batch alone: the plugin runs its requests one at a time."""
    lm = get_model("lostattn_mistral3_vl")(
        pretrained=str(tiny_model_dir("mistral3")), batch_size=3, device="cpu", device_map="cpu", stats="paper"
    )
    assert "generate_until" not in lm.follows_batches
    lm.task_dict = {"toy": {"test": DOCS}}
    lm.generate_until(_requests(simple=True)[:3])
    assert all(len(lm.lostattn.run.records["toy", doc_id]) == 1 for doc_id in range(3))
