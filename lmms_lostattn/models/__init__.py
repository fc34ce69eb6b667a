"""Shipped trained models (``shapes_llava/``) and the code that trained them."""

from __future__ import annotations

import pathlib

SHAPES_LLAVA_DIR = pathlib.Path(__file__).resolve().parent / "shapes_llava"
