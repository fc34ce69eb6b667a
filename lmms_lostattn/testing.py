"""Tiny random-weight LLaVA-family models for offline tests.

``build_tiny_llava`` writes a complete ``from_pretrained`` directory (fp32 safetensors weights, a byte-level BPE
tokenizer trained on a built-in corpus, image processor, processor and chat template); ``tiny_llava_dir`` caches
one build per variant. Nothing touches the Hugging Face hub.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

__all__ = ["TINY_VARIANTS", "build_tiny_llava", "tiny_llava_dir"]

TINY_VARIANTS = ("llava", "llava_next")

# Bump whenever the output of ``build_tiny_llava`` changes, so cached builds are not reused.
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

_CORPUS = """\
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


def _build_tokenizer():
    """Train a small byte-level BPE on the built-in corpus and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    # Llama-style: prepend <s> to every encoded text; trim_offsets=False keeps byte-level offsets usable.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": _IMAGE_TOKEN},
        chat_template=LLAVA_CHAT_TEMPLATE,
        model_max_length=4096,
    )


def _build_configs(variant: str, tokenizer, text_layers: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(
        image_size=_IMAGE_SIZE,
        patch_size=_PATCH_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
    )
    text = LlamaConfig(
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
    common = dict(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(_IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(_IMAGE_SIZE // _PATCH_SIZE) ** 2,
        pad_token_id=tokenizer.pad_token_id,
    )
    if variant == "llava":
        return LlavaConfig(**common)
    return LlavaNextConfig(image_grid_pinpoints=_GRID_PINPOINTS, **common)


def _build_processor(variant: str, tokenizer):
    from transformers import CLIPImageProcessor, LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor

    size = {"shortest_edge": _IMAGE_SIZE}
    crop = {"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}
    common = dict(
        tokenizer=tokenizer,
        patch_size=_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token
        image_token=_IMAGE_TOKEN,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    if variant == "llava":
        return LlavaProcessor(image_processor=CLIPImageProcessor(size=size, crop_size=crop), **common)
    image_processor = LlavaNextImageProcessor(size=size, crop_size=crop, image_grid_pinpoints=_GRID_PINPOINTS)
    return LlavaNextProcessor(image_processor=image_processor, **common)


def _check_variant(variant: str) -> None:
    if variant not in TINY_VARIANTS:
        raise ValueError(f"unknown tiny model variant {variant!r}; expected one of {', '.join(TINY_VARIANTS)}")


def build_tiny_llava(
    out_dir: str | os.PathLike, variant: str = "llava", *, seed: int = 0, text_layers: int = 4
) -> pathlib.Path:
    """Build, save and return the directory of a tiny random-weight LLaVA-family model with its processor."""
    _check_variant(variant)
    if text_layers < 1:
        raise ValueError(f"text_layers must be >= 1, got {text_layers}")
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    config = _build_configs(variant, tokenizer, text_layers)
    model_cls = LlavaForConditionalGeneration if variant == "llava" else LlavaNextForConditionalGeneration
    with torch.random.fork_rng(devices=[]):  # deterministic weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    _build_processor(variant, tokenizer).save_pretrained(out)
    return out


def _cache_root() -> pathlib.Path:
    env = os.environ.get("LOSTATTN_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "lmms_lostattn"


def tiny_llava_dir(variant: str = "llava") -> pathlib.Path:
    """Cached build under a cache directory (env LOSTATTN_CACHE or ~/.cache/lmms_lostattn), keyed by variant + a
    version string of the factory; build once, reuse."""
    _check_variant(variant)
    root = _cache_root()
    target = root / f"tiny-{variant}-v{_FACTORY_VERSION}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        build_tiny_llava(tmp, variant)
        try:
            tmp.rename(target)  # atomic publish; a concurrent builder may have won the race
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
