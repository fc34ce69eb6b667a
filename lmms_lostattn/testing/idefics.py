"""Tiny Idefics2 and Idefics3."""

from __future__ import annotations

from collections.abc import Callable

from lmms_lostattn.testing.common import IMAGE_SIZE, VISION, text_kwargs
from lmms_lostattn.testing.tokenizer import IMAGE_TOKEN, SPECIAL_TOKENS, build_tokenizer

ORDER = 30  # where these variants come in FAMILY_VARIANTS

# Idefics2's "User:<image>text<end_of_utterance>\nAssistant:" turns; the processor expands each <image> to
# <fake_token_around_image> + perceiver latents + <fake_token_around_image>.
IDEFICS2_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'].capitalize() + ':' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_utterance>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


def _idefics2_parts(variant: str, text_layers: int):
    """(model class, config, processor) of a tiny Idefics2: SigLIP-style 32 px / 8 px patches, a perceiver
    resampler to 4 latents per image, Mistral decoder, LLaVA's BPE tokenizer."""
    import transformers as tf

    tokens = {"image_token": IMAGE_TOKEN, "image_boundary_token": "<fake_token_around_image>"}
    tokenizer = build_tokenizer(
        [*SPECIAL_TOKENS, tokens["image_boundary_token"], "<end_of_utterance>"],
        extra_special_tokens=tokens,
        chat_template=IDEFICS2_CHAT_TEMPLATE,
    )
    config = tf.Idefics2Config(
        vision_config=VISION,
        perceiver_config={
            "hidden_size": 64,
            "resampler_n_latents": 4,
            "resampler_depth": 1,
            "resampler_n_heads": 2,
            "resampler_head_dim": 16,
            "num_key_value_heads": 1,
        },
        text_config=tf.MistralConfig(**text_kwargs(tokenizer, text_layers)),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    image_processor = tf.Idefics2ImageProcessor(
        do_image_splitting=False, size={"shortest_edge": IMAGE_SIZE, "longest_edge": IMAGE_SIZE}
    )
    processor = tf.Idefics2Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=IDEFICS2_CHAT_TEMPLATE
    )
    return tf.Idefics2ForConditionalGeneration, config, processor


def _idefics3_parts(variant: str, text_layers: int):
    """(model class, config, processor) of a tiny Idefics3: SigLIP-style 32 px / 8 px patches pixel-shuffled
    (scale factor 2) to 4 ``<image>`` tokens per image, no image splitting, Llama decoder, Idefics2's turns."""
    import transformers as tf

    tokens = {"image_token": IMAGE_TOKEN, "image_boundary_token": "<fake_token_around_image>"}
    tokenizer = build_tokenizer(
        [*SPECIAL_TOKENS, tokens["image_boundary_token"], "<global-img>", "<end_of_utterance>"],
        extra_special_tokens=tokens,
        chat_template=IDEFICS2_CHAT_TEMPLATE,
    )
    config = tf.Idefics3Config(
        vision_config=VISION,
        text_config=tf.LlamaConfig(**text_kwargs(tokenizer, text_layers)),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        scale_factor=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    edge = {"longest_edge": IMAGE_SIZE}
    image_processor = tf.Idefics3ImageProcessor(do_image_splitting=False, size=edge, max_image_size=edge)
    processor = tf.Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=IDEFICS2_CHAT_TEMPLATE
    )
    return tf.Idefics3ForConditionalGeneration, config, processor


VARIANTS: dict[str, Callable[[str, int], tuple]] = {"idefics2": _idefics2_parts, "idefics3": _idefics3_parts}
