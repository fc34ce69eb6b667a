"""The transformers internals the intervention relies on, each with a quick behavioural check (the tests run each
one; ``lostattn doctor`` runs them in a user's environment)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from lmms_lostattn.compat.contacts import ContactPoint, expect
from lmms_lostattn.compat.internals import forward_cache, internal
from lmms_lostattn.compat.kernels import CONTACT_POINTS as KERNELS_POINTS
from lmms_lostattn.intervention.kernel import KERNELS, register_kernels, text_config_key


def _attention_interfaces() -> None:
    register_kernels()
    functions = internal("transformers.modeling_utils", "ALL_ATTENTION_FUNCTIONS")
    masks = internal("transformers.masking_utils", "ALL_MASK_ATTENTION_FUNCTIONS")
    for name, (original, _, mask) in KERNELS.items():
        expect(functions.get_interface(name, None) is not None, f"AttentionInterface does not return {name!r}")
        # create_causal_mask skips masks for keys missing from _global_mapping (the mask would arrive as None)
        expect(masks._global_mapping.get(name) is mask, f"AttentionMaskInterface has no mask function for {name!r}")
        expect(masks._global_mapping.get(original) is mask, f"{original!r} no longer uses {mask.__name__}")


def _random_qkv() -> tuple[Any, Any, Any]:
    """float64 query ``(2, 4, 5, 8)`` and key, value ``(2, 2, 5, 8)``: four query heads on two KV heads."""
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn((2, heads, 5, 8), generator=generator, dtype=torch.float64) for heads in (4, 2, 2))


def _sdpa_attention_forward() -> None:
    """Called as the model files call it, with no mask: causal attention, output ``(B, Q, H, D)``."""
    sdpa_attention_forward = internal("transformers.integrations.sdpa_attention", "sdpa_attention_forward")
    query, key, value = _random_qkv()
    module = nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    out, _ = sdpa_attention_forward(module, query, key, value, None, dropout=0.0, scaling=0.5)
    key, value = key.repeat_interleave(2, dim=1), value.repeat_interleave(2, dim=1)
    scores = (query @ key.transpose(-1, -2)) * 0.5
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    expected = (scores.softmax(-1) @ value).transpose(1, 2)
    expect(
        out.shape == expected.shape, f"output shape {tuple(out.shape)}, expected (B, Q, H, D) {tuple(expected.shape)}"
    )
    expect(torch.allclose(out, expected, atol=1e-10), "output differs from causal softmax attention")


def _dynamic_cache() -> None:
    cache = internal("transformers.cache_utils", "DynamicCache")()
    states = torch.zeros(1, 2, 3, 4)
    cache.update(states, states, 0)
    expect(cache.get_seq_length() == 3, f"get_seq_length() == {cache.get_seq_length()} after caching 3 positions")


def _text_sub_config() -> None:
    model = SimpleNamespace(config=internal("transformers", "LlavaConfig")())
    expect(text_config_key(model) == "text_config", f"text sub-config key {text_config_key(model)!r}")


def _tiny_causal_lm() -> Any:
    """A one-layer random-weight Llama of width 16 (no tokenizer), to see what ``generate`` passes its forward."""
    config = internal("transformers", "LlamaConfig")(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return internal("transformers", "LlamaForCausalLM")(config).eval()


def _forwards_of_generate(use_cache: bool) -> list[tuple[int, int | None, Any]]:
    """(input length, cached length or None, ``use_cache`` argument) of each forward of a 3-token greedy
    ``generate`` from a 4-token prompt."""
    model = _tiny_causal_lm()
    calls: list[tuple[int, int | None, Any]] = []

    def record(module: Any, args: tuple, kwargs: dict) -> None:
        cache = forward_cache(kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls.append((ids.shape[1], None if cache is None else cache.get_seq_length(), kwargs.get("use_cache")))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        model.generate(
            torch.tensor([[1, 5, 6, 7]]), max_new_tokens=3, min_new_tokens=3, do_sample=False, use_cache=use_cache
        )
    finally:
        handle.remove()
    return calls


def _generate_calls() -> None:
    """``generate`` runs a prefill, then decoding steps whose forward gets the cache under a known name holding
    every earlier position."""
    calls = [(length, cached) for length, cached, _ in _forwards_of_generate(use_cache=True)]
    expect(calls[0][0] == 4 and not calls[0][1], f"first forward {calls[0]}, expected the 4-token prompt, no cache")
    expect(
        calls[1:] == [(1, 4), (1, 5)],
        f"decoding steps (input length, cached length) {calls[1:]}, expected [(1, 4), (1, 5)]",
    )


def _generate_calls_without_cache() -> None:
    """``generate(use_cache=False)`` runs the whole sequence again at each step, one token longer, with
    ``use_cache=False`` and no cache: how the scope tells such a step from a new prompt."""
    calls = _forwards_of_generate(use_cache=False)
    expect(
        calls == [(4, None, False), (5, None, False), (6, None, False)],
        f"forwards (input length, cached length, use_cache) {calls}, expected [(4, None, False), (5, None, False), "
        "(6, None, False)]",
    )


CONTACT_POINTS: tuple[ContactPoint, ...] = (
    ContactPoint(
        "transformers.AttentionInterface / AttentionMaskInterface registration", "transformers", _attention_interfaces
    ),
    ContactPoint(
        "transformers.integrations.sdpa_attention.sdpa_attention_forward", "transformers", _sdpa_attention_forward
    ),
    ContactPoint("transformers.cache_utils.DynamicCache.get_seq_length", "transformers", _dynamic_cache),
    ContactPoint("PretrainedConfig.get_text_config / sub_configs", "transformers", _text_sub_config),
    ContactPoint("GenerationMixin.generate: prefill, then forwards with the KV cache", "transformers", _generate_calls),
    ContactPoint(
        "GenerationMixin.generate(use_cache=False): the whole sequence again, under use_cache=False",
        "transformers",
        _generate_calls_without_cache,
    ),
    *KERNELS_POINTS,
)
