"""The lm-evaluation-harness host: ``lostattn-hf`` against lm-eval's own ``hf`` on tiny models of every text family,
batch-size invariance of every mode on right-padded scoring rows, the continuation rows ``attn_rows=last`` edits,
errors before loading, and ``lostattn-lm-eval`` end to end on the shipped text tasks (multiple choice, generation,
rolling loglikelihood)."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from cli_helpers import OFFLINE, results_of, run_cli_batch, run_error, samples_of
from lm_eval.api.instance import Instance
from lm_eval.models.hf_vlms import HFMultimodalLM
from lm_eval.models.huggingface import HFLM
from lm_eval.utils import get_rolling_token_windows
from PIL import Image

from lmms_lostattn.cli import main
from lmms_lostattn.config.spec import InterventionSpec, SpecError
from lmms_lostattn.families import adapter_for
from lmms_lostattn.intervention.scope import intervene
from lmms_lostattn.model_wrappers.lm_eval.launcher import bracket_model_args
from lmms_lostattn.model_wrappers.lm_eval.models import LostAttnHFLM, LostAttnHFMultimodalLM
from lmms_lostattn.model_wrappers.lm_eval.reporting import FILTER
from lmms_lostattn.models import SHAPES_LLAVA_DIR
from lmms_lostattn.statistics.collector import mean_records
from lmms_lostattn.tasks import tasks_path
from lmms_lostattn.testing import TEXT_VARIANTS

MODES = ["none", "gaussian", "uniform", "identity", "sink", "shuffle", "knockout", "noise_delta", "noise_qkv"]
_CPU = {"device": "cpu", "dtype": "float32"}
GAUSSIAN = {"attn": "gaussian", "attn_keys": "all"}
# (context, continuations): one-token choices share a row under lm-eval's logits cache; multi-token ones do not;
# the contexts differ in length, so batches of 4 right-pad
DOCS = [
    ("The car is", [" red", " blue", " green"]),
    ("USER: Is there a dog in the image? ASSISTANT:", [" Yes", " No"]),
    ("What color", [" is the car?", " 1 2 3"]),
    ("A small white cat sits on a wooden table next to a blue cup. The cup is", [" blue", " a cup of"]),
]
GENERATE = ["The car is", "USER: What color is the car? ASSISTANT:", "Options: A. red B. green"]


def _scoring_requests() -> list[Instance]:
    return [
        Instance("loglikelihood", {}, (context, continuation), index, ("toy", doc_id, 1))
        for doc_id, (context, continuations) in enumerate(DOCS)
        for index, continuation in enumerate(continuations)
    ]


def _generation_requests() -> list[Instance]:
    gen_kwargs = {"until": ["\n"], "max_gen_toks": 4, "do_sample": False}
    return [
        Instance("generate_until", {}, (context, dict(gen_kwargs)), 0, ("toy", doc_id, 1))
        for doc_id, context in enumerate(GENERATE)
    ]


def _extra(mode: str) -> dict[str, str]:
    """A text model has no image tokens: the attention-weight modes edit every key (identity's default)."""
    return {} if mode in ("none", "noise_delta", "noise_qkv", "identity") else {"attn_keys": "all"}


@pytest.mark.parametrize("variant", TEXT_VARIANTS)
def test_attn_none_with_statistics_scores_and_generates_like_lm_eval_hf(
    tiny_model: Callable[[str], pathlib.Path], variant: str
) -> None:
    """The scope attached (stats=paper) leaves lm-eval's loglikelihoods (1e-5) and greedy generations unchanged,
    at batch size 1 and 4; every document gets finite statistics."""
    path = str(tiny_model(variant))
    for batch_size in (1, 4):
        base = HFLM(pretrained=path, batch_size=batch_size, **_CPU)
        ours = LostAttnHFLM(pretrained=path, batch_size=batch_size, stats="paper", **_CPU)
        expected, got = base.loglikelihood(_scoring_requests()), ours.loglikelihood(_scoring_requests())
        assert [greedy for _, greedy in got] == [greedy for _, greedy in expected]
        assert [value for value, _ in got] == pytest.approx([value for value, _ in expected], abs=1e-5)
        assert ours.generate_until(_generation_requests()) == base.generate_until(_generation_requests())
        records = ours.lostattn.run.records
        assert {doc_id for _, doc_id in records} == set(range(max(len(DOCS), len(GENERATE))))
        layers = len(adapter_for(ours.model.config).decoder_layers(ours.model))
        for record in (r for rs in records.values() for r in rs):
            values = record["values"]["attn"]["all"]["rid"]
            assert len(values) == layers and all(value is not None and 0 <= value <= 1 for value in values)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_scores_each_row_as_at_batch_size_one(tiny_model: Callable[[str], pathlib.Path], mode: str) -> None:
    """Right-padded batches of 4 (shared multiple-choice rows included): each request's loglikelihood and each
    document's statistics equal their batch-of-one values (float32; the base model's own batch differences are
    below 1e-5 here), and the generations are equal."""
    path = str(tiny_model("llama"))
    runs = {}
    for batch_size in (1, 4):
        lm = LostAttnHFLM(pretrained=path, batch_size=batch_size, attn=mode, stats="paper", **_extra(mode), **_CPU)
        runs[batch_size] = (
            lm.loglikelihood(_scoring_requests()),
            lm.generate_until(_generation_requests()),
            dict(lm.lostattn.run.records),
        )
    (scores_1, texts_1, records_1), (scores_4, texts_4, records_4) = runs[1], runs[4]
    assert [value for value, _ in scores_4] == pytest.approx([value for value, _ in scores_1], abs=1e-5)
    assert texts_4 == texts_1
    assert records_4.keys() == records_1.keys()
    for key, records in records_1.items():
        for one, four in zip(records, records_4[key], strict=True):
            for metric in ("rid", "mixig"):
                for module in ("attn", "ffn"):
                    a, b = one["values"][module]["all"][metric], four["values"][module]["all"][metric]
                    assert b == pytest.approx(a, abs=1e-5), (key, module, metric)
    if mode != "none":
        base = LostAttnHFLM(pretrained=path, batch_size=4, **_CPU).loglikelihood(_scoring_requests())
        assert any(abs(a[0] - b[0]) > 1e-4 for a, b in zip(base, scores_4, strict=True)), "the mode changed nothing"


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_lm_evals_attn_implementation_argument_passes_through(
    tiny_model: Callable[[str], pathlib.Path], implementation: str
) -> None:
    """lm-eval's ``hf`` takes ``attn_implementation`` through ``**kwargs`` (not its signature): it still loads the
    model, the edit runs on that implementation and scores as on the other one."""
    path = str(tiny_model("llama"))
    base = HFLM(pretrained=path, batch_size=1, attn_implementation=implementation, **_CPU)
    ours = LostAttnHFLM(pretrained=path, batch_size=1, attn_implementation=implementation, attn="uniform",
                        attn_keys="all", **_CPU)
    assert ours.model.config._attn_implementation == base.model.config._attn_implementation == implementation
    other = LostAttnHFLM(pretrained=path, batch_size=1, attn="uniform", attn_keys="all",
                         attn_implementation={"eager": "sdpa", "sdpa": "eager"}[implementation], **_CPU)
    scores, reference = (lm.loglikelihood(_scoring_requests()) for lm in (ours, other))
    assert [value for value, _ in scores] == pytest.approx([value for value, _ in reference], abs=1e-5)
    unedited = base.loglikelihood(_scoring_requests())
    assert max(abs(a - b) for (a, _), (b, _) in zip(scores, unedited, strict=True)) > 1e-4  # not float noise


def test_lm_evals_config_overrides_that_look_like_plugin_arguments_pass_through(
    tiny_model: Callable[[str], pathlib.Path],
) -> None:
    """``hf`` passes unknown arguments to ``from_pretrained``, which sets those the config has: a config attribute
    named like the plugin's arguments (``attn_logit_softcapping``) is the config's, and the plugin's checks see the
    override (without soft-capping, ``attn_scale=scores`` is allowed); a name neither knows is still refused."""
    path = str(tiny_model("gemma2"))
    with pytest.raises(SpecError, match="soft-caps"):
        LostAttnHFLM(pretrained=path, batch_size=1, attn="gaussian", attn_keys="all", attn_scale="scores", **_CPU)
    base = HFLM(pretrained=path, batch_size=1, attn_logit_softcapping=None, **_CPU)
    ours = LostAttnHFLM(pretrained=path, batch_size=1, attn_logit_softcapping=None, attn="gaussian", attn_keys="all",
                        attn_scale="scores", **_CPU)
    assert base.model.config.attn_logit_softcapping is ours.model.config.attn_logit_softcapping is None
    with pytest.raises(SpecError, match=r"unknown argument\(s\) attn_logit_softcaping; accepted: attn,"):
        LostAttnHFLM(pretrained=path, batch_size=1, attn_logit_softcaping=None, **_CPU)


def test_lm_evals_padding_on_several_ranks_adds_no_statistics(tiny_model: Callable[[str], pathlib.Path]) -> None:
    """On several ranks lm-eval pads a rank's requests with its last request again: that request's document (here a
    multiple-choice one) keeps one record per option, not the padded option's twice more (without the logits cache,
    which would run the copies in the real request's row)."""
    lm = LostAttnHFLM(pretrained=str(tiny_model("llama")), batch_size=4, logits_cache=False, stats="paper", **_CPU)
    requests = _scoring_requests()
    lm.loglikelihood(requests)
    alone = {document: list(records) for document, records in lm.lostattn.run.records.items()}
    lm.lostattn.run.records.clear()
    lm._world_size = 2  # the padding is lm-eval's evaluator's; the scoring itself runs no collective
    scores = lm.loglikelihood([*requests, requests[-1], requests[-1]])
    padded = dict(lm.lostattn.run.records)
    assert len(scores) == len(requests) + 2 and scores[-1] == scores[-2] == scores[len(requests) - 1]
    assert {document: len(records) for document, records in padded.items()} == {
        document: len(records) for document, records in alone.items()
    }
    for document, records in alone.items():
        for one, other in zip(records, padded[document], strict=True):
            assert other["values"]["attn"]["all"]["rid"] == pytest.approx(one["values"]["attn"]["all"]["rid"], abs=1e-5)


def test_lm_evals_rolling_windows_padding_on_several_ranks_adds_no_statistics(
    tiny_model: Callable[[str], pathlib.Path],
) -> None:
    """On several ranks ``loglikelihood_rolling`` pads a rank that has fewer windows with its first window again:
    those rows give no document a record (here rank 1 of 2, the other rank holding two more windows)."""
    texts = ["The car is red and the sky is blue and the grass is green today.", "A cat."]
    requests = [Instance("loglikelihood_rolling", {}, (text,), 0, ("roll", doc_id, 1))
                for doc_id, text in enumerate(texts)]
    records = {}
    for ranks in (1, 2):
        lm = LostAttnHFLM(pretrained=str(tiny_model("llama")), batch_size=2, max_length=8, stats="paper", **_CPU)
        if ranks == 2:
            windows = sum(len(list(get_rolling_token_windows(lm.tok_encode(text), lm.prefix_token_id, 8, 1)))
                          for text in texts)
            lm._world_size, lm._rank = 2, 1
            lm.all_gather = lambda tensor, windows=windows: torch.tensor([windows + 2, windows])
        scores = lm.loglikelihood_rolling(requests)
        records[ranks] = {document: list(rows) for document, rows in lm.lostattn.run.records.items()}
    assert scores and {doc: len(rows) for doc, rows in records[2].items()} == {doc: len(rows)
                                                                               for doc, rows in records[1].items()}
    for document, rows in records[1].items():
        assert mean_records(records[2][document])["values"] == mean_records(rows)["values"]


def test_a_documents_statistics_do_not_depend_on_the_logits_cache(tiny_model: Callable[[str], pathlib.Path]) -> None:
    """The logits cache runs one row for a document's one-token options (they share the context); the document's
    statistics are still the mean over its requests, one record each, as without the cache (and as lmms-eval, which
    runs one request at a time)."""
    path, requests = str(tiny_model("llama")), _scoring_requests()
    records = {}
    for cache in (True, False):
        lm = LostAttnHFLM(pretrained=path, batch_size=4, logits_cache=cache, stats="paper", **_CPU)
        lm.loglikelihood(requests)
        records[cache] = lm.lostattn.run.records
    for doc_id, (_, options) in enumerate(DOCS):
        shared, alone = records[True][("toy", doc_id)], records[False][("toy", doc_id)]
        assert len(shared) == len(alone) == len(options)
        for module in ("attn", "ffn"):
            got, expected = (mean_records(rows)["values"][module]["all"] for rows in (shared, alone))
            assert got["rid"] == pytest.approx(expected["rid"], abs=1e-5)
            assert got["mixig"] == pytest.approx(expected["mixig"], abs=1e-5)


@pytest.mark.parametrize("mode", ["uniform", "knockout"])
def test_attn_rows_last_edits_the_rows_that_predict_the_continuation(
    tiny_model: Callable[[str], pathlib.Path], mode: str
) -> None:
    """lm-eval's right-padded scoring pass edits what a labelled forward edits (lmms-eval's scoring path: the rows
    from the one before the first labelled token on): the same sum of continuation log-probabilities."""
    path = str(tiny_model("qwen2"))
    lm = LostAttnHFLM(pretrained=path, batch_size=4, attn=mode, attn_keys="all", attn_layers="all", **_CPU)
    got = [value for value, _ in lm.loglikelihood(_scoring_requests())]
    model = lm.model
    intervention = InterventionSpec.from_model_args({"attn": mode, "attn_keys": "all", "attn_layers": "all"}).resolve(
        model.config.num_hidden_layers, model.config.num_attention_heads
    )
    expected = []
    with intervene(model, intervention, adapter_for(model.config)), torch.no_grad():
        for context, continuations in DOCS:
            for continuation in continuations:
                context_ids, continuation_ids = lm._encode_pair(context, continuation)
                ids = torch.tensor([context_ids + continuation_ids])
                labels = torch.full_like(ids, -100)
                labels[0, len(context_ids) :] = ids[0, len(context_ids) :]
                logits = model(input_ids=ids, labels=labels).logits.log_softmax(-1)[0]
                rows = torch.arange(len(context_ids) - 1, ids.shape[1] - 1)
                expected.append(float(logits[rows, ids[0, rows + 1]].sum()))
    assert got == pytest.approx(expected, abs=1e-4)


def _image_requests(image_token: str) -> list[Instance]:
    gen_kwargs = {"until": ["\n"], "max_gen_toks": 4, "do_sample": False}
    return [
        Instance(
            "generate_until",
            {},
            (
                f"{image_token} Is there a {shape} in the image?",
                dict(gen_kwargs),
                {"visual": [Image.new("RGB", (32, 32), color)]},
            ),
            0,
            ("mm", doc_id, 1),
        )
        for doc_id, (shape, color) in enumerate([("cat", "red"), ("dog", "blue"), ("circle", "green")])
    ]


@pytest.mark.parametrize("variant", ["llava", "qwen2_5_vl"])
def test_hf_multimodal_generates_like_lm_eval_and_each_row_as_alone(
    tiny_model: Callable[[str], pathlib.Path], variant: str
) -> None:
    """``lostattn-hf-multimodal``: with statistics attached the generations are lm-eval's own; knocking out every
    image key in every layer changes them, and each row of a batch of 2 generates as at batch size 1."""
    path = str(tiny_model(variant))
    image_token = {"llava": "<image>", "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>"}[variant]
    knockout = {"attn": "knockout", "attn_layers": "all", "attn_rows": "text"}
    texts = {}
    for batch_size in (1, 2):
        base = HFMultimodalLM(pretrained=path, batch_size=batch_size, **_CPU)
        ours = LostAttnHFMultimodalLM(pretrained=path, batch_size=batch_size, stats="paper", **_CPU)
        expected = base.generate_until(_image_requests(image_token))
        assert ours.generate_until(_image_requests(image_token)) == expected
        assert sorted(ours.lostattn.run.records) == [("mm", doc_id) for doc_id in range(3)]
        edited = LostAttnHFMultimodalLM(pretrained=path, batch_size=batch_size, **knockout, **_CPU)
        texts[batch_size] = edited.generate_until(_image_requests(image_token))
        assert texts[batch_size] != expected
    assert texts[2] == texts[1]


@pytest.mark.parametrize(
    ("variant", "args", "message"),
    [
        ("llama", {"attn": "uniform"}, r"attn_keys=image ask for image tokens, and llama is a text model"),
        (
            "llama",
            {"attn": "gaussian", "attn_rows": "image", "attn_keys": "all"},
            r"attn_rows=image ask for image tokens",
        ),
        ("qwen3", {"stats": "paper", "stats_groups": "all,image"}, r"stats_groups=all,image ask for image tokens"),
        ("gpt2", {"attn": "noise_qkv"}, r"gpt2 fuses them in one \(c_attn\)"),
        ("llama", {"attn": "vision_attention"}, r"attn=vision_attention lays a prior .* llama is a text model without"),
        ("llama", {"attn": "uniform", "attn_keys": "all", "batch_size": "auto"}, r"batch_size=auto probes memory"),
        ("llama", {"attn_layer": "1"}, r"attn_layer"),
        ("llama", {"attn": "uniform", "attn_keys": "all", "attn_layers": "9"}, r"this model has layers 0-3"),
        ("llama", {"attn": "noise_delta", "attn_rows": "image"}, r"attn_rows=image ask for image tokens"),
        (
            "gemma2",
            {"attn": "gaussian", "attn_keys": "all", "attn_scale": "scores"},
            r"attn_scale=scores .* gemma2 soft-caps them \(attn_logit_softcapping=",
        ),
    ],
    ids=["default-image-keys", "image-rows", "image-stats", "fused-qkv", "prior", "auto-batch", "typo", "layer",
         "noise-image-rows", "softcap"],
)
def test_bad_arguments_are_refused_before_the_weights_load(
    tiny_model: Callable[[str], pathlib.Path], monkeypatch: pytest.MonkeyPatch, variant: str, args: dict, message: str
) -> None:
    def no_loading(*_: object, **__: object) -> None:
        raise AssertionError("the base class started loading the model")

    monkeypatch.setattr(HFLM, "__init__", no_loading)
    with pytest.raises((SpecError, ValueError), match=message):
        LostAttnHFLM(pretrained=str(tiny_model(variant)), **{**_CPU, **args})


def test_plain_lists_in_model_args_are_bracketed_as_lm_eval_splits_them() -> None:
    from lm_eval._cli.utils import split_top_level

    argv = ["--model", "x", "--model_args", "pretrained=p,attn_layers=1,2,attn=uniform", "dtype=float32", "--tasks"]
    assert bracket_model_args(argv, split_top_level) == [
        "--model", "x", "--model_args", "pretrained=p,attn_layers=[1,2],attn=uniform", "dtype=float32", "--tasks",
    ]  # fmt: skip
    assert bracket_model_args(["-a=attn_heads=0,3", "--limit", "2"], split_top_level) == [
        "-a=attn_heads=[0,3]", "--limit", "2",
    ]  # fmt: skip
    assert (
        bracket_model_args(["--model_args", '{"attn_layers": [1, 2]}'], split_top_level)[1] == '{"attn_layers": [1, 2]}'
    )
    for twice in (  # lm-eval merges every --model_args value, the last one winning
        ["--model_args", "attn=gaussian,attn=uniform"],
        ["--model_args", "attn=gaussian", "attn=uniform"],
        ["--model_args", "attn=gaussian", "--model_args=attn=uniform"],
        ["-a", '{"attn": "gaussian"}', "-a", "attn=uniform"],
    ):
        with pytest.raises(SpecError, match="attn given more than once in model_args"):
            bracket_model_args(twice, split_top_level)
    assert bracket_model_args(["-a", "dtype=float32", "-a", "dtype=float16"], split_top_level)[-1] == "dtype=float16"
    with pytest.raises(SpecError, match=r"""'\[\{"attn": 1\}\]' in model_args has no '='"""):  # lm-eval refuses it too
        bracket_model_args(["-a", '[{"attn": 1}]'], split_top_level)
    # argparse takes abbreviations of --model_args, and the attached short form
    assert bracket_model_args(["--model_arg", "attn_layers=0,1"], split_top_level)[1] == "attn_layers=[0,1]"
    assert bracket_model_args(["--model_", "attn_layers=0,1"], split_top_level)[1] == "attn_layers=[0,1]"
    assert bracket_model_args(["-aattn_layers=0,1", "--model", "x"], split_top_level) == [
        "-aattn_layers=[0,1]", "--model", "x",
    ]  # fmt: skip
    with pytest.raises(SpecError, match="attn_layers given more than once"):
        bracket_model_args(["--model_args", "attn_layers=0", "--model_a=attn_layers=3"], split_top_level)
    for mixed in (['{"pretrained": "p"}', "attn=knockout"], ["attn=knockout", '{"pretrained": "p"}']):
        with pytest.raises(SpecError, match="JSON --model_args value was given with other values"):
            bracket_model_args(["--model_args", *mixed], split_top_level)


# -- lostattn-lm-eval end to end -----------------------------------------------------------------------------------

TASKS = ("lostattn_shapes_text_mc", "lostattn_shapes_text_gen", "lostattn_shapes_text_rolling")
TABLE_ROWS = ("lostattn_rid_attn", "lostattn_rid_ffn", "lostattn_mixig_attn", "lostattn_mixig_ffn")
LIMIT = 5  # odd: two ranks get 3 and 2 documents, and lm-eval pads the shorter one
README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _lm_eval_argv(
    model_args: str, output: pathlib.Path, batch_size: int, model: str = "lostattn-hf", tasks: tuple[str, ...] = TASKS,
    limit: int = LIMIT, *extra: str,
) -> list[str]:
    """A ``lostattn-lm-eval`` command line on the shipped tasks, on the CPU, with ``--log_samples``."""
    return [
        *("lostattn-lm-eval", "--model", model, "--model_args", model_args, "--tasks", *tasks),
        *("--include_path", str(tasks_path(host="lm_eval")), "--limit", str(limit), "--batch_size", str(batch_size)),
        *("--device", "cpu", "--output_path", str(output), "--log_samples", *extra),
    ]  # fmt: skip


def _run_lm_eval(
    runs: list[list[str]], cwd: pathlib.Path, processes: int = 1, failing: tuple[str, ...] = ()
) -> str:
    """Run ``lostattn-lm-eval`` command lines through :func:`run_cli_batch` (with ``processes=1``, one after another)
    and return their log; assert that each succeeded, except those whose output folder is named in ``failing``, which
    must have failed."""
    log = run_cli_batch(runs, cwd, host="lm_eval", processes=processes)
    for argv in runs:
        output = pathlib.Path(argv[argv.index("--output_path") + 1])
        assert bool(run_error(output)) == (output.name in failing), run_error(output) or f"{output.name} succeeded"
    return log


def _outputs(output: pathlib.Path, tasks: tuple[str, ...] = TASKS) -> tuple[dict, dict[str, list[dict]]]:
    (results,) = output.rglob("results_*.json")
    samples = {
        task: sorted(
            (json.loads(line) for path in output.rglob(f"samples_{task}_*.jsonl") for line in path.open()),
            key=lambda sample: sample["doc_id"],
        )
        for task in tasks
    }
    return json.loads(results.read_text()), samples


@pytest.fixture(scope="module")
def cli_runs(
    tiny_model: Callable[[str], pathlib.Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, int], pathlib.Path]:
    """Every mode at batch size 4, and uniform also at batch size 1 (two processes, half of the runs each)."""
    path = tiny_model("llama")
    root = tmp_path_factory.mktemp("lm_eval_cli")
    outputs = {(mode, 4): root / f"{mode}-4" for mode in MODES} | {("uniform", 1): root / "uniform-1"}
    argvs = []
    for (mode, batch_size), output in outputs.items():
        extra = "".join(f",{key}={value}" for key, value in _extra(mode).items())
        model_args = f"pretrained={path},dtype=float32,attn={mode}{extra},stats=paper"
        argvs.append(_lm_eval_argv(model_args, output, batch_size))
    _run_lm_eval(argvs, root, processes=2)
    return outputs


@pytest.mark.cli
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_runs_through_lostattn_lm_eval_with_statistics_rows(
    cli_runs: dict[tuple[str, int], pathlib.Path], mode: str
) -> None:
    results, samples = _outputs(cli_runs[mode, 4])
    own = {"lostattn_shapes_text_mc": "acc,none", "lostattn_shapes_text_gen": "exact_match,none"}
    own["lostattn_shapes_text_rolling"] = "word_perplexity,none"
    for task in TASKS:
        metrics = results["results"][task]
        assert own[task] in metrics
        assert metrics["lostattn_samples,none"] == LIMIT
        for row in TABLE_ROWS:
            assert torch.isfinite(torch.tensor(metrics[f"{row},none"])), (task, row)
            assert isinstance(metrics[f"{row}_stderr,none"], float)
            per_sample = [sample[row] for sample in samples[task]]
            assert len(per_sample) == LIMIT and metrics[f"{row},none"] == pytest.approx(sum(per_sample) / LIMIT)
    assert results["lostattn"]["intervention"]["mode"] == mode
    assert results["lostattn"]["versions"]["lm_eval"] == "0.4.13"
    assert set(results["lostattn"]["tasks"]) == set(TASKS)


@pytest.mark.cli
def test_cli_per_sample_results_equal_across_batch_sizes(cli_runs: dict[tuple[str, int], pathlib.Path]) -> None:
    (_, one), (_, four) = _outputs(cli_runs["uniform", 1]), _outputs(cli_runs["uniform", 4])
    for task in TASKS:
        for a, b in zip(one[task], four[task], strict=True):
            assert a["doc_id"] == b["doc_id"]
            if task.endswith("gen"):
                assert a["resps"] == b["resps"]
            for row in TABLE_ROWS:
                assert b[row] == pytest.approx(a[row], abs=1e-5), (task, a["doc_id"], row)
            if task.endswith("mc"):
                assert [float(r[0][0]) for r in b["resps"]] == pytest.approx([float(r[0][0]) for r in a["resps"]])


@pytest.mark.cli
def test_two_ranks_aggregate_like_one(
    tiny_model: Callable[[str], pathlib.Path], cli_runs: dict[tuple[str, int], pathlib.Path], tmp_path: pathlib.Path
) -> None:
    """Two CPU ranks (gloo) at batch size 2 give the statistics rows and per-sample values of one rank at batch 1."""
    args = f"pretrained={tiny_model('llama')},dtype=float32,attn=uniform,attn_keys=all,stats=paper"
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29535"),
        str(pathlib.Path(sys.executable).parent / "lostattn-lm-eval"),  # the installed command
        *_lm_eval_argv(args, tmp_path, 2)[1:],
    ]
    # CPU ranks presented as the GPU ranks lm_eval expects: see cpu_ranks/sitecustomize.py
    cpu_ranks = {"PYTHONPATH": str(pathlib.Path(__file__).parent / "cpu_ranks"), "CPU_RANKS_HOST": "lm_eval"}
    done = subprocess.run(
        command, env={**os.environ, **OFFLINE, **cpu_ranks}, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "on rank 1" in done.stderr  # lm-eval split the documents
    (two, two_samples), (one, one_samples) = _outputs(tmp_path), _outputs(cli_runs["uniform", 1])
    for task in TASKS:
        assert two["results"][task]["lostattn_samples,none"] == LIMIT
        for row in TABLE_ROWS:
            for key in (f"{row},none", f"{row}_stderr,none"):
                expected = one["results"][task][key]
                assert two["results"][task][key] == pytest.approx(expected, rel=1e-4, abs=1e-7), (task, key)
            assert [s[row] for s in two_samples[task]] == pytest.approx([s[row] for s in one_samples[task]], abs=1e-6)
        assert two["lostattn"]["tasks"][task]["samples"] == LIMIT


@pytest.mark.cli
def test_report_compare_and_check_read_lm_eval_output_folders(
    cli_runs: dict[tuple[str, int], pathlib.Path], tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``lostattn report / compare / check`` on lm-eval's ``--output_path`` folders: the module table holds the
    results JSON's rows, the per-layer plots come from its ``lostattn`` block, the leaderboard and the gate pair the
    samples logs of the same documents."""
    folders = {mode: cli_runs[mode, 4] for mode in ("none", "noise_delta", "knockout")}
    main(["report", *map(str, folders.values()), "-o", str(tmp_path / "report")])
    with (tmp_path / "report" / "modules.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["row"], row["run"]) for row in rows] == [("attention", "none-4"), ("FFN", "none-4"),
                                                          ("Noise Δ", "noise_delta-4")]
    for row, (mode, module) in zip(rows, [("none", "attn"), ("none", "ffn"), ("noise_delta", "attn")], strict=True):
        results, _ = _outputs(folders[mode])
        for task in TASKS:
            assert float(row[f"{task} RID"]) == results["results"][task][f"lostattn_rid_{module},none"]
    assert {f"layers_{task}.png" for task in TASKS} <= {path.name for path in (tmp_path / "report").iterdir()}
    main(["compare", str(folders["none"]), str(folders["knockout"]), "-o", str(tmp_path / "compare")])
    with (tmp_path / "compare" / "leaderboard.csv").open() as handle:
        board = {row["run"]: row for row in csv.DictReader(handle)}
    assert "lostattn_shapes_text_mc/acc" in board["knockout-4"] and "†" not in board["knockout-4"].values()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["check", str(folders["knockout"]), "--baseline", str(folders["none"]), "--max-drop", "1"])
    assert exit_.value.code == 0
    (gated,) = [line for line in capsys.readouterr().out.splitlines() if "lostattn_shapes_text_mc/acc" in line]
    assert gated.startswith("ok") and "McNemar p=" in gated


GROUP = "lostattn_shapes_text"  # the shipped group of TASKS
CACHED = 3  # documents per task the first --use_cache run answers


@pytest.mark.cli
def test_use_cache_answers_are_counted_and_the_group_pools_its_tasks(
    tiny_model: Callable[[str], pathlib.Path], cli_runs: dict[tuple[str, int], pathlib.Path], tmp_path: pathlib.Path
) -> None:
    """A run on the shipped group whose first documents lm-eval answers from ``--use_cache`` (a first run on them):
    those count 0 in ``lostattn_samples`` and have no values, the others have the values of a run without the cache,
    the group's rows pool the documents of its three tasks, and a run under another intervention is refused that
    cache."""
    args = f"pretrained={tiny_model('llama')},dtype=float32,attn=none,stats=paper"
    uniform = args.replace("attn=none", "attn=uniform,attn_keys=all")
    cache = ("--use_cache", str(tmp_path / "cache"))
    log = _run_lm_eval(
        [
            _lm_eval_argv(args, tmp_path / "first", 4, "lostattn-hf", TASKS, CACHED, *cache),
            _lm_eval_argv(uniform, tmp_path / "refused", 4, "lostattn-hf", (GROUP,), LIMIT, *cache),
            _lm_eval_argv(args, tmp_path / "second", 4, "lostattn-hf", (GROUP,), LIMIT, *cache),
        ],
        tmp_path,
        failing=("refused",),
    )
    assert "SystemExit: 2" in run_error(tmp_path / "refused") and "holds responses computed under the" in log
    assert (f"{CACHED} of {LIMIT} documents of lostattn_shapes_text_mc have no statistics (answered from "
            "--use_cache") in log
    (results, samples), (uncached, uncached_samples) = _outputs(tmp_path / "second"), _outputs(cli_runs["none", 4])
    pooled: dict[str, list[float]] = {row: [] for row in TABLE_ROWS}
    for task in TASKS:
        assert results["results"][task]["lostattn_samples,none"] == LIMIT - CACHED
        for sample, reference in zip(samples[task], uncached_samples[task], strict=True):
            if sample["doc_id"] < CACHED:
                assert sample["lostattn_samples"] == 0 and TABLE_ROWS[0] not in sample
                continue
            for row in TABLE_ROWS:
                assert sample[row] == pytest.approx(reference[row], abs=1e-5)
                pooled[row].append(sample[row])
    mc = "lostattn_shapes_text_mc"
    assert results["results"][mc]["acc,none"] == uncached["results"][mc]["acc,none"]
    group = results["results"][GROUP]
    assert group["lostattn_samples,none"] == len(TASKS) * (LIMIT - CACHED)
    for row in TABLE_ROWS:
        assert group[f"{row},none"] == pytest.approx(sum(pooled[row]) / len(pooled[row]))


def test_a_response_cache_of_another_intervention_is_refused(tmp_path: pathlib.Path) -> None:
    """``check_response_cache`` on lm-eval's own ``CachingLM``: a new cache takes the run's mark and keeps it when
    reopened; an unmarked cache with responses (plain ``hf``) serves ``attn=none`` only; another mark is refused."""
    from lm_eval.api.model import CachingLM

    from lmms_lostattn.config.spec import StatsConfig
    from lmms_lostattn.model_wrappers.common.plugin import RunRecords
    from lmms_lostattn.model_wrappers.lm_eval.reporting import _evaluate, check_response_cache

    def cache(name: str) -> CachingLM:
        return CachingLM(_Scorer(), str(tmp_path / name))  # type: ignore[arg-type]

    def run(**args: str) -> RunRecords:
        intervention = InterventionSpec.from_model_args(args).resolve(4, 4)
        return RunRecords("m", "lm_eval", intervention, StatsConfig(kind="paper"))

    uniform, knockout = {"attn": "uniform", "attn_keys": "all"}, {"attn": "knockout", "attn_keys": "all"}
    check_response_cache(cache("new.db"), run(**uniform))
    check_response_cache(cache("new.db"), run(**uniform))
    for other in ({"attn": "none"}, knockout, {**uniform, "attn_layers": "1"}):
        with pytest.raises(SpecError, match=r"new\.db holds responses computed under the intervention"):
            check_response_cache(cache("new.db"), run(**other))
    plain = cache("plain.db")
    plain.dbdict["0" * 64] = (-1.5, True)  # a response plain hf cached
    with pytest.raises(SpecError, match=r"1 responses written without lostattn .*attn=knockout"):
        check_response_cache(plain, run(**knockout))
    check_response_cache(plain, run(attn="none"))
    with pytest.raises(SpecError, match="computed under the intervention"):
        check_response_cache(cache("plain.db"), run(**uniform))
    # a model without lostattn (plain hf, under lostattn-lm-eval) reuses the unedited model's cache, not an edited one
    def evaluate(lm: object, samples: object = None) -> dict:  # lm-eval's evaluate, as the launcher wraps it
        return {}

    assert _evaluate(evaluate, cache("plain.db")) == {}
    with pytest.raises(SpecError, match=r"new\.db holds responses computed under .* this model runs without lostattn"):
        _evaluate(evaluate, cache("new.db"))


def test_every_text_family_has_a_tiny_builder_and_a_readme_entry() -> None:
    from lmms_lostattn.families import text_adapters

    model_types = {model_type for adapter in text_adapters() for model_type in adapter.model_types}
    assert model_types == set(TEXT_VARIANTS)
    section = README.read_text().split("## With lm-evaluation-harness", 1)[1].split("\n## ", 1)[0]
    assert all(f"`{model_type}`" in section for model_type in model_types)


def _record(rid_attn: list[float]) -> dict:
    series = {"rid": rid_attn, "mixig": [0.5] * len(rid_attn)}
    return {"layers": len(rid_attn), "values": {"attn": {"all": series}, "ffn": {"all": dict(series)}}}


def test_groups_pool_their_tasks_documents_and_uncovered_documents_are_counted() -> None:
    """A group's rows are the mean over the documents of all its tasks (not the mean of task means); a document
    without statistics (answered from ``--use_cache``) is not in the rows and counts 0 in ``lostattn_samples``."""
    from lmms_lostattn.config.spec import Intervention, StatsConfig
    from lmms_lostattn.model_wrappers.common.plugin import RunRecords
    from lmms_lostattn.model_wrappers.lm_eval.reporting import add_statistics

    run = RunRecords("m", "lm_eval", Intervention("none"), StatsConfig(kind="paper"))
    run.records[("t1", 0)] = [_record([0.2, 0.4])]  # layer mean 0.3
    run.records[("t1", 1)] = [_record([0.6, 0.8]), _record([0.6, 0.8])]  # two rows of one document: 0.7
    run.records[("t2", 0)] = [_record([0.1, 0.3])]  # 0.2
    results = {
        "results": {"g": {}, "t1": {"acc,none": 1.0}, "t2": {}},
        "groups": {"g": {}},
        "group_subtasks": {"g": ["t1", "t2"]},
        "samples": {"t1": [{"doc_id": 0}, {"doc_id": 1}, {"doc_id": 2}], "t2": [{"doc_id": 0}]},
    }
    add_statistics(results, run)
    t1, group = results["results"]["t1"], results["results"]["g"]
    assert t1["lostattn_rid_attn,none"] == pytest.approx(0.5)
    assert t1["lostattn_rid_attn_stderr,none"] == pytest.approx(0.2)  # sd(0.3, 0.7) / sqrt(2)
    assert t1["lostattn_samples,none"] == 2 and t1["acc,none"] == 1.0
    assert group["lostattn_rid_attn,none"] == pytest.approx(0.4) and group["lostattn_samples,none"] == 3
    assert results["groups"]["g"] == group
    assert results["results"]["t2"]["lostattn_rid_attn_stderr,none"] == "N/A"  # one document
    assert [s["lostattn_samples"] for s in results["samples"]["t1"]] == [1, 1, 0]
    assert results["samples"]["t1"][1]["lostattn_rid_attn"] == pytest.approx(0.7)
    assert "lostattn_layers" not in results["samples"]["t1"][0]
    assert results["lostattn"]["tasks"]["t1"]["samples"] == 2


class _Scorer:
    """The least an lm-eval model needs under ``CachingLM``: a cache hook and the request methods."""

    world_size = 1

    def set_cache_hook(self, hook: object) -> None:
        self.hook = hook

    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        return [(-1.0, False)] * len(requests)

    loglikelihood_rolling = generate_until = loglikelihood


def _caching_run(tmp_path: pathlib.Path, mode: str):
    from lm_eval.api.model import CachingLM

    from lmms_lostattn.config.spec import Intervention, StatsConfig
    from lmms_lostattn.model_wrappers.common.plugin import RunRecords

    return CachingLM(_Scorer(), str(tmp_path / "cache.db")), RunRecords("m", "lm_eval", Intervention(mode),
                                                                         StatsConfig(kind="paper"))


@pytest.mark.parametrize("mode", ["gaussian", "shuffle", "noise_delta"])
def test_use_cache_is_refused_where_draws_are_keyed_by_the_document(tmp_path: pathlib.Path, mode: str) -> None:
    """lm-eval keys a cached response by the request alone: two documents sending one request would share it."""
    from lmms_lostattn.config.spec import SpecError
    from lmms_lostattn.model_wrappers.lm_eval.reporting import check_response_cache

    caching, run = _caching_run(tmp_path, mode)
    with pytest.raises(SpecError, match=rf"--use_cache with attn={mode}.*keyed by the document"):
        check_response_cache(caching, run)
    caching, run = _caching_run(tmp_path / "fixed", "uniform")
    check_response_cache(caching, run)  # a pattern that is the same for every document may reuse responses


def test_a_document_answered_from_the_cache_in_part_gets_no_statistics(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupted run resumed with ``--use_cache``: one of document 0's two options was cached, so the rows the
    model ran cover half of it; document 1 ran whole and keeps its statistics."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import hash_args

    from lmms_lostattn.model_wrappers.lm_eval import reporting

    caching, run = _caching_run(tmp_path, "none")
    requests = [Instance("loglikelihood", {}, (f"context {doc_id}", f" option {index}"), index, ("t", doc_id, 1))
                for doc_id in (0, 1) for index in (0, 1)]
    caching.dbdict[hash_args("loglikelihood", requests[1].args)] = (-2.0, True)

    def evaluate(lm, samples=None):
        answers = lm.loglikelihood(requests)
        for doc_id in (0, 1):  # what the model records for the rows it runs
            run.records["t", doc_id].append(_record([0.5]))
        return {"results": {"t": {}}, "answers": answers}

    monkeypatch.setattr(reporting, "run_of", lambda model: run if isinstance(model, _Scorer) else None)
    results = reporting._evaluate(evaluate, caching)
    assert results["answers"][1] == (-2.0, True) and results["answers"][0] == (-1.0, False)
    assert set(run.records) == {("t", 1)} and results["results"]["t"]["lostattn_samples,none"] == 1
    assert "loglikelihood" not in vars(caching)  # the cache's own method again


COLOR_LIMIT = 40  # lostattn_shapes_color rows: five colours, chance 0.2


@pytest.mark.cli
def test_shapes_llava_answers_through_hf_multimodal_as_through_lmms_eval(tmp_path: pathlib.Path) -> None:
    """The shipped trained LLaVA on the shipped image task: through ``lostattn-hf-multimodal`` (chat template) it
    gives, row by row, the answers of lmms-eval's unmodified ``llava_hf``; knocking out every text token's attention
    to the image tokens in every layer drops it to chance."""
    task = ("lostattn_shapes_color",)
    reference = tmp_path / "lmms_eval"
    lmms_eval_argv = [
        *("lmms_eval", "--model", "llava_hf", "--tasks", *task, "--include_path", str(tasks_path())),
        *("--model_args", f"pretrained={SHAPES_LLAVA_DIR},device=cpu,device_map=cpu,dtype=float32"),
        *("--limit", str(COLOR_LIMIT), "--output_path", str(reference), "--log_samples"),
    ]
    modes = {"learned": "attn=none", "knockout": "attn=knockout,attn_layers=all,attn_rows=text"}
    base = f"pretrained={SHAPES_LLAVA_DIR},dtype=float32,stats=paper"
    lm_eval_argvs = [
        _lm_eval_argv(
            f"{base},{args}", tmp_path / name, 4, "lostattn-hf-multimodal", task, COLOR_LIMIT, "--apply_chat_template"
        )
        for name, args in modes.items()
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        reference_run = pool.submit(run_cli_batch, [lmms_eval_argv], tmp_path)
        _run_lm_eval(lm_eval_argvs, tmp_path)
        reference_run.result()
    assert not run_error(reference), run_error(reference)
    expected = [sample["filtered_resps"].strip().lower() for sample in samples_of(reference, task[0])]
    results = {name: _outputs(tmp_path / name, task) for name in modes}
    (learned_results, learned_samples), (knockout_results, _) = results["learned"], results["knockout"]
    assert [sample["filtered_resps"][0].strip().lower() for sample in learned_samples[task[0]]] == expected
    learned = learned_results["results"][task[0]]
    assert learned["exact_match,none"] == pytest.approx(results_of(reference)["results"][task[0]]["exact_match,none"])
    assert learned["exact_match,none"] >= 0.9
    assert knockout_results["results"][task[0]]["exact_match,none"] <= 0.2 + 0.15
    assert learned["lostattn_samples,none"] == COLOR_LIMIT


def test_documents_sharing_a_row_under_the_logits_cache_keep_their_own_draws(
    tiny_model: Callable[[str], pathlib.Path],
) -> None:
    """lm-eval's logits cache runs one row for all requests sharing ``context + continuation[:-1]``, across
    documents too. Under a random mode a document's scores are its own draws': equal alone and beside a twin with
    the same context, and for a rolling text at batch size 1 and 2; a document's own options still share one row."""
    path = str(tiny_model("llama"))
    lm = LostAttnHFLM(pretrained=path, batch_size=1, **GAUSSIAN, **_CPU)
    rows = []
    lm.model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(1), with_kwargs=True)

    def options(doc_id: int) -> list[Instance]:
        return [
            Instance("loglikelihood", {}, ("The car is", option), index, ("toy", doc_id, 1))
            for index, option in enumerate([" red", " blue"])
        ]

    alone = [value for value, _ in lm.loglikelihood(options(1))]
    rows.clear()
    together = [value for value, _ in lm.loglikelihood(options(0) + options(1))]
    assert together[2:] == pytest.approx(alone, abs=1e-6)
    assert abs(together[0] - together[2]) > 1e-4, "the two documents' draws should differ"
    assert len(rows) == 2  # one row per document, shared by its options

    text = "The car is red and the sky is blue. " * 3
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0, ("toy", doc_id, 1)) for doc_id in range(2)]
    scores = {}
    for batch_size in (1, 2):
        lm = LostAttnHFLM(pretrained=path, batch_size=batch_size, max_length=16, **GAUSSIAN, **_CPU)
        scores[batch_size] = lm.loglikelihood_rolling(rolling)
    assert scores[2] == pytest.approx(scores[1], abs=1e-5)
    assert abs(scores[1][0] - scores[1][1]) > 1e-4


def test_hf_multimodal_scores_text_rolling_requests_like_lm_eval(tiny_model: Callable[[str], pathlib.Path]) -> None:
    """``hf-multimodal`` hands text ``loglikelihood_rolling`` to ``hf``; its signature (no ``disable_tqdm``) passes
    through the plugin's override."""
    path = str(tiny_model("llava"))
    requests = [Instance("loglikelihood_rolling", {}, ("The car is red and the sky is blue.",), 0, ("t", 0, 1))]
    expected = HFMultimodalLM(pretrained=path, batch_size=1, **_CPU).loglikelihood_rolling(requests)
    ours = LostAttnHFMultimodalLM(pretrained=path, batch_size=1, stats="paper", **_CPU)
    assert ours.loglikelihood_rolling(requests) == pytest.approx(expected, abs=1e-5)


def test_a_model_evaluated_twice_reports_each_evaluations_documents_only(
    tiny_model: Callable[[str], pathlib.Path],
) -> None:
    """lm-eval's Python API takes a model object, which may serve several ``simple_evaluate`` calls: the second
    call's statistics rows are those of a fresh model on its documents, not pooled with the first call's."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_path(host="lm_eval")), include_defaults=False)
    task, arguments = "lostattn_shapes_text_gen", {"pretrained": str(tiny_model("llama")), "stats": "paper", **_CPU}

    def rows(model: LostAttnHFLM, limit: int) -> dict[str, Any]:
        results = simple_evaluate(model=model, tasks=[task], limit=limit, task_manager=manager)["results"][task]
        return {name: value for name, value in results.items() if name.startswith("lostattn")}

    reused = LostAttnHFLM(**arguments)
    rows(reused, 4)
    second = rows(reused, 2)
    assert second[f"lostattn_samples,{FILTER}"] == 2
    assert second == pytest.approx(rows(LostAttnHFLM(**arguments), 2))


def test_documents_selected_with_samples_get_their_own_draws_and_statistics(
    tiny_model: Callable[[str], pathlib.Path],
) -> None:
    """``--samples`` (``samples=`` of the Python API) runs chosen documents, whose requests count positions in the
    choice: each chosen document's draws, loglikelihoods and statistics are those it gets in a run of every
    document, under its own id."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_path(host="lm_eval")), include_defaults=False)
    task, chosen = "lostattn_shapes_text_mc", [2, 7, 11]
    model = LostAttnHFLM(pretrained=str(tiny_model("llama")), attn="gaussian", attn_keys="all", stats="paper",
                         batch_size=4, **_CPU)

    def samples(**selection: Any) -> dict[int, dict[str, Any]]:
        logged = simple_evaluate(model=model, tasks=[task], task_manager=manager, log_samples=True, **selection)
        return {sample["doc_id"]: sample for sample in logged["samples"][task]}

    for unordered in ([11, 2, 7], [2, 2, 7]):  # lm-eval would run them in document order, named by list place
        with pytest.raises(SpecError, match=r"give them in increasing order without repeats \(\[2, 7(, 11)?\]\)"):
            samples(samples={task: unordered})
    some, every = samples(samples={task: chosen}), samples(limit=12)
    assert sorted(some) == chosen
    for doc in chosen:
        assert some[doc]["lostattn_samples"] == 1
        assert some[doc]["lostattn_rid_attn"] == pytest.approx(every[doc]["lostattn_rid_attn"], abs=1e-6)
        ours = [float(resp[0][0]) for resp in some[doc]["resps"]]
        assert ours == pytest.approx([float(resp[0][0]) for resp in every[doc]["resps"]], abs=1e-5)


def test_a_loaded_model_and_a_checkpoint_in_a_subfolder_are_taken_as_hf_takes_them(
    tiny_model: Callable[[str], pathlib.Path], tmp_path: pathlib.Path
) -> None:
    """``hf`` takes ``pretrained=`` as a loaded model (with ``tokenizer=``) and a checkpoint in a ``subfolder=`` of
    the repository; the plugin resolves its arguments against that model's config (layer 3 exists, layer 4 not)."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model("llama")
    edit = {"attn": "uniform", "attn_keys": "all", "attn_layers": "3", **_CPU}
    model = AutoModelForCausalLM.from_pretrained(path)
    loaded = LostAttnHFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(path), batch_size=1, **edit)
    assert loaded.lostattn.run.model == str(path)
    shutil.copytree(path, tmp_path / "sub")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))  # another model's config
    in_subfolder = LostAttnHFLM(pretrained=str(tmp_path), subfolder="sub", batch_size=1, **edit)
    assert in_subfolder.lostattn.intervention.layers == loaded.lostattn.intervention.layers == (3,)
    with pytest.raises(SpecError, match="this model has layers 0-3"):
        LostAttnHFLM(pretrained=str(tmp_path), subfolder="sub", batch_size=1, **{**edit, "attn_layers": "4"})
