"""A family the package does not ship (VipLLaVA), added the way the README's 'Adding a family' says, and run through
both hosts: one adapter (in the package, a file under ``lmms_lostattn/families/``, found without a list; here
registered, as a third-party package would) and one line per host (lmms-eval: a row of
``lmms_lostattn/model_wrappers/lmms_eval/wrappers.py``; lm-eval: none, ``lostattn-hf-multimodal`` takes any
family with an adapter)."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator

import pytest
import torch
from lm_eval.api.instance import Instance as LmEvalInstance
from lm_eval.models.hf_vlms import HFMultimodalLM
from lmms_eval.api.instance import Instance
from lmms_eval.models import get_model
from PIL import Image
from transformers import AutoProcessor, LlavaConfig, VipLlavaConfig, VipLlavaForConditionalGeneration

from lmms_lostattn.families import FAMILIES, FamilyAdapter, FamilyRegistry
from lmms_lostattn.model_wrappers.lm_eval.models import LostAttnHFMultimodalLM
from lmms_lostattn.model_wrappers.lmms_eval.hf import HuggingfaceImageTextToText
from lmms_lostattn.model_wrappers.lmms_eval.wrappers import GENERATE, Wrapped, wrapper_class

# The adapter file's whole content: VipLLaVA keeps its decoder, attention, MLP and image token where LLaVA does.
VIPLLAVA = FamilyAdapter(family="vipllava", model_types=("vipllava",))
# lmms-eval's one line: lmms-eval 0.7.3 has no VipLLaVA class, so the row takes the generic image-text-to-text one.
ROW = Wrapped(
    "vipllava",
    "VipLlava",
    chat=f"{HuggingfaceImageTextToText.__module__}.HuggingfaceImageTextToText",
    follows_batches=GENERATE,
)

CPU = {"device": "cpu", "device_map": "cpu"}
KNOCKOUT = {"attn": "knockout", "attn_layers": "all", "attn_rows": "text"}
IMAGES = [Image.new("RGB", (32, 32), color) for color in ("red", "blue", "green")]


@pytest.fixture(scope="module")
def vipllava(tiny_model: Callable[[str], pathlib.Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random-weight VipLLaVA on the tiny LLaVA's vision tower, decoder and processor."""
    llava = tiny_model("llava")
    config = LlavaConfig.from_pretrained(llava)
    vipllava = VipLlavaConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_index=config.image_token_index,
        vision_feature_layers=[-2, -1],
        image_seq_length=config.image_seq_length,
        pad_token_id=config.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = VipLlavaForConditionalGeneration(vipllava).eval()
    out = tmp_path_factory.mktemp("vipllava")
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(llava).save_pretrained(out)
    return str(out)


@pytest.fixture
def registered() -> Iterator[None]:
    FAMILIES.register(VIPLLAVA)
    try:
        yield
    finally:
        FAMILIES.unregister(VIPLLAVA)


def _lmms_eval_requests() -> list[Instance]:
    def messages(doc: dict) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image", "url": doc["image"]}, {"type": "text", "text": "Red?"}]}]

    gen_kwargs = {"max_new_tokens": 5, "temperature": 0, "until": ["\n\n"]}
    return [
        Instance(
            "generate_until",
            ("Red?", messages, dict(gen_kwargs), doc_id, "toy", "test"),
            0,
            {"task": "toy", "doc_id": doc_id, "repeats": 1, "split": "test"},
        )
        for doc_id in range(len(IMAGES))
    ]


def _lmms_eval_texts(model_class: type, path: str, **args: str) -> tuple[list[str], object]:
    lm = model_class(pretrained=path, batch_size=2, **CPU, **args)
    lm.model.to(torch.float32)
    lm.task_dict = {"toy": {"test": [{"image": image} for image in IMAGES]}}
    return [getattr(output, "text", output) for output in lm.generate_until(_lmms_eval_requests())], lm


def _lm_eval_requests() -> list[LmEvalInstance]:
    gen_kwargs = {"until": ["\n"], "max_gen_toks": 4, "do_sample": False}
    return [
        LmEvalInstance(
            "generate_until", {}, ("<image> Red?", dict(gen_kwargs), {"visual": [image]}), 0, ("mm", doc_id, 1)
        )
        for doc_id, image in enumerate(IMAGES)
    ]


def test_without_its_adapter_the_family_is_refused_by_name(vipllava: str) -> None:
    with pytest.raises(ValueError, match=r"model_type 'vipllava' is not supported.*Adding a family"):
        get_model("lostattn_hf")(pretrained=vipllava, **CPU, attn="gaussian")


@pytest.mark.usefixtures("registered")
def test_the_new_family_runs_through_lmms_eval(vipllava: str) -> None:
    """The row's class answers as lmms-eval's own (fixed) class with statistics attached, gives every document its
    statistics, and knocking out the image changes the answers."""
    ours = wrapper_class(ROW, "chat")
    expected, _ = _lmms_eval_texts(HuggingfaceImageTextToText, vipllava)
    texts, lm = _lmms_eval_texts(ours, vipllava, stats="paper")
    assert texts == expected and any(expected)
    assert sorted(lm.lostattn.run.records) == [("toy", doc_id) for doc_id in range(len(IMAGES))]
    assert lm.lostattn.adapter is VIPLLAVA
    knocked_out, _ = _lmms_eval_texts(ours, vipllava, **KNOCKOUT)
    assert knocked_out != expected


@pytest.mark.usefixtures("registered")
def test_the_new_family_runs_through_lm_eval(vipllava: str) -> None:
    cpu = {"device": "cpu", "dtype": "float32", "batch_size": 2}
    expected = HFMultimodalLM(pretrained=vipllava, **cpu).generate_until(_lm_eval_requests())
    ours = LostAttnHFMultimodalLM(pretrained=vipllava, stats="paper", **cpu)
    assert ours.generate_until(_lm_eval_requests()) == expected
    assert sorted(ours.lostattn.run.records) == [("mm", doc_id) for doc_id in range(len(IMAGES))]
    knocked_out = LostAttnHFMultimodalLM(pretrained=vipllava, **KNOCKOUT, **cpu).generate_until(_lm_eval_requests())
    assert knocked_out != expected


def test_an_adapter_file_is_found_without_a_list(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry finds every adapter defined in its package's files; a model type two families claim is refused."""
    package = tmp_path / "some_families"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "vipllava.py").write_text(
        "from lmms_lostattn.families.base import FamilyAdapter\n\n"
        'VIPLLAVA = FamilyAdapter(family="vipllava", model_types=("vipllava",))\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = FamilyRegistry("some_families")
    assert [adapter.family for adapter in registry.adapters()] == ["vipllava"]
    assert registry.adapter_for(VipLlavaConfig()).family == "vipllava"
    with pytest.raises(ValueError, match=r"family 'other' claims model type\(s\) vipllava of family 'vipllava'"):
        registry.register(FamilyAdapter(family="other", model_types=("vipllava",)))


def test_an_adapter_with_an_unknown_layer_style_is_refused() -> None:
    with pytest.raises(ValueError, match=r"layer_style='serial'; accepted: \('pre_norm', 'sandwich', 'parallel'\)"):
        FamilyAdapter(family="vipllava", model_types=("vipllava",), layer_style="serial")


def test_a_language_model_of_another_family_brings_its_decoder_layers() -> None:
    """A LLaVA built on Gemma 2 has sandwich-norm layers, one on Phi-3 a fused q/k/v projection: the LLaVA adapter
    takes its language model's decoder-layer description, so the updates recorded are those the layers add to the
    stream (x + dA + dF is the layer's output) and noise_qkv is refused before loading."""
    from transformers import CLIPVisionConfig, Gemma2Config, LlavaForConditionalGeneration, Phi3Config

    from lmms_lostattn.config.spec import InterventionSpec, SpecError
    from lmms_lostattn.statistics.recorder import record_residuals

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)  # fmt: skip
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 100, "pad_token_id": 0}  # fmt: skip
    gemma = LlavaConfig(vision_config=vision, text_config=Gemma2Config(**text), image_token_index=99)
    adapter = FAMILIES.adapter_for(gemma)
    assert (adapter.family, adapter.layer_style, adapter.preset(gemma)) == ("llava", "sandwich", FAMILIES.adapter_for(
        LlavaConfig()).preset(LlavaConfig()))
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(gemma).eval()
    for layer in adapter.decoder_layers(model):  # sandwich norms that are not the identity
        torch.nn.init.normal_(layer.post_attention_layernorm.weight)
        torch.nn.init.normal_(layer.post_feedforward_layernorm.weight)
    sums, outputs = [], []
    layers = adapter.decoder_layers(model)
    handles = [layer.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
               for layer in layers]  # fmt: skip
    with torch.no_grad(), record_residuals(layers, adapter, lambda i, x, a, f: sums.append(x + a + f), lambda: True):
        model(input_ids=torch.tensor([[1, 2, 3, 4, 5]]))
    for handle in handles:
        handle.remove()
    for total, output in zip(sums, outputs, strict=True):
        torch.testing.assert_close(total, output)
    phi = LlavaConfig(vision_config=vision, text_config=Phi3Config(**text), image_token_index=99)
    spec = InterventionSpec.from_model_args({"attn": "noise_qkv"})
    with pytest.raises(SpecError, match=r"llava fuses them in one \(qkv_proj\)"):
        adapter = FAMILIES.adapter_for(phi)
        adapter.check_intervention(phi, spec.resolve(2, 4, adapter.preset(phi)), spec.stats)
