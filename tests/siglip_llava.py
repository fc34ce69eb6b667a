"""A tiny LLaVA with a SigLIP vision tower (no class token), for the tests of what the model drops with LLaVA's
``default`` feature selection (the tower's first token: here a patch)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

from lmms_lostattn.testing.common import VISION, text_kwargs
from lmms_lostattn.testing.tokenizer import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE, build_tokenizer

PATCHES = (VISION["image_size"] // VISION["patch_size"]) ** 2


def siglip_llava(strategy: str) -> tuple[LlavaForConditionalGeneration, Any]:
    """``(model, processor)``: random weights, eager attention; ``strategy`` is ``vision_feature_select_strategy``
    (``default``: the model sees ``PATCHES - 1`` image tokens, ``full``: all of them)."""
    tokenizer = build_tokenizer()
    first = 1 if strategy == "default" else 0  # the patches the model drops
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(**VISION), text_config=LlamaConfig(**text_kwargs(tokenizer, 2)),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_select_strategy=strategy,
        vision_feature_layer=-1, image_seq_length=PATCHES - first, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessor(size={"height": VISION["image_size"], "width": VISION["image_size"]}),
        tokenizer=tokenizer, patch_size=VISION["patch_size"], vision_feature_select_strategy=strategy,
        num_additional_image_tokens=0, image_token=IMAGE_TOKEN, chat_template=LLAVA_CHAT_TEMPLATE,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation({"text_config": "eager", "vision_config": "eager"})
    return model, processor
