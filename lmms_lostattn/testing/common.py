"""Sizes the tiny models of several families share: the 32 px / 8 px patch vision tower and the width-64 decoder."""

from __future__ import annotations

IMAGE_SIZE = 32
PATCH_SIZE = 8

# The tiny vision tower (CLIP/SigLIP-style) every family with a 32 px / 8 px patch tower shares.
VISION = dict(
    image_size=IMAGE_SIZE,
    patch_size=PATCH_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
)


def text_kwargs(tokenizer, text_layers: int) -> dict:
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
