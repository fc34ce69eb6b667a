"""Tiny LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision, and :func:`llava_config_and_processor` (a LLaVA-1.5-style config and
processor of any size, also used by shapes-llava and the benchmarks)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from lmms_lostattn.testing.common import IMAGE_SIZE, PATCH_SIZE, VISION, text_kwargs
from lmms_lostattn.testing.tokenizer import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer

ORDER = 0  # where these variants come in FAMILY_VARIANTS

# LLaVA-NeXT any-res grid, mirroring the real [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]] / 10.5.
_GRID_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]


def llava_config_and_processor(
    tokenizer,
    *,
    vision: Mapping[str, Any],
    text: Mapping[str, Any],
    select_strategy: str = "default",
    feature_layer: int = -2,
    grid_pinpoints: list[list[int]] | None = None,
):
    """``(config, processor)`` of a LLaVA-1.5-style model over ``tokenizer`` (its ``<image>`` token,
    :data:`~lmms_lostattn.testing.tokenizer.LLAVA_CHAT_TEMPLATE`).

    ``vision``: ``CLIPVisionConfig`` kwargs, with ``image_size`` and ``patch_size`` (projection width: the tower's).
    ``text``: ``LlamaConfig`` kwargs; vocabulary size and bos/eos/pad ids default to the tokenizer's.
    ``select_strategy`` ``"default"`` drops CLIP's class token from the image features, ``"full"`` keeps it.
    ``grid_pinpoints`` makes it a LLaVA-NeXT (any-res tiles of that grid).
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaNextConfig,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    image_size, patch_size = vision["image_size"], vision["patch_size"]
    patches = (image_size // patch_size) ** 2
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config_kwargs = dict(
        vision_config=CLIPVisionConfig(**{"projection_dim": vision["hidden_size"], **vision}),
        text_config=LlamaConfig(**{**ids, **text}),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy=select_strategy,
        vision_feature_layer=feature_layer,
        image_seq_length=patches + 1 if select_strategy == "full" else patches,
        pad_token_id=tokenizer.pad_token_id,
    )
    size = {"shortest_edge": image_size}
    crop = {"height": image_size, "width": image_size}
    processor_kwargs = dict(
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
        image_token=IMAGE_TOKEN,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    if grid_pinpoints is None:
        image_processor = CLIPImageProcessor(size=size, crop_size=crop)
        return LlavaConfig(**config_kwargs), LlavaProcessor(image_processor=image_processor, **processor_kwargs)
    image_processor = LlavaNextImageProcessor(size=size, crop_size=crop, image_grid_pinpoints=grid_pinpoints)
    return (
        LlavaNextConfig(image_grid_pinpoints=grid_pinpoints, **config_kwargs),
        LlavaNextProcessor(image_processor=image_processor, **processor_kwargs),
    )


def _llava_parts(variant: str, text_layers: int):
    """(model class, config, processor) of a tiny LLaVA-1.5 / LLaVA-NeXT."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    tokenizer = build_tokenizer()
    config, processor = llava_config_and_processor(
        tokenizer,
        vision=VISION,
        text=text_kwargs(tokenizer, text_layers),
        grid_pinpoints=_GRID_PINPOINTS if variant == "llava_next" else None,
    )
    model_cls = LlavaForConditionalGeneration if variant == "llava" else LlavaNextForConditionalGeneration
    return model_cls, config, processor


def _llava_onevision_parts(variant: str, text_layers: int):
    """(model class, config, processor) of a tiny LLaVA-OneVision: SigLIP 32 px / 8 px patches, Qwen2 decoder,
    any-res grid as LLaVA-NeXT's; the LLaVA tokenizer and chat template plus a ``<video>`` token."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tokens = {"image_token": IMAGE_TOKEN, "video_token": "<video>"}
    tokenizer = build_tokenizer([*SPECIAL_TOKENS, tokens["video_token"]], extra_special_tokens=tokens)
    vision = SiglipVisionConfig(**VISION)
    text = Qwen2Config(**text_kwargs(tokenizer, text_layers))
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(tokens["image_token"]),
        video_token_index=tokenizer.convert_tokens_to_ids(tokens["video_token"]),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=_GRID_PINPOINTS,
        pad_token_id=tokenizer.pad_token_id,
    )
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=_GRID_PINPOINTS),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer,
        num_image_tokens=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return LlavaOnevisionForConditionalGeneration, config, processor


VARIANTS: dict[str, Callable[[str, int], tuple]] = {
    "llava": _llava_parts,
    "llava_next": _llava_parts,
    "llava_onevision": _llava_onevision_parts,
}
