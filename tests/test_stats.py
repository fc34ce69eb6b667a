"""Residual recording and per-sample statistics on a live tiny LLaVA, and their aggregation."""

from __future__ import annotations

import math
import pathlib

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from lmms_lostattn.config.spec import InterventionSpec, StatsConfig
from lmms_lostattn.families import adapter_for
from lmms_lostattn.intervention.prompt import NO_END, PromptState
from lmms_lostattn.intervention.scope import intervene
from lmms_lostattn.statistics import collector as stats_module
from lmms_lostattn.statistics.collector import StatsCollector, aggregate, layer_mean, mean_records
from lmms_lostattn.statistics.metrics import decompose, mixig, module_stats, rid

QUESTIONS = ["Is there a red circle?", "What colour is the big square in the picture on the left?"]


@pytest.fixture(scope="module")
def model(tiny_llava: pathlib.Path):
    return AutoModelForImageTextToText.from_pretrained(tiny_llava, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def batch(tiny_llava: pathlib.Path) -> dict[str, torch.Tensor]:
    processor = AutoProcessor.from_pretrained(tiny_llava)
    processor.tokenizer.padding_side = "left"
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in QUESTIONS
    ]
    images = [Image.new("RGB", (32, 32), (200, 40, 40)), Image.new("RGB", (40, 30), (20, 90, 200))]
    return processor(images=images, text=prompts, padding=True, return_tensors="pt")


def resolve(model, **args: object):
    text = model.config.get_text_config()
    return InterventionSpec.from_model_args(args).resolve(text.num_hidden_layers, text.num_attention_heads)


def record(model, inputs, *, generate: bool = False, use_cache: bool = True, **args: object) -> list[tuple]:
    calls: list[tuple] = []

    def keep(layer: int, x: torch.Tensor, d_attn: torch.Tensor, d_ffn: torch.Tensor, state) -> None:
        calls.append((layer, x.clone(), d_attn.clone(), d_ffn.clone(), state.first_real.clone()))

    with torch.no_grad(), intervene(model, resolve(model, **args), adapter_for(model.config), on_layer=keep):
        if generate:
            model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=use_cache, pad_token_id=3)
        else:
            model(**inputs)
    return calls


def test_recorded_stream_is_what_the_model_computes(model, batch) -> None:
    calls = record(model, batch)
    layers = adapter_for(model.config).decoder_layers(model)
    outputs: list[torch.Tensor] = []
    handle = layers[-1].register_forward_hook(
        lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            hidden = model(**batch, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    assert [c[0] for c in calls] == list(range(len(layers)))
    for layer, x, d_attn, d_ffn, _ in calls:
        torch.testing.assert_close(x, hidden[layer], rtol=0, atol=0)  # hidden_states[l] is the input of layer l
        after = hidden[layer + 1] if layer + 1 < len(layers) else outputs[0]  # the last entry is after the norm
        torch.testing.assert_close(x + d_attn + d_ffn, after, rtol=0, atol=1e-6)


@pytest.mark.parametrize("use_cache", [True, False])
def test_only_the_prefill_pass_is_recorded(model, batch, use_cache: bool) -> None:
    calls = record(model, batch, generate=True, use_cache=use_cache)
    prompt_len = batch["input_ids"].shape[1]
    assert [c[0] for c in calls] == list(range(4)) and all(c[1].shape[1] == prompt_len for c in calls)


def test_noise_delta_is_measured_by_the_same_recorder(model, batch) -> None:
    vanilla = record(model, batch)
    noisy = record(model, batch, attn="noise_delta", attn_layers="1")
    assert torch.equal(noisy[0][2], vanilla[0][2])
    real = batch["attention_mask"].bool()
    assert not torch.allclose(noisy[1][2][real], vanilla[1][2][real])
    torch.testing.assert_close(noisy[1][2].pow(2).mean(-1).sqrt()[real], vanilla[1][2].pow(2).mean(-1).sqrt()[real])


@pytest.mark.parametrize(("kind", "max_tokens"), [("paper", 1024), ("all", 1024), ("paper", 4)])
def test_collector_measures_each_sample_on_its_own_tokens(model, batch, kind: str, max_tokens: int) -> None:
    """Every layer, module and token group against :func:`module_stats` on the sample's own rows (4 tokens: the
    cap picks the rows, below every group's count)."""
    config = StatsConfig(kind=kind, groups=("all", "image", "text"), max_tokens=max_tokens)
    collector = StatsCollector(config, num_layers=4)
    with torch.no_grad(), intervene(model, resolve(model), adapter_for(model.config), on_layer=collector):
        model(**batch)
    records = collector.take()
    assert len(records) == 2 and collector.take() == []
    calls = record(model, batch)
    image = batch["input_ids"] == model.config.image_token_id
    for sample, rec in enumerate(records):
        first = int(calls[0][4][sample])
        rows = {"all": torch.arange(first, image.shape[1])}
        rows["image"] = rows["all"][image[sample, first:]]
        rows["text"] = rows["all"][~image[sample, first:]]
        for layer, x, d_attn, d_ffn, _ in calls:
            for module, (before, update) in {"attn": (x, d_attn), "ffn": (x + d_attn, d_ffn)}.items():
                for group, index in rows.items():
                    expected = module_stats(before[sample, index], update[sample, index], kind=kind,
                                            max_tokens=max_tokens)
                    got = {m: rec["values"][module][group][m][layer] for m in expected}
                    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert set(records[0]["values"]["attn"]["all"]) == (
        {"rid", "mixig"}
        if kind == "paper"
        else {"rid", "mixig", "mixig_mean", "delta_s", "delta_d", "erank_x", "erank_x_new", "tme_update"}
    )
    if kind == "all":  # and the FFN against the layer's input
        assert set(records[0]["values"]["ffn"]["all"]) - set(records[0]["values"]["attn"]["all"]) == {
            "rid_layer",
            "delta_d_layer",
        }


def test_stats_all_under_the_layer_reference_gives_the_ffn_against_its_own_input_too(model, batch) -> None:
    """``stats_reference=layer`` makes the FFN's ``rid`` the layer-referenced one; ``stats=all`` then adds the RID
    against the FFN's own input (``rid_module``), not the layer-referenced one a second time."""
    config = StatsConfig(kind="all", groups=("all",), max_tokens=1024, reference="layer")
    collector = StatsCollector(config, num_layers=4)
    with torch.no_grad(), intervene(model, resolve(model), adapter_for(model.config), on_layer=collector):
        model(**batch)
    record_ = collector.take()[0]["values"]["ffn"]["all"]
    assert {"rid_module", "delta_d_module"} <= set(record_) and "rid_layer" not in record_
    first = int(batch["attention_mask"][0].argmax())
    for layer, x, d_attn, d_ffn, _ in record(model, batch):
        x, d_attn, d_ffn = x[0, first:], d_attn[0, first:], d_ffn[0, first:]
        own = module_stats(x + d_attn, d_ffn, kind="all")
        assert record_["rid_module"][layer] == pytest.approx(own["rid"], rel=1e-5, abs=1e-6)
        assert record_["delta_d_module"][layer] == pytest.approx(own["delta_d"], rel=1e-5, abs=1e-6)
        against_layer = rid(x, x + d_attn + d_ffn)
        assert record_["rid"][layer] == pytest.approx(against_layer, rel=1e-5, abs=1e-6)


def test_a_prefill_that_stopped_partway_gives_no_statistics(model, batch) -> None:
    """An error inside the model that its host wrapper catches (lmms-eval's answer "") leaves the first layers
    measured: they are not the samples' statistics."""
    config = StatsConfig(kind="paper", groups=("all",), max_tokens=1024)
    collector = StatsCollector(config, num_layers=4)
    layers = adapter_for(model.config).decoder_layers(model)

    def out_of_memory(*_: object) -> None:
        raise RuntimeError("out of memory (simulated)")

    hook = layers[2].register_forward_pre_hook(out_of_memory)
    with torch.no_grad(), intervene(model, resolve(model), adapter_for(model.config), on_layer=collector):
        with pytest.raises(RuntimeError, match="simulated"):
            model(**batch)
        hook.remove()
        assert collector.take() == []
        model(**batch)
    records = collector.take()
    assert len(records) == 2 and all(None not in record["values"]["attn"]["all"]["rid"] for record in records)


def test_released_measures_the_ffn_against_the_layer_input(model, batch) -> None:
    """``stats=released``: the FFN's RID (ΔD as l2) is that of the layer's input X -> the stream after the FFN;
    the attention's RID uses l2 too; MixIG stays each module's own; checked against the single functions."""
    config = StatsConfig(kind="released", reference="layer", combine="l2")
    collector = StatsCollector(config, num_layers=4)
    with torch.no_grad(), intervene(model, resolve(model), adapter_for(model.config), on_layer=collector):
        model(**batch)
    records = collector.take()
    for sample, rec in enumerate(records):
        for layer, x, d_attn, d_ffn, first_real in record(model, batch):
            rows = torch.arange(int(first_real[sample]), x.shape[1])
            x_in, mid = x[sample, rows], (x + d_attn)[sample, rows]
            out = mid + d_ffn[sample, rows]
            values = rec["values"]
            assert values["attn"]["all"]["rid"][layer] == pytest.approx(rid(x_in, mid, combine="l2"), rel=1e-5)
            assert values["ffn"]["all"]["rid"][layer] == pytest.approx(rid(x_in, out, combine="l2"), rel=1e-5)
            assert values["ffn"]["all"]["mixig"][layer] == pytest.approx(mixig(mid, out), rel=1e-5, abs=1e-7)


def test_batch_of_two_measures_like_two_batches_of_one(model, batch) -> None:
    config = StatsConfig(kind="paper")
    together = StatsCollector(config, 4)
    with torch.no_grad(), intervene(model, resolve(model), adapter_for(model.config), on_layer=together):
        model(**batch)
    first_real = batch["attention_mask"].long().argmax(1)
    for sample, rec in enumerate(together.take()):
        alone = StatsCollector(config, 4)
        single = {
            k: v[sample : sample + 1, int(first_real[sample]) :] if k != "pixel_values" else v[sample : sample + 1]
            for k, v in batch.items()
        }
        with torch.no_grad(), intervene(model, resolve(model), adapter_for(model.config), on_layer=alone):
            model(**single)
        expected = alone.take()[0]["values"]["ffn"]["all"]["rid"]
        assert rec["values"]["ffn"]["all"]["rid"] == pytest.approx(expected, rel=1e-4)


def _record(values: dict[str, list[float | None]], module: str = "attn") -> dict:
    other = "ffn" if module == "attn" else "attn"
    return {"layers": 2, "values": {module: {"all": values}, other: {"all": {}}}}


def test_aggregate_closed_forms() -> None:
    records = [_record({"rid": [0.1, 0.3]}), _record({"rid": [0.3, 0.5]}), _record({"rid": [0.2, None]})]
    out = aggregate(records)["attn"]["all"]["rid"]
    assert out["layers"]["mean"] == pytest.approx([0.2, 0.4])
    assert out["layers"]["n"] == [3, 2]
    assert out["layers"]["stderr"][0] == pytest.approx(math.sqrt(0.01 / 3))  # sample var of .1,.3,.2 is .01
    assert out["layers"]["stderr"][1] == pytest.approx(math.sqrt(0.02 / 2))
    assert out["overall"]["mean"] == pytest.approx((0.2 + 0.4 + 0.2) / 3)  # layer means: .2, .4, .2
    assert out["overall"]["n"] == 3
    assert aggregate([_record({"rid": [0.7, 0.1]})])["attn"]["all"]["rid"]["overall"]["stderr"] is None


def test_layer_mean_and_mean_records() -> None:
    a, b = _record({"rid": [0.2, None]}), _record({"rid": [0.4, 0.6]})
    assert layer_mean(a, "attn", "all", "rid") == pytest.approx(0.2)
    assert layer_mean(a, "attn", "image", "rid") is None
    assert mean_records([a, b])["values"]["attn"]["all"]["rid"] == pytest.approx([0.3, 0.6])


@pytest.mark.parametrize("unmeasured_first", [True, False])
def test_mean_records_skips_a_request_that_measured_nothing(unmeasured_first: bool) -> None:
    """A multiple-choice option whose row has one real token (an empty context and a one-token continuation) has no
    value in any group; the document's values are the other options'."""
    measured, unmeasured = _record({"rid": [0.4, 0.6], "mixig": [0.1, None]}), _record({})
    records = [unmeasured, measured] if unmeasured_first else [measured, unmeasured]
    merged = mean_records(records)["values"]["attn"]["all"]
    assert merged == {"rid": pytest.approx([0.4, 0.6]), "mixig": [pytest.approx(0.1), None]}
    assert mean_records([unmeasured, unmeasured])["values"]["attn"]["all"] == {}


def _text_prompt(first_real: int) -> PromptState:
    """One left-padded prompt of 9 tokens, no image, its first ``first_real`` tokens padding."""
    return PromptState(
        prompt_ids=torch.zeros(1, 9, dtype=torch.long),
        is_visual=torch.zeros(1, 9, dtype=torch.bool),
        first_real=torch.tensor([first_real]),
        real_end=torch.tensor([NO_END]),
        sample_key=torch.zeros(1, dtype=torch.long),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chained", [True, False], ids=["chained", "deepstack_like"])
def test_collector_decomposes_each_stream_once(monkeypatch, chained: bool, dtype: torch.dtype) -> None:
    calls: list[tuple[int, ...]] = []

    def counting(x: torch.Tensor):
        calls.append(tuple(x.shape))
        return decompose(x)

    monkeypatch.setattr(stats_module, "decompose", counting)
    layers, gen = 4, torch.Generator().manual_seed(0)
    state = _text_prompt(first_real=1)
    collector = StatsCollector(StatsConfig(kind="all"), layers)
    x, expected = torch.randn(1, 9, 6, generator=gen).to(dtype), []
    for layer in range(layers):
        d_attn, d_ffn = ((0.5 * torch.randn(1, 9, 6, generator=gen)).to(dtype) for _ in range(2))
        collector(layer, x, d_attn, d_ffn, state)
        expected.append(
            {
                "attn": module_stats(x[0, 1:], d_attn[0, 1:], kind="all"),
                "ffn": module_stats((x + d_attn)[0, 1:], d_ffn[0, 1:], kind="all"),
            }
        )
        x = x + d_attn + d_ffn
        if not chained:
            x = x + 0.1 * torch.randn(1, 9, 6, generator=gen)  # features added between layers: no reuse
    # X, the stream after attention and the stream after the FFN once each; the latter is the next layer's X.
    assert len(calls) == (1 + 2 * layers if chained else 3 * layers)
    values = collector.take()[0]["values"]
    if dtype != torch.float32:  # the model adds in bfloat16, module_stats in float32: only the count is compared
        return
    for layer, want in enumerate(expected):
        for module, stats in want.items():
            got = {metric: values[module]["all"][metric][layer] for metric in stats}
            assert got == pytest.approx(stats, abs=1e-5)


def _tensors(value: object, seen: set[int] | None = None) -> list[torch.Tensor]:
    """Every tensor reachable from ``value`` through containers and object attributes."""
    seen = set() if seen is None else seen
    if id(value) in seen or isinstance(value, (str, int, float, bool, type(None))):
        return []
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple, set)) else (
        vars(value).values() if hasattr(value, "__dict__") else ())
    return [tensor for item in items for tensor in _tensors(item, seen)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_collector_carries_only_what_the_next_layer_reads(dtype: torch.dtype) -> None:
    """Between layers the collector keeps, per sample and group, the decomposition of the stream after the FFN (the
    next layer's X, reused only where the next layer's input is that stream): X in float32 and what its subspaces
    are built from, not the model's raw rows nor TME's normalised rows, each as large as X."""
    state = _text_prompt(first_real=0)
    gen = torch.Generator().manual_seed(0)
    x, d_attn, d_ffn = (torch.randn(1, 9, 6, generator=gen).to(dtype) for _ in range(3))
    collector = StatsCollector(StatsConfig(kind="all"), num_layers=2)
    collector(0, x, d_attn, d_ffn, state)
    shapes = [(tensor.dtype, tuple(tensor.shape)) for tensor in _tensors(collector)]
    assert shapes.count((torch.float32, (9, 6))) == 1, shapes  # X itself: no second view of the rows, no TME rows
    assert all(kind != torch.bfloat16 for kind, _ in shapes), shapes  # nor the model's own rows


def test_a_non_finite_stream_names_the_layer_and_sample_and_padding_is_ignored() -> None:
    state = PromptState(
        prompt_ids=torch.zeros(2, 9, dtype=torch.long),
        is_visual=torch.zeros(2, 9, dtype=torch.bool),
        first_real=torch.tensor([0, 3]),
        real_end=torch.tensor([6, NO_END]),  # sample 0 right-padded after 6 tokens, sample 1 left-padded
        sample_key=torch.arange(2),
    )
    gen = torch.Generator().manual_seed(0)
    x, d_attn, d_ffn = (torch.randn(2, 9, 6, generator=gen) for _ in range(3))
    d_ffn[1, :3] = float("nan")  # padding rows: never measured
    d_ffn[0, 6:] = float("nan")
    collector = StatsCollector(StatsConfig(kind="paper"), num_layers=1)
    collector(0, x, d_attn, d_ffn, state)
    records = collector.take()
    assert records[0]["values"]["ffn"]["all"]["rid"][0] == pytest.approx(
        module_stats((x + d_attn)[0, :6], d_ffn[0, :6], kind="paper")["rid"], abs=1e-6
    )
    assert math.isfinite(records[1]["values"]["ffn"]["all"]["rid"][0])
    d_ffn[1, 5, 2] = float("inf")
    message = r"after the FFN update of decoder layer 2 is not finite \(sample 1 .*in float32: its weights or inputs"
    with pytest.raises(ValueError, match=message):
        StatsCollector(StatsConfig(kind="paper"), num_layers=4)(2, x, d_attn, d_ffn, state)
    half = (t.half() for t in (x, d_attn, d_ffn))
    with pytest.raises(ValueError, match=r"in float16: float16 overflows where bfloat16 and float32 do not"):
        StatsCollector(StatsConfig(kind="paper"), num_layers=4)(2, *half, state)


def test_recorded_input_is_on_the_device_of_its_layers_updates() -> None:
    """With ``device_map=auto`` accelerate moves a layer's input to the layer's device inside its forward, after the
    recorder's pre-hook; the input handed on must sit with the updates (here "meta" plays the layer's device)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    from lmms_lostattn.families.base import FamilyAdapter
    from lmms_lostattn.statistics.recorder import record_residuals

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn, self.mlp = torch.nn.Identity(), torch.nn.Identity()

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            mid = hidden_states + self.self_attn(hidden_states)
            return mid + self.mlp(mid)

    layers = torch.nn.ModuleList([Layer()])
    add_hook_to_module(layers[0], AlignDevicesHook(execution_device=torch.device("meta")))
    seen: list[tuple[torch.device, ...]] = []
    adapter = FamilyAdapter(family="toy", model_types=("toy",))
    on_layer = lambda i, x, a, f: seen.append((x.device, a.device, f.device))  # noqa: E731
    with record_residuals(layers, adapter, on_layer, lambda: True):
        layers[0](torch.zeros(1, 3, 4))
    assert seen == [(torch.device("meta"),) * 3]


def test_a_document_without_values_in_the_table_group_is_not_counted_as_covered() -> None:
    """``lostattn_samples`` counts the documents the rows average: one image token (``stats_groups=image``) gives the
    document no values, so it counts 0 beside a document with three."""
    from lmms_lostattn.model_wrappers.common.results import SAMPLES_METRIC, document_metrics

    is_visual = torch.zeros(2, 9, dtype=torch.bool)
    is_visual[0, 2:5] = True
    is_visual[1, 2] = True
    state = PromptState(prompt_ids=torch.zeros(2, 9, dtype=torch.long), is_visual=is_visual,
                        first_real=torch.zeros(2, dtype=torch.long), real_end=torch.tensor([NO_END, NO_END]),
                        sample_key=torch.arange(2))
    gen = torch.Generator().manual_seed(0)
    config = StatsConfig(kind="paper", groups=("image",))
    collector = StatsCollector(config, num_layers=1)
    collector(0, *(torch.randn(2, 9, 6, generator=gen) for _ in range(3)), state)
    covered, uncovered = (document_metrics([record], config) for record in collector.take())
    assert covered[SAMPLES_METRIC] == 1 and math.isfinite(covered["lostattn_rid_attn"])
    assert uncovered[SAMPLES_METRIC] == 0 and "lostattn_rid_attn" not in uncovered
