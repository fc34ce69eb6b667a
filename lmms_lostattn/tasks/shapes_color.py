"""Prompt and scoring functions of the ``lostattn_shapes_color`` lmms-eval task."""

from __future__ import annotations

import re
import string

from PIL import Image

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def doc_to_visual(doc: dict) -> list[Image.Image]:
    """The scene image, as RGB."""
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question wrapped in the (model-specific) pre/post prompt."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question'].strip()}{kwargs.get('post_prompt', '')}"


def normalised(text: str) -> str:
    """What is compared, as lm-eval's task of the same name compares it: the text before the first newline or
    period (its ``until``), lower-cased, without punctuation or spaces (``ignore_case``, ``ignore_punctuation``,
    ``regexes_to_ignore: [" "]``)."""
    text = re.split(r"[\n.]", text, maxsplit=1)[0]
    return text.lower().translate(_PUNCTUATION).replace(" ", "")


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Exact match of the :func:`normalised` prediction against the colour word."""
    return {"exact_match": float(normalised(results[0]) == normalised(doc["answer"]))}
