"""The released code's image priors: closed forms, parity with HF's eager vision attention, their place on the image
tokens, cached decoding, batch invariance and refusal for families without one token per patch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from siglip_llava import PATCHES, siglip_llava
from transformers import AutoConfig

from lmms_lostattn.config.spec import InterventionSpec, SpecError
from lmms_lostattn.families import adapter_for
from lmms_lostattn.intervention import priors
from lmms_lostattn.intervention.scope import InterventionError, intervene
from lmms_lostattn.testing import make_tiny_model
from lmms_lostattn.testing.common import VISION
from lmms_lostattn.testing.tokenizer import IMAGE_TOKEN

QUESTIONS = ["Is there a red circle?", "What colour is the big square in the picture on the left?"]


def test_complexity_of_constructed_patches() -> None:
    """2x2 grid of 4x4 patches: flat (0), vertical stripes and horizontal stripes (|step| 1 one way, variance 1/4:
    1.25), checkerboard (1 + 1 + 1/4 = 2.25); min-max normalised, then softmax."""
    flat = torch.full((4, 4), 0.5)
    stripes = torch.tensor([0.0, 1.0]).repeat(4, 2)
    checker = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2
    gray = torch.cat([torch.cat([flat, stripes], 1), torch.cat([stripes.T, checker.float()], 1)], 0)
    image = gray.expand(1, 3, 8, 8)  # r = g = b: gray is the value itself
    expected = torch.tensor([0.0, 1.25, 1.25, 2.25]) / (2.25 + priors.MINMAX_EPS)
    torch.testing.assert_close(priors.patch_complexity(image, (2, 2))[0], expected)
    torch.testing.assert_close(priors.complexity_prior(image, (2, 2))[0], expected.softmax(0))


def test_complexity_weighs_channels_as_luma() -> None:
    """Three 2x2 patches, each with one lit column (red, green, blue at 1): gray step w = 0.299, 0.587, 0.114, so a
    patch scores w + (w/2)^2 (one step across per row, none down, variance of [0, w]); a constant colour scores 0."""
    image = torch.zeros(1, 3, 2, 6)
    for channel in range(3):
        image[0, channel, :, 2 * channel + 1] = 1.0
    raw = torch.tensor([w + (w / 2) ** 2 for w in priors.GRAY])
    expected = (raw - raw.min()) / (raw.max() - raw.min() + priors.MINMAX_EPS)
    torch.testing.assert_close(priors.patch_complexity(image, (1, 3))[0], expected)
    constant = torch.ones(1, 3, 4, 4) * torch.tensor([0.2, 0.7, 0.1]).view(1, 3, 1, 1)
    assert torch.equal(priors.patch_complexity(constant, (2, 2)), torch.zeros(1, 4))


def test_vision_attention_of_a_constructed_map() -> None:
    """Two heads over [CLS, p1, p2]: a_j = mean over heads and the two patch queries of A[h, i, j], CLS dropped."""
    weights = torch.tensor(
        [
            [[0.2, 0.3, 0.5], [0.1, 0.6, 0.3], [0.4, 0.4, 0.2]],
            [[0.3, 0.3, 0.4], [0.5, 0.1, 0.4], [0.2, 0.2, 0.6]],
        ]
    )[None]
    received = torch.tensor([(0.6 + 0.4 + 0.1 + 0.2) / 4, (0.3 + 0.2 + 0.4 + 0.6) / 4])
    torch.testing.assert_close(priors.vision_attention_prior(weights, first=1)[0], received.softmax(0))
    # without a class token (SigLIP) every token is a patch: [p1, p2, p3]
    received = torch.tensor(
        [0.2 + 0.1 + 0.4 + 0.3 + 0.5 + 0.2, 0.3 + 0.6 + 0.4 + 0.3 + 0.1 + 0.2, 0.5 + 0.3 + 0.2 + 0.4 + 0.4 + 0.6]
    )
    torch.testing.assert_close(priors.vision_attention_prior(weights, first=0)[0], (received / 6).softmax(0))


@pytest.fixture(scope="module")
def tiny():
    model, processor = make_tiny_model("llava", text_layers=2)
    processor.tokenizer.padding_side = "left"
    return model, processor


def _inputs(processor, count: int = 2) -> dict[str, torch.Tensor]:
    images = [Image.new("RGB", (40, 32), (40 + 90 * i, 200 - 60 * i, 90)) for i in range(count)]
    for image in images:
        image.paste((250, 250, 250), (5, 5, 15, 12))  # some structure, so the complexity differs between patches
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in QUESTIONS[:count]
    ]
    return processor(images=images, text=texts, padding=True, return_tensors="pt")


def _resolve(model, **args: object):
    text = model.config.get_text_config()
    return InterventionSpec.from_model_args(args).resolve(text.num_hidden_layers, text.num_attention_heads)


def _mean_std(processor) -> tuple[list[float], list[float]]:
    return processor.image_processor.image_mean, processor.image_processor.image_std


def test_eager_weights_equal_hf_eager_vision_attention(tiny) -> None:
    model, processor = tiny
    inputs = _inputs(processor)
    tower, last = adapter_for(model.config).vision_modules(model)
    seen = {}

    def keep_input(module, args, kwargs) -> None:
        seen["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    handle = last.register_forward_pre_hook(keep_input, with_kwargs=True)
    model.set_attn_implementation({"vision_config": "eager"})
    try:
        with torch.no_grad():
            hf = tower(inputs["pixel_values"], output_attentions=True).attentions[-1]
    finally:
        handle.remove()
        model.set_attn_implementation({"vision_config": "sdpa"})
    torch.testing.assert_close(priors.eager_attention_weights(last, seen["x"]), hf, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["vision_attention", "complexity"])
def test_the_prior_lands_on_each_images_tokens(tiny, mode: str) -> None:
    """probs space, lambda 1, every head: the last row's weights over the image tokens are the image's prior times
    the learned image mass; the prior itself computed here from the tower's eager attention or the pixels."""
    model, processor = tiny
    inputs = _inputs(processor)
    image = inputs["input_ids"] == model.config.image_token_id
    model.set_attn_implementation({"text_config": "eager", "vision_config": "eager"})
    try:
        with torch.no_grad():
            vision = model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
            edit = _resolve(model, attn=mode, attn_space="probs", attn_layers="0")
            with intervene(model, edit, adapter_for(model.config), image_mean_std=_mean_std(processor)):
                weights = model(**inputs, output_attentions=True).attentions[0][:, :, -1]  # (B, H, K)
    finally:
        model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    if mode == "vision_attention":
        expected = priors.vision_attention_prior(vision.attentions[-1], first=1)  # CLIP: the class token first
    else:
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in _mean_std(processor))
        patch = model.config.vision_config.patch_size
        pixels = inputs["pixel_values"]
        expected = priors.complexity_prior(pixels * std + mean, (pixels.shape[-2] // patch, pixels.shape[-1] // patch))
    for sample in range(2):
        on_image = weights[sample][:, image[sample]]
        torch.testing.assert_close(on_image / on_image.sum(-1, keepdim=True), expected[sample].expand_as(on_image))


@pytest.mark.parametrize("mode", ["vision_attention", "complexity"])
def test_cached_decoding_and_batches_agree(tiny, mode: str) -> None:
    model, processor = tiny
    batch, singles = _inputs(processor), [_inputs(processor, 1)]
    edit = _resolve(model, attn=mode, attn_scale="scores", attn_heads="p0.3-0.6")
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": processor.tokenizer.pad_token_id}

    def run(inputs, **extra):
        with torch.no_grad(), intervene(model, edit, adapter_for(model.config), image_mean_std=_mean_std(processor)):
            return model.generate(**inputs, **kwargs, **extra)[:, inputs["input_ids"].shape[1] :]

    cached = run(batch)
    assert torch.equal(cached, run(batch, use_cache=False))
    assert torch.equal(cached[:1], run(singles[0]))
    with torch.no_grad():
        plain = model(**batch).logits[:, -1]
        with intervene(model, edit, adapter_for(model.config), image_mean_std=_mean_std(processor)):
            assert (model(**batch).logits[:, -1] - plain).abs().max() > 1e-3  # beyond an unedited path's float noise


def test_complexity_without_the_normalisation_is_an_error(tiny) -> None:
    model, _ = tiny
    missing = pytest.raises(InterventionError, match="image_mean and image_std")
    with missing, intervene(model, _resolve(model, attn="complexity"), adapter_for(model.config)):
        pass


@pytest.mark.parametrize("model_type", ["llava_next", "llava_onevision", "qwen2_5_vl", "gemma3"])
def test_families_without_one_token_per_patch_are_refused(model_type: str) -> None:
    config = AutoConfig.for_model(model_type)
    with pytest.raises(SpecError, match=rf"attn=vision_attention .* one token per patch .*{model_type}"):
        adapter_for(config).check_mode(config, "vision_attention")
    adapter_for(config).check_mode(config, "gaussian")


def test_a_llava_with_a_pixtral_tower_is_refused_the_priors() -> None:
    """Pixtral reads images at native resolution and puts a break token after each row of patches: not one token
    per patch of a fixed grid, though the model type is llava."""
    config = AutoConfig.for_model("llava", vision_config={"model_type": "pixtral"})
    with pytest.raises(SpecError, match=r"attn=complexity .* one token per patch .*llava with a pixtral tower"):
        adapter_for(config).check_mode(config, "complexity")
    plain = AutoConfig.for_model("llava")
    adapter_for(plain).check_mode(plain, "complexity")  # CLIP: one token per patch


@pytest.mark.parametrize("mode", ["vision_attention", "complexity"])
@pytest.mark.parametrize("strategy", ["full", "default"])
def test_a_tower_without_a_class_token_gives_every_patch_the_model_sees_its_prior(strategy: str, mode: str) -> None:
    """LLaVA with a SigLIP tower (no class token): with ``vision_feature_select_strategy=full`` (llava-interleave)
    the prompt's P image tokens get softmax over all P patches of the attention each receives (mean over heads and
    queries of HF's eager vision attention) or of their complexity, the first patch included; with ``default`` the
    model drops the first patch, and the P - 1 tokens get the prior over the P - 1 patches it keeps."""
    model, processor = siglip_llava(strategy)
    config, first = model.config, 1 if strategy == "default" else 0  # the patches the model drops
    prompt = f"USER: {IMAGE_TOKEN}\nIs it red? ASSISTANT:"
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)  # patches of unequal complexity
    inputs = processor(text=prompt, images=[Image.fromarray(noise)], return_tensors="pt")
    image = inputs["input_ids"][0] == config.image_token_index
    assert int(image.sum()) == PATCHES - first
    edit = _resolve(model, attn=mode, attn_space="probs", attn_layers="0")
    mean_std = _mean_std(processor)
    with torch.no_grad():
        vision = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions[-1][0]
        with intervene(model, edit, adapter_for(config), image_mean_std=mean_std):
            weights = model(**inputs, output_attentions=True).attentions[0][0, :, -1]
    on_image = weights[:, image]
    if mode == "vision_attention":
        expected = vision[:, first:, first:].mean(dim=(0, 1)).softmax(-1)  # (H, P, P): mean over heads and queries
    else:
        mean, std = (torch.tensor(values).view(1, -1, 1, 1) for values in mean_std)
        side = VISION["image_size"] // VISION["patch_size"]
        expected = priors.patch_complexity(inputs["pixel_values"] * std + mean, (side, side))[0, first:].softmax(-1)
    torch.testing.assert_close(on_image / on_image.sum(-1, keepdim=True), expected.expand_as(on_image))
