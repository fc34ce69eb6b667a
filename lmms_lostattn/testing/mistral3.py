"""Tiny Mistral 3 (Pixtral vision)."""

from __future__ import annotations

from collections.abc import Callable

from lmms_lostattn.testing.common import IMAGE_SIZE, PATCH_SIZE, VISION, text_kwargs
from lmms_lostattn.testing.tokenizer import SPECIAL_TOKENS, build_tokenizer

ORDER = 40  # where these variants come in FAMILY_VARIANTS

# Mistral's "[INST]...[/INST]"; an image part is [IMG], which the processor expands to rows of [IMG] tokens separated
# by [IMG_BREAK] and closed by [IMG_END].
MISTRAL3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '[INST]' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '[IMG]' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{ '[/INST]' }}{%- else -%}{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)


def _mistral3_parts(variant: str, text_layers: int):
    """(model class, config, processor) of a tiny Mistral 3: Pixtral 32 px / 8 px patches merged 2x2 into 2x2
    ``[IMG]`` tokens per image, Mistral decoder, LLaVA's BPE tokenizer plus Mistral's control tokens."""
    import transformers as tf

    tokens = ["[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    tokenizer = build_tokenizer(
        [*SPECIAL_TOKENS, *tokens], extra_special_tokens={"image_token": "[IMG]"}, chat_template=MISTRAL3_CHAT_TEMPLATE
    )
    vision = tf.PixtralVisionConfig(**VISION, head_dim=16)
    config = tf.Mistral3Config(
        vision_config=vision,
        text_config=tf.MistralConfig(**text_kwargs(tokenizer, text_layers)),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        tie_word_embeddings=False,  # tied random embeddings make greedy decoding repeat the last (special) token
    )
    processor = tf.PixtralProcessor(
        image_processor=tf.PixtralImageProcessor(size={"longest_edge": IMAGE_SIZE}, patch_size=PATCH_SIZE),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        spatial_merge_size=2,
        chat_template=MISTRAL3_CHAT_TEMPLATE,
    )
    return tf.Mistral3ForConditionalGeneration, config, processor


VARIANTS: dict[str, Callable[[str, int], tuple]] = {"mistral3": _mistral3_parts}
