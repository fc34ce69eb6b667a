"""Tiny text LLMs (lm-eval's ``hf``) of :data:`TEXT_VARIANTS`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmms_lostattn.testing.common import text_kwargs
from lmms_lostattn.testing.tokenizer import LLAVA_CHAT_TEMPLATE, build_tokenizer

ORDER = 100  # where these variants come in FAMILY_VARIANTS

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
    shared = text_kwargs(tokenizer, text_layers)
    if variant == "gpt2":
        ids = {key: shared[key] for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
        config = transformers.GPT2Config(**ids, n_embd=64, n_inner=128, n_layer=text_layers, n_head=4, n_positions=4096)
    else:
        if variant == "gpt_neox":
            shared.pop("num_key_value_heads")
        config = getattr(transformers, config_name)(**shared, **extra)
    return getattr(transformers, model_name), config, tokenizer


VARIANTS: dict[str, Callable[[str, int], tuple]] = dict.fromkeys(TEXT_VARIANTS, _text_parts)
