"""Deterministic synthetic shape scenes and the POPE-style / colour questions built on them.

Scene ``i`` of ``make_scenes(n, seed)`` depends only on ``(seed, i)``; row ``i`` of
``make_pope_rows(n, seed)`` and ``make_color_rows(n, seed)`` shows scene ``i``.
Every scene holds 1-3 objects with pairwise distinct shapes and distinct colours.

CLI (from the repository root)::

    python -m lmms_lostattn.tasks.generate_shapes --out lmms_lostattn/tasks/data/lostattn_pope.parquet --n 200 --seed 0
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 96
BACKGROUND = (255, 255, 255)
SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 60, 180),
}
POPE_COLUMNS = ("question_id", "question", "answer", "image", "image_source", "category")
CELL = IMAGE_SIZE // 3  # objects sit in distinct cells of a 3x3 grid, so they never overlap
_SCENE_STREAM, _POPE_STREAM, _COLOR_STREAM = 0, 1, 2


class ShapeObject(NamedTuple):
    """One drawn object; ``box`` is ``(x0, y0, x1, y1)`` in pixels."""

    shape: str
    color: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Scene:
    """A rendered image and the objects drawn on it, in drawing order."""

    image: Image.Image
    objects: tuple[ShapeObject, ...]

    @property
    def pairs(self) -> set[tuple[str, str]]:
        """The ``(shape, color)`` pairs present."""
        return {(o.shape, o.color) for o in self.objects}


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        draw.polygon(
            [(cx + float(d * np.cos(a)), cy + float(d * np.sin(a))) for a, d in zip(angles, radii, strict=True)],
            fill=fill,
        )
    elif shape == "cross":
        t = r / 3
        draw.rectangle((x0, cy - t, x1, cy + t), fill=fill)
        draw.rectangle((cx - t, y0, cx + t, y1), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def make_scene(rng: np.random.Generator) -> Scene:
    """Draw 1-3 objects (distinct shapes, distinct colours) on a plain background."""
    n_objects = int(rng.integers(1, 4))
    shapes = rng.choice(SHAPES, size=n_objects, replace=False)
    colors = rng.choice(list(COLORS), size=n_objects, replace=False)
    cells = rng.choice(9, size=n_objects, replace=False)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    objects = []
    for shape, color, cell in zip(shapes, colors, cells, strict=True):
        size = int(rng.integers(20, 27))
        x0 = int(cell % 3) * CELL + int(rng.integers(2, CELL - size - 1))
        y0 = int(cell // 3) * CELL + int(rng.integers(2, CELL - size - 1))
        box = (x0, y0, x0 + size - 1, y0 + size - 1)
        _draw(draw, str(shape), box, COLORS[str(color)])
        objects.append(ShapeObject(str(shape), str(color), box))
    return Scene(image, tuple(objects))


def make_scenes(n: int, seed: int) -> list[Scene]:
    """Scenes ``0..n-1`` for ``seed`` (scene ``i`` is independent of ``n``)."""
    return [make_scene(_rng(seed, _SCENE_STREAM, i)) for i in range(n)]


T = TypeVar("T")


def _pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    return options[int(rng.integers(len(options)))]


def pope_question(scene: Scene, answer: str, category: str, rng: np.random.Generator) -> str:
    """A POPE question about one object; ``answer`` says whether that object is present.

    ``adversarial`` questions always name a colour; their negatives are absent pairs sharing the shape or
    the colour of a present object. ``random`` questions name a colour half of the time; their negatives
    are uniform over absent pairs (or absent shapes).
    """
    with_color = category == "adversarial" or bool(rng.integers(2))
    present = sorted(scene.pairs)
    if answer == "yes":
        shape, color = _pick(rng, present)
        color = color if with_color else None
    elif not with_color:
        shape, color = _pick(rng, sorted(set(SHAPES) - {s for s, _ in present})), None
    else:
        absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in scene.pairs]
        if category == "adversarial":
            absent = [(s, c) for s, c in absent if any(s == ps or c == pc for ps, pc in present)]
        shape, color = _pick(rng, absent)
    return f"Is there a {shape} in the image?" if color is None else f"Is there a {color} {shape} in the image?"


def make_pope_rows(n: int, seed: int) -> list[dict]:
    """``n`` POPE-format rows, one question per scene; exactly balanced yes/no x adversarial/random for n % 4 == 0."""
    combos = [(("yes", "no")[i % 2], ("adversarial", "random")[i // 2 % 2]) for i in range(n)]
    order = np.random.default_rng([seed, _POPE_STREAM]).permutation(n)
    rows = []
    for i, scene in enumerate(make_scenes(n, seed)):
        answer, category = combos[int(order[i])]
        question = pope_question(scene, answer, category, _rng(seed, _POPE_STREAM, i))
        rows.append(
            {
                "question_id": f"pope_s{seed}_{i:05d}",
                "question": question,
                "answer": answer,
                "image": scene.image,
                "image_source": f"shapes_s{seed}_{i:05d}",
                "category": category,
            }
        )
    return rows


def color_question(shape: str) -> str:
    """The question of the colour task about the object of shape ``shape`` (shapes are unique within a scene)."""
    return f"What colour is the {shape}?"


def make_color_rows(n: int, seed: int) -> list[dict]:
    """``n`` rows asking the colour of one object of scene ``i`` (its shape and colour are unique there)."""
    rows = []
    for i, scene in enumerate(make_scenes(n, seed)):
        obj = _pick(_rng(seed, _COLOR_STREAM, i), list(scene.objects))
        rows.append(
            {
                "question_id": f"color_s{seed}_{i:05d}",
                "question": color_question(obj.shape),
                "answer": obj.color,
                "image": scene.image,
                "image_source": f"shapes_s{seed}_{i:05d}",
                "category": "color",
                "shape": obj.shape,
            }
        )
    return rows


def describe(scene: Scene) -> str:
    """The scene in words, objects in drawing order: ``The picture shows a red circle and a blue star.``"""
    names = [f"a {o.color} {o.shape}" for o in scene.objects]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" and {names[-1]}"
    return f"The picture shows {listed}."


def make_text_rows(n: int, seed: int) -> list[dict]:
    """The colour rows of :func:`make_color_rows` (same scenes, same asked object) with the scene described in
    words instead of drawn: text tasks for text LLMs (lm-eval), whose answer is in the context."""
    return [
        {
            "question_id": row["question_id"].replace("color_", "text_"),
            "description": describe(scene),
            "question": row["question"],
            "answer": row["answer"],
            "shape": row["shape"],
        }
        for scene, row in zip(make_scenes(n, seed), make_color_rows(n, seed), strict=True)
    ]


ROW_MAKERS = {"pope": make_pope_rows, "color": make_color_rows, "text": make_text_rows}


def write_parquet(path: str | Path, n: int, seed: int, kind: str = "pope") -> Path:
    """Write ``ROW_MAKERS[kind](n, seed)`` as a parquet file with a ``datasets.Image()`` column."""
    import datasets  # heavy; only needed for writing

    rows = ROW_MAKERS[kind](n, seed)
    features = datasets.Features(
        {key: datasets.Image() if key == "image" else datasets.Value("string") for key in rows[0]}
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return path


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kind", choices=sorted(ROW_MAKERS), default="pope")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n {args.n}: give the number of rows to write (>= 1)")
    print(write_parquet(args.out, args.n, args.seed, args.kind))


if __name__ == "__main__":
    main()
