"""Tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL (ChatML, M-RoPE)."""

from __future__ import annotations

from collections.abc import Callable

from lmms_lostattn.testing.common import text_kwargs
from lmms_lostattn.testing.tokenizer import CHATML_TOKENS, build_tokenizer, chatml_template

ORDER = 10  # where these variants come in FAMILY_VARIANTS

QWEN_CHAT_TEMPLATE = chatml_template(
    "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
)
_QWEN_TOKENS = {
    **CHATML_TOKENS,
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
}
_QWEN_VISION = {"hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64}
_QWEN_HEAD_DIM = 16  # hidden 64 / 4 heads; M-RoPE splits head_dim / 2 = 8 frequencies over (t, h, w)


def _qwen_parts(variant: str, text_layers: int):
    """(model class, config, processor) of a tiny Qwen2-VL, Qwen2.5-VL or Qwen3-VL (ChatML, M-RoPE, 14/16 px patches
    merged 2x2; images resized to 28-112 px sides by the processor's min/max pixels)."""
    import transformers as tf

    extra = {k: v for k, v in _QWEN_TOKENS.items() if k.endswith("_token")}
    tokenizer = build_tokenizer(
        list(_QWEN_TOKENS.values()),
        unk=None,
        bos=None,
        eos=_QWEN_TOKENS["eos"],
        pad=_QWEN_TOKENS["pad"],
        extra_special_tokens=extra,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    ids = {f"{name[:-6]}_token_id": tokenizer.convert_tokens_to_ids(token) for name, token in extra.items()}
    patch = 16 if variant == "qwen3_vl" else 14
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    text = text_kwargs(tokenizer, text_layers)
    vision = dict(depth=2, num_heads=2, patch_size=patch, spatial_merge_size=2)
    if variant == "qwen2_vl":  # embed_dim is the tower's width, hidden_size its output (the LM's width)
        config = tf.Qwen2VLConfig(
            text_config={**text, "rope_parameters": rope},
            vision_config={**vision, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2},
            **ids,
        )
    elif variant == "qwen2_5_vl":
        config = tf.Qwen2_5_VLConfig(
            text_config={**text, "rope_parameters": rope},
            vision_config={**vision, **_QWEN_VISION, "window_size": 56, "fullatt_block_indexes": [1]},
            **ids,
        )
    else:
        config = tf.Qwen3VLConfig(
            text_config={**text, "head_dim": _QWEN_HEAD_DIM, "rope_parameters": {**rope, "mrope_interleaved": True}},
            vision_config={**vision, **_QWEN_VISION, "num_position_embeddings": 16, "deepstack_visual_indexes": [0, 1]},
            **ids,
        )
    pixels = {"shortest_edge": (2 * patch) ** 2, "longest_edge": (8 * patch) ** 2}
    image_processor = tf.Qwen2VLImageProcessor(size=pixels, patch_size=patch, merge_size=2)
    video_cls = tf.Qwen3VLVideoProcessor if variant == "qwen3_vl" else tf.Qwen2VLVideoProcessor
    video_processor = video_cls(size=pixels, patch_size=patch, merge_size=2)
    processor_cls = {
        "qwen2_vl": tf.Qwen2VLProcessor,
        "qwen2_5_vl": tf.Qwen2_5_VLProcessor,
        "qwen3_vl": tf.Qwen3VLProcessor,
    }[variant]
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    model_cls = tf.AutoModelForImageTextToText._model_mapping[type(config)]
    return model_cls, config, processor


VARIANTS: dict[str, Callable[[str, int], tuple]] = dict.fromkeys(("qwen2_vl", "qwen2_5_vl", "qwen3_vl"), _qwen_parts)
