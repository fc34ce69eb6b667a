"""Tiny random-weight models of every supported family (LVLMs and text LLMs), for offline tests.

``build_tiny_model(dir, variant)`` writes a complete ``from_pretrained`` directory (fp32 safetensors weights, a
byte-level BPE tokenizer trained on a built-in corpus with the family's special tokens, image/video processor,
processor and chat template; a text LLM has its tokenizer only) for any of :data:`FAMILY_VARIANTS`: hidden size 64,
4 decoder layers, 4 query / 2 key-value heads, 32 px images (Qwen: 28-112 px). ``tiny_model_dir`` caches one build per
variant; ``build_tiny_llava`` / ``tiny_llava_dir`` are the same for the LLaVA-1.5/NeXT variants (:data:`TINY_VARIANTS`).
``build_tokenizer`` (the BPE on :data:`CORPUS`) and ``llava_config_and_processor`` (a LLaVA-1.5-style config and
processor of any size) also build shapes-llava and the benchmark checkpoints. Nothing touches the Hugging Face hub.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "CORPUS",
    "FAMILY_VARIANTS",
    "TEXT_VARIANTS",
    "TINY_VARIANTS",
    "build_tiny_llava",
    "build_tiny_model",
    "build_tokenizer",
    "llava_config_and_processor",
    "tiny_llava_dir",
    "tiny_model_dir",
]

TINY_VARIANTS = ("llava", "llava_next")

# Bump whenever the output of ``build_tiny_model`` changes, so cached builds are not reused.
_FACTORY_VERSION = "1"

_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_IMAGE_TOKEN = "<image>"
_VOCAB_SIZE = 400
_IMAGE_SIZE = 32
_PATCH_SIZE = 8
# LLaVA-NeXT any-res grid, mirroring the real [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]] / 10.5.
_GRID_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]

# Vicuna / LLaVA-1.5 layout ("USER: <image>\n... ASSISTANT:"). Content may be a string (lmms-eval's simple llava_hf
# calls ``tokenizer.apply_chat_template`` with "<image>" already in the text) or a list of typed parts (chat class,
# ``processor.apply_chat_template``), where each image part renders as "<image>\n" in place.
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{ message['role'].upper() + ': ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- if not loop.last -%}{{ ' ' }}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}"
    "{{ ' ' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

CORPUS = """\
A chat between a curious user and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the user's questions.
USER: Is there a cat in the image? ASSISTANT: Yes, there is a cat.
USER: Is there a dog in the image? ASSISTANT: No, there is no dog.
USER: What color is the car? ASSISTANT: The car is red.
USER: How many people are in the picture? ASSISTANT: There are two people.
USER: Answer the question using a single word or phrase. ASSISTANT: Yes
USER: Describe the image in detail. ASSISTANT: A small white cat sits on a wooden table next to a blue cup.
Please answer yes or no. Is the object on the left larger than the object on the right?
The photo shows a street with cars, a bus, trees, a person riding a bicycle and a traffic light.
Options: A. red B. green C. blue D. yellow. Answer with the option's letter from the given choices directly.
What is written on the sign? What is the man holding? Where is the woman standing? Which animal is this?
0 1 2 3 4 5 6 7 8 9 10 100 1000, . ; : ! ? ' " ( ) [ ] - + = / * % $ # @ & _ < > { } | \\ ~ ^
"""


def build_tokenizer(
    special_tokens: Sequence[str] = tuple(_SPECIAL_TOKENS),
    *,
    unk: str | None = "<unk>",
    bos: str | None = "<s>",
    eos: str = "</s>",
    pad: str = "<pad>",
    extra_special_tokens: dict[str, str] | None = None,
    chat_template: str = LLAVA_CHAT_TEMPLATE,
    padding_side: str = "right",
    corpus: str = CORPUS,
):
    """Train a small byte-level BPE on ``corpus`` (default: the built-in one) and wrap it as a transformers fast
    tokenizer.

    The defaults are LLaVA's (Llama-style: ``<s>`` prepended to every text); ``bos=None`` adds nothing (ChatML).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines() * 4, trainer=trainer)
    # trim_offsets=False keeps byte-level offsets usable.
    steps = [processors.ByteLevel(trim_offsets=False)]
    if bos is not None:  # Llama-style: prepend BOS to every encoded text
        steps.append(
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
            )
        )
    tok.post_processor = processors.Sequence(steps)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        extra_special_tokens={"image_token": _IMAGE_TOKEN} if extra_special_tokens is None else extra_special_tokens,
        chat_template=chat_template,
        model_max_length=4096,
        padding_side=padding_side,
    )


# The tiny vision tower (CLIP/SigLIP-style) every family with a 32 px / 8 px patch tower shares.
_VISION = dict(
    image_size=_IMAGE_SIZE,
    patch_size=_PATCH_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
)


def _text_kwargs(tokenizer, text_layers: int) -> dict:
    """The tiny language decoder every family shares: width 64, 4 query / 2 key-value heads (GQA)."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


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
    :data:`LLAVA_CHAT_TEMPLATE`).

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
        image_token_index=tokenizer.convert_tokens_to_ids(_IMAGE_TOKEN),
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
        image_token=_IMAGE_TOKEN,
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


def _check_variant(variant: str, accepted: Sequence[str] = TINY_VARIANTS) -> None:
    if variant not in accepted:
        raise ValueError(f"unknown tiny model variant {variant!r}; expected one of {', '.join(accepted)}")


def _llava_parts(variant: str, text_layers: int):
    """(model class, config, processor) of a tiny LLaVA-1.5 / LLaVA-NeXT."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    tokenizer = build_tokenizer()
    config, processor = llava_config_and_processor(
        tokenizer,
        vision=_VISION,
        text=_text_kwargs(tokenizer, text_layers),
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

    tokens = {"image_token": _IMAGE_TOKEN, "video_token": "<video>"}
    tokenizer = build_tokenizer([*_SPECIAL_TOKENS, tokens["video_token"]], extra_special_tokens=tokens)
    vision = SiglipVisionConfig(**_VISION)
    text = Qwen2Config(**_text_kwargs(tokenizer, text_layers))
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
    size = {"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=_GRID_PINPOINTS),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer,
        num_image_tokens=(_IMAGE_SIZE // _PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return LlavaOnevisionForConditionalGeneration, config, processor


# -- Qwen2-VL / Qwen2.5-VL / Qwen3-VL ---------------------------------------------------------------------------

def _chatml_template(image: str, video: str) -> str:
    """ChatML with a default system turn, as Qwen's and InternVL's templates. String contents pass through; typed
    parts render the given image/video placeholders, which the processor expands to one token per patch."""
    return (
        "{%- for message in messages -%}"
        "{%- if loop.first and message['role'] != 'system' -%}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        f"{{%- if part['type'] == 'image' -%}}{{{{ {image!r} }}}}"
        f"{{%- elif part['type'] == 'video' -%}}{{{{ {video!r} }}}}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


QWEN_CHAT_TEMPLATE = _chatml_template(
    "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
)
_QWEN_TOKENS = {
    "pad": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "eos": "<|im_end|>",
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
    text = _text_kwargs(tokenizer, text_layers)
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


# -- InternVL (HF format) ------------------------------------------------------------------------------------------


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
        [_QWEN_TOKENS["pad"], _QWEN_TOKENS["im_start"], _QWEN_TOKENS["eos"], *tokens.values()],
        unk=None,
        bos=None,
        eos=_QWEN_TOKENS["eos"],
        pad=_QWEN_TOKENS["pad"],
        extra_special_tokens=tokens,
        chat_template=(template := _chatml_template("<IMG_CONTEXT>\n", "<video>\n")),
    )
    vision = tf.InternVLVisionConfig(
        **{**_VISION, "image_size": [_IMAGE_SIZE] * 2, "patch_size": [_PATCH_SIZE] * 2}
    )
    config = tf.InternVLConfig(
        vision_config=vision,
        text_config=tf.Qwen2Config(**_text_kwargs(tokenizer, text_layers)),
        image_token_id=tokenizer.convert_tokens_to_ids(tokens["context_image_token"]),
        image_seq_length=4,
    )
    size = {"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}
    processor = tf.InternVLProcessor(
        image_processor=tf.GotOcr2ImageProcessor(size=size, crop_to_patches=True, max_patches=4),
        video_processor=tf.InternVLVideoProcessor(size=size),
        tokenizer=tokenizer,
        image_seq_length=4,
        chat_template=template,
    )
    return tf.InternVLForConditionalGeneration, config, processor


# -- Idefics2 -------------------------------------------------------------------------------------------------------

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

    tokens = {"image_token": _IMAGE_TOKEN, "image_boundary_token": "<fake_token_around_image>"}
    tokenizer = build_tokenizer(
        [*_SPECIAL_TOKENS, tokens["image_boundary_token"], "<end_of_utterance>"],
        extra_special_tokens=tokens,
        chat_template=IDEFICS2_CHAT_TEMPLATE,
    )
    config = tf.Idefics2Config(
        vision_config=_VISION,
        perceiver_config={
            "hidden_size": 64,
            "resampler_n_latents": 4,
            "resampler_depth": 1,
            "resampler_n_heads": 2,
            "resampler_head_dim": 16,
            "num_key_value_heads": 1,
        },
        text_config=tf.MistralConfig(**_text_kwargs(tokenizer, text_layers)),
        image_token_id=tokenizer.convert_tokens_to_ids(_IMAGE_TOKEN),
    )
    image_processor = tf.Idefics2ImageProcessor(
        do_image_splitting=False, size={"shortest_edge": _IMAGE_SIZE, "longest_edge": _IMAGE_SIZE}
    )
    processor = tf.Idefics2Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=IDEFICS2_CHAT_TEMPLATE
    )
    return tf.Idefics2ForConditionalGeneration, config, processor


def _idefics3_parts(variant: str, text_layers: int):
    """(model class, config, processor) of a tiny Idefics3: SigLIP-style 32 px / 8 px patches pixel-shuffled
    (scale factor 2) to 4 ``<image>`` tokens per image, no image splitting, Llama decoder, Idefics2's turns."""
    import transformers as tf

    tokens = {"image_token": _IMAGE_TOKEN, "image_boundary_token": "<fake_token_around_image>"}
    tokenizer = build_tokenizer(
        [*_SPECIAL_TOKENS, tokens["image_boundary_token"], "<global-img>", "<end_of_utterance>"],
        extra_special_tokens=tokens,
        chat_template=IDEFICS2_CHAT_TEMPLATE,
    )
    config = tf.Idefics3Config(
        vision_config=_VISION,
        text_config=tf.LlamaConfig(**_text_kwargs(tokenizer, text_layers)),
        image_token_id=tokenizer.convert_tokens_to_ids(_IMAGE_TOKEN),
        scale_factor=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    edge = {"longest_edge": _IMAGE_SIZE}
    image_processor = tf.Idefics3ImageProcessor(do_image_splitting=False, size=edge, max_image_size=edge)
    processor = tf.Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=IDEFICS2_CHAT_TEMPLATE
    )
    return tf.Idefics3ForConditionalGeneration, config, processor


# -- Mistral 3 (Pixtral vision) ---------------------------------------------------------------------------------------

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
        [*_SPECIAL_TOKENS, *tokens], extra_special_tokens={"image_token": "[IMG]"}, chat_template=MISTRAL3_CHAT_TEMPLATE
    )
    vision = tf.PixtralVisionConfig(**_VISION, head_dim=16)
    config = tf.Mistral3Config(
        vision_config=vision,
        text_config=tf.MistralConfig(**_text_kwargs(tokenizer, text_layers)),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        tie_word_embeddings=False,  # tied random embeddings make greedy decoding repeat the last (special) token
    )
    processor = tf.PixtralProcessor(
        image_processor=tf.PixtralImageProcessor(size={"longest_edge": _IMAGE_SIZE}, patch_size=_PATCH_SIZE),
        tokenizer=tokenizer,
        patch_size=_PATCH_SIZE,
        spatial_merge_size=2,
        chat_template=MISTRAL3_CHAT_TEMPLATE,
    )
    return tf.Mistral3ForConditionalGeneration, config, processor


# -- Gemma 3 ---------------------------------------------------------------------------------------------------------

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
        **_text_kwargs(tokenizer, text_layers),
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=["sliding_attention"] * (text_layers - 1) + ["full_attention"],
    )
    vision = SiglipVisionConfig(**_VISION)
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
    )
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}),
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=4,
    )
    return Gemma3ForConditionalGeneration, config, processor


# Text LLMs (lm-eval's ``hf``): model_type -> (config class, causal-LM class, config arguments beyond the shared ones).
_TEXT_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8}),
    "gemma3_text": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8},
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"use_parallel_residual": True}),
}
TEXT_VARIANTS = tuple(_TEXT_FAMILIES)


def _text_parts(variant: str, text_layers: int):
    """(model class, config, tokenizer) of a tiny text LLM: the shared width-64 decoder (GPT-2 and GPT-NeoX, which
    have no key-value head groups, with 4 heads), Llama-style tokenizer (``<s>`` first), left padding."""
    import transformers

    config_name, model_name, extra = _TEXT_FAMILIES[variant]
    tokenizer = build_tokenizer(padding_side="left", chat_template=LLAVA_CHAT_TEMPLATE, extra_special_tokens={})
    shared = _text_kwargs(tokenizer, text_layers)
    if variant == "gpt2":
        ids = {key: shared[key] for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
        config = transformers.GPT2Config(**ids, n_embd=64, n_inner=128, n_layer=text_layers, n_head=4, n_positions=4096)
    else:
        if variant == "gpt_neox":
            shared.pop("num_key_value_heads")
        config = getattr(transformers, config_name)(**shared, **extra)
    return getattr(transformers, model_name), config, tokenizer


# Every tiny model the factory builds: variant -> parts(variant, text_layers).
_PARTS = {
    "llava": _llava_parts,
    "llava_next": _llava_parts,
    "llava_onevision": _llava_onevision_parts,
    "qwen2_vl": _qwen_parts,
    "qwen2_5_vl": _qwen_parts,
    "qwen3_vl": _qwen_parts,
    "internvl": _internvl_parts,
    "idefics2": _idefics2_parts,
    "idefics3": _idefics3_parts,
    "mistral3": _mistral3_parts,
    "gemma3": _gemma3_parts,
    **dict.fromkeys(TEXT_VARIANTS, _text_parts),
}
FAMILY_VARIANTS = tuple(_PARTS)


def make_tiny_model(variant: str, *, seed: int = 0, text_layers: int = 4):
    """``(model, processor)``: a tiny random-weight float32 model of any :data:`FAMILY_VARIANTS`, in memory, with its
    tokenizer, processor and chat template (for the text LLMs of :data:`TEXT_VARIANTS`, the tokenizer)."""
    _check_variant(variant, FAMILY_VARIANTS)
    if text_layers < 1:
        raise ValueError(f"text_layers must be >= 1, got {text_layers}")
    import torch

    model_cls, config, processor = _PARTS[variant](variant, text_layers)
    with torch.random.fork_rng(devices=[]):  # deterministic weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32).eval()
    tokenizer = getattr(processor, "tokenizer", processor)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor


def build_tiny_model(
    out_dir: str | os.PathLike, variant: str, *, seed: int = 0, text_layers: int = 4
) -> pathlib.Path:
    """Build, save and return the directory of a tiny random-weight model of any :data:`FAMILY_VARIANTS` with its
    tokenizer, processor and chat template (loadable offline with ``from_pretrained``)."""
    model, processor = make_tiny_model(variant, seed=seed, text_layers=text_layers)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_tiny_llava(
    out_dir: str | os.PathLike, variant: str = "llava", *, seed: int = 0, text_layers: int = 4
) -> pathlib.Path:
    """Build, save and return the directory of a tiny random-weight LLaVA-family model with its processor."""
    _check_variant(variant)
    return build_tiny_model(out_dir, variant, seed=seed, text_layers=text_layers)


def _cache_root() -> pathlib.Path:
    env = os.environ.get("LOSTATTN_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "lmms_lostattn"


def tiny_llava_dir(variant: str = "llava") -> pathlib.Path:
    """Cached build of a tiny LLaVA-family model (see :func:`tiny_model_dir`)."""
    _check_variant(variant)
    return tiny_model_dir(variant)


def tiny_model_dir(variant: str) -> pathlib.Path:
    """Cached build under a cache directory (env LOSTATTN_CACHE or ~/.cache/lmms_lostattn), keyed by variant + a
    version string of the factory; build once, reuse."""
    _check_variant(variant, FAMILY_VARIANTS)
    root = _cache_root()
    target = root / f"tiny-{variant}-v{_FACTORY_VERSION}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        build_tiny_model(tmp, variant)
        try:
            tmp.rename(target)  # atomic publish; a concurrent builder may have won the race
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
