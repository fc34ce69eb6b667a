"""Tiny InternVL (``-hf`` format)."""

from __future__ import annotations

from collections.abc import Callable

from lmms_lostattn.testing.common import IMAGE_SIZE, PATCH_SIZE, VISION, text_kwargs
from lmms_lostattn.testing.tokenizer import CHATML_TOKENS, build_tokenizer, chatml_template

ORDER = 20  # where these variants come in FAMILY_VARIANTS


def _internvl_parts(variant: str, text_layers: int):
    """(model class, config, processor) of a tiny InternVL (``-hf`` format): 32 px tiles of 8 px patches, pixel
    shuffle to 4 ``<IMG_CONTEXT>`` tokens per tile, Qwen2 decoder; video frames become image tiles."""
    import transformers as tf

    tokens = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    tokenizer = build_tokenizer(
        [*CHATML_TOKENS.values(), *tokens.values()],
        unk=None,
        bos=None,
        eos=CHATML_TOKENS["eos"],
        pad=CHATML_TOKENS["pad"],
        extra_special_tokens=tokens,
        chat_template=(template := chatml_template("<IMG_CONTEXT>\n", "<video>\n")),
    )
    vision = tf.InternVLVisionConfig(**{**VISION, "image_size": [IMAGE_SIZE] * 2, "patch_size": [PATCH_SIZE] * 2})
    config = tf.InternVLConfig(
        vision_config=vision,
        text_config=tf.Qwen2Config(**text_kwargs(tokenizer, text_layers)),
        image_token_id=tokenizer.convert_tokens_to_ids(tokens["context_image_token"]),
        image_seq_length=4,
    )
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    processor = tf.InternVLProcessor(
        image_processor=tf.GotOcr2ImageProcessor(size=size, crop_to_patches=True, max_patches=4),
        video_processor=tf.InternVLVideoProcessor(size=size),
        tokenizer=tokenizer,
        image_seq_length=4,
        chat_template=template,
    )
    return tf.InternVLForConditionalGeneration, config, processor


VARIANTS: dict[str, Callable[[str, int], tuple]] = {"internvl": _internvl_parts}
