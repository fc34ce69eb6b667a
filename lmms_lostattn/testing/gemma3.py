"""Tiny Gemma 3."""

from __future__ import annotations

from collections.abc import Callable

from lmms_lostattn.testing.common import IMAGE_SIZE, VISION, text_kwargs
from lmms_lostattn.testing.tokenizer import build_tokenizer

ORDER = 50  # where these variants come in FAMILY_VARIANTS

# Gemma's turns; an image part is <start_of_image>, which the processor expands to BOI + soft tokens + EOI.
GEMMA3_CHAT_TEMPLATE = (
    "{{ '<bos>' }}"
    "{%- for message in messages -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


def _gemma3_parts(variant: str, text_layers: int):
    """(model class, config, processor) of a tiny Gemma 3: SigLIP 32 px / 8 px patches pooled to 4 soft tokens,
    sandwich-norm decoder with sliding-window (8) layers and a last global layer."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    tokens = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
    tokenizer = build_tokenizer(
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", *tokens.values()],
        unk=None,
        bos=None,  # the chat template writes <bos>
        eos="<end_of_turn>",
        pad="<pad>",
        extra_special_tokens=tokens,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        padding_side="left",  # as Gemma 3's checkpoints (lmms-eval's gemma3 pads every prompt to a multiple of 8)
    )
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in tokens.items()}
    text = Gemma3TextConfig(
        **text_kwargs(tokenizer, text_layers),
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=["sliding_attention"] * (text_layers - 1) + ["full_attention"],
    )
    vision = SiglipVisionConfig(**VISION)
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
    )
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=4,
    )
    return Gemma3ForConditionalGeneration, config, processor


VARIANTS: dict[str, Callable[[str, int], tuple]] = {"gemma3": _gemma3_parts}
