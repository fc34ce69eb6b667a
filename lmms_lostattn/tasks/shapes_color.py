"""Prompt and scoring functions of the ``lostattn_shapes_color`` lmms-eval task."""

from __future__ import annotations

from PIL import Image


def doc_to_visual(doc: dict) -> list[Image.Image]:
    """The scene image, as RGB."""
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question wrapped in the (model-specific) pre/post prompt."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question'].strip()}{kwargs.get('post_prompt', '')}"


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Exact match of the lower-cased, stripped prediction against the colour word."""
    return {"exact_match": float(results[0].lower().strip() == doc["answer"].lower().strip())}
