"""``shapes-llava``: a small LLaVA-1.5-architecture model trained from scratch on the package's synthetic shape scenes.

Unlike the random-weight tiny models of :mod:`lmms_lostattn.testing`, this one answers from the image (POPE-format
presence questions and colour questions about the scenes of :mod:`lmms_lostattn.tasks.generate_shapes`), so cutting
its attention to the image has a visible effect. The trained weights ship in :data:`SHAPES_LLAVA_DIR` with a model
card (``README.md``) and load like any LLaVA checkpoint: ``lmms-eval --model lostattn_llava
--model_args pretrained=$(lostattn shapes-llava-path)``.

Data streams never overlap: the shipped tasks show scenes of generator seed 0, validation uses seed
:data:`VALIDATION_SEED`, and batch ``b`` of training stage ``stage`` draws scene ``j`` from
``numpy.random.default_rng([TRAIN_SEED, stage, b, j])`` (numpy pads a seed list with zeros, so no task or validation
set may use generator seed :data:`TRAIN_SEED`: its scene ``i`` is stage 0's batch ``i``, scene 0).
``python -m lmms_lostattn.models.training --out DIR`` reproduces the shipped model bit for bit on the same machine
and torch version (fixed seeds, one thread, under 30 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from lmms_lostattn.models import SHAPES_LLAVA_DIR
from lmms_lostattn.tasks.generate_shapes import (
    CELL,
    COLORS,
    IMAGE_SIZE,
    SHAPES,
    Scene,
    ShapeObject,
    color_question,
    make_color_rows,
    make_pope_rows,
    make_scene,
    pope_question,
)
from lmms_lostattn.testing import CORPUS, build_tokenizer, llava_config_and_processor

__all__ = ["SHAPES_LLAVA_DIR", "TrainConfig", "accuracy", "build_untrained", "prompt", "train"]

POPE_POST_PROMPT = "\nAnswer the question using a single word or phrase."  # lmms-eval's pope.yaml default
COLOR_POST_PROMPT = " Answer with one word."  # lostattn_shapes_color.yaml
# Training-only prompts. Captions supervise densely what the image shows. "Repeat" questions (the task's question after
# REPEAT_PREFIX, answered with its object words) teach the last prompt token to read the question at the task's own
# offsets: a decoder trained from scratch gets no first-order signal for that from POPE/colour answers, which depend on
# question and image jointly, and its attention settles on the image tokens first.
CAPTION_QUESTION = "List the objects in the image."
REPEAT_PREFIX = "Repeat the object. "
TRAIN_SEED = 1
_VISION_STAGE, _QA_STAGE = 0, 1
VALIDATION_SEED = 2
PATCH_SIZE = 16

# The task words, so that each is one or two tokens of the small BPE vocabulary.
_TASK_CORPUS = "\n".join(
    [f"USER: Is there a {c} {s} in the image?{POPE_POST_PROMPT} ASSISTANT: Yes" for s in SHAPES for c in COLORS]
    + [f"USER: Is there a {s} in the image?{POPE_POST_PROMPT} ASSISTANT: No" for s in SHAPES]
    + [f"USER: {color_question(s)}{COLOR_POST_PROMPT} ASSISTANT: {c}" for s in SHAPES for c in COLORS]
    + [f"USER: {CAPTION_QUESTION} ASSISTANT: {c} {s}, {c} {s}" for s in SHAPES for c in COLORS]
    + [f"USER: {REPEAT_PREFIX}Is there a {c} {s} in the image? ASSISTANT: {c} {s}" for s in SHAPES for c in COLORS]
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights (with the code)."""

    vision_steps: int = 600
    steps: int = 3000
    batch_size: int = 48
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    color_fraction: float = 0.25
    caption_fraction: float = 0.15
    repeat_fraction: float = 0.15
    reading_steps: int = 200
    seed: int = 0
    eval_every: int = 1000
    eval_rows: int = 400


def build_untrained(seed: int = 0):
    """``(model, processor)``: the randomly initialised shapes-llava (CLIP 96 px / 16 px patches, 2 layers of width
    96; Llama decoder of 4 layers, width 128, 4 heads; 37 image tokens: the class token and 36 patches)."""
    from transformers import LlavaForConditionalGeneration

    tokenizer = build_tokenizer(corpus=CORPUS + _TASK_CORPUS)
    vision = dict(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=96,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    text = dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    config, processor = llava_config_and_processor(
        tokenizer, vision=vision, text=text, select_strategy="full", feature_layer=-1
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).to(torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor


def prompt(processor, text: str) -> str:
    """The prompt lmms-eval's chat ``llava_hf`` builds for one image followed by ``text``."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def caption(scene: Scene) -> str:
    """The training caption of a scene: its objects in reading order, e.g. ``red circle, blue star``."""
    ordered = sorted(scene.objects, key=lambda o: (o.box[1] // CELL, o.box[0] // CELL))
    return ", ".join(f"{o.color} {o.shape}" for o in ordered)


def named_object(question: str) -> str:
    """The object words of a POPE-format or colour question (``red circle``, ``star``)."""
    words = question.rstrip("?").split()
    return " ".join(w for w in words if w in COLORS or w in SHAPES)


def _training_examples(config: TrainConfig, step: int) -> list[tuple[Image.Image, str, str]]:
    """``(image, prompt text, answer)`` of training batch ``step`` on new scenes: POPE-format, colour, caption and
    repeat questions in the proportions of ``config`` (repeat questions only, during the first ``reading_steps``)."""
    reading = step < config.reading_steps
    examples = []
    for j in range(config.batch_size):
        rng = np.random.default_rng([TRAIN_SEED, _QA_STAGE, step, j])
        scene = make_scene(rng)
        kind = rng.random()
        if kind < config.caption_fraction and not reading:
            examples.append((scene.image, CAPTION_QUESTION, caption(scene)))
            continue
        if kind < config.caption_fraction + config.color_fraction:
            obj = scene.objects[int(rng.integers(len(scene.objects)))]
            question, post_prompt, answer = color_question(obj.shape), COLOR_POST_PROMPT, obj.color
        else:
            yes_no = ("yes", "no")[int(rng.integers(2))]
            category = ("adversarial", "random")[int(rng.integers(2))]
            question, post_prompt = pope_question(scene, yes_no, category, rng), POPE_POST_PROMPT
            answer = yes_no.capitalize()
        if rng.random() < config.repeat_fraction or reading:
            question, answer = REPEAT_PREFIX + question, named_object(question)
        examples.append((scene.image, question + post_prompt, answer))
    return examples


def training_batch(processor, examples: Sequence[tuple[Image.Image, str, str]]) -> dict[str, torch.Tensor]:
    """Model inputs with ``labels`` on the answer and the end-of-sequence token only (right padding)."""
    tokenizer = processor.tokenizer
    images, texts, answers = zip(*examples, strict=True)
    encoded = processor(images=list(images), text=[prompt(processor, t) for t in texts], return_tensors="pt",
                        padding=True)
    rows, labels = [], []
    for ids, mask, answer in zip(encoded["input_ids"], encoded["attention_mask"], answers, strict=True):
        target = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        prefix = ids[mask.bool()].tolist()
        rows.append(prefix + target)
        labels.append([-100] * len(prefix) + target)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([r + [-100] * (width - len(r)) for r in labels]),
        "pixel_values": encoded["pixel_values"],
    }


@torch.no_grad()
def answers(model, processor, rows: Sequence[dict], post_prompt: str, batch_size: int = 64) -> list[str]:
    """Greedy answers (as lmms-eval scores them: decoded, stripped, lower-cased) to task rows."""
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    predictions = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = processor(
                images=[row["image"].convert("RGB") for row in chunk],
                text=[prompt(processor, row["question"] + post_prompt) for row in chunk],
                return_tensors="pt",
                padding=True,
            )
            out = model.generate(**batch, max_new_tokens=4, do_sample=False)
            decoded = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            predictions += [text.strip().lower() for text in decoded]
    finally:
        tokenizer.padding_side = side
    return predictions


def accuracy(model, processor, rows: Sequence[dict], post_prompt: str) -> float:
    """Fraction of rows whose greedy answer equals ``row["answer"]`` (case-insensitive)."""
    predicted = answers(model, processor, rows, post_prompt)
    return sum(p == row["answer"].lower() for p, row in zip(predicted, rows, strict=True)) / len(rows)


def validation_accuracy(model, processor, n: int) -> dict[str, float]:
    """Validation accuracy on ``n`` POPE-format and ``n // 2`` colour rows of :data:`VALIDATION_SEED` scenes (drawn
    apart from training, though some scenes recur there by chance: see the model card)."""
    was_training = model.training
    model.eval()
    result = {
        "pope": accuracy(model, processor, make_pope_rows(n, VALIDATION_SEED), POPE_POST_PROMPT),
        "color": accuracy(model, processor, make_color_rows(n // 2, VALIDATION_SEED), COLOR_POST_PROMPT),
    }
    model.train(was_training)
    return result


def _object_class(obj: ShapeObject) -> int:
    """``shape_index * len(COLORS) + colour_index``: the class of a (shape, colour) object, 0..24."""
    return SHAPES.index(obj.shape) * len(COLORS) + list(COLORS).index(obj.color)


def patch_targets(scene: Scene) -> torch.Tensor:
    """``(P,)`` class per image patch (row-major): ``1 + shape_index * len(COLORS) + colour_index`` of the object in
    the patch's grid cell, 0 where the cell is empty (a patch lies in one cell: ``CELL`` is a multiple of it)."""
    grid = IMAGE_SIZE // PATCH_SIZE
    cells = torch.zeros(3, 3, dtype=torch.long)
    for obj in scene.objects:
        cells[obj.box[1] // CELL, obj.box[0] // CELL] = 1 + _object_class(obj)
    per_cell = CELL // PATCH_SIZE
    return cells.repeat_interleave(per_cell, dim=0).repeat_interleave(per_cell, dim=1).reshape(grid * grid)


def scene_targets(scene: Scene) -> torch.Tensor:
    """``(len(SHAPES) * len(COLORS),)`` multi-hot of the (shape, colour) objects present, indexed as in
    :func:`patch_targets` (minus one)."""
    present = torch.zeros(len(SHAPES) * len(COLORS))
    for obj in scene.objects:
        present[_object_class(obj)] = 1.0
    return present


def pretrain_vision(model, processor, config: TrainConfig, log: Callable[[str], None] = print) -> None:
    """Stage 1 (stands in for a pretrained vision encoder): train the vision tower alone, through linear heads that are
    discarded after, to tell at every patch which (shape, colour) object sits in that patch's grid cell, and at the
    class token which objects the whole scene holds."""
    width, classes = model.config.vision_config.hidden_size, len(SHAPES) * len(COLORS)
    patch_head, scene_head = torch.nn.Linear(width, 1 + classes), torch.nn.Linear(width, classes)
    params = [*model.model.vision_tower.parameters(), *patch_head.parameters(), *scene_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay)
    start, losses = time.perf_counter(), []
    for step in range(config.vision_steps):
        scenes = [make_scene(np.random.default_rng([TRAIN_SEED, _VISION_STAGE, step, j]))
                  for j in range(config.batch_size)]
        pixels = processor.image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"]
        features = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
        local = torch.nn.functional.cross_entropy(
            patch_head(features[:, 1:]).flatten(0, 1), torch.stack([patch_targets(s) for s in scenes]).flatten()
        )
        overall = torch.nn.functional.binary_cross_entropy_with_logits(
            scene_head(features[:, 0]), torch.stack([scene_targets(s) for s in scenes])
        )
        loss = local + overall
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            log(f"vision step {step + 1}/{config.vision_steps} loss {np.mean(losses[-50:]):.4f} "
                f"{time.perf_counter() - start:.0f}s")


def train(out: pathlib.Path, config: TrainConfig = TrainConfig(), log: Callable[[str], None] = print) -> dict:
    """Train from scratch, save a ``from_pretrained`` directory in ``out`` and return the training summary (also
    written to ``out/training.json``)."""
    torch.manual_seed(config.seed)
    model, processor = build_untrained(config.seed)
    model.train()
    pretrain_vision(model, processor, config, log)
    model.model.vision_tower.requires_grad_(False)  # stage 2 trains projector and decoder, as LLaVA does
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay)

    def schedule(step: int) -> float:  # linear warm-up, then cosine decay to 0
        if step < config.warmup:
            return (step + 1) / config.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - config.warmup) / max(1, config.steps - config.warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    start, history, losses = time.perf_counter(), [], []
    for step in range(config.steps):
        loss = model(**training_batch(processor, _training_examples(config, step))).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        done = step + 1
        if done % 50 == 0 or done == config.steps:
            log(f"step {done}/{config.steps} loss {np.mean(losses[-50:]):.4f} {time.perf_counter() - start:.0f}s")
        if done % config.eval_every == 0 or done == config.steps:
            scores = validation_accuracy(model, processor, config.eval_rows)
            history.append({"step": done, **scores})
            log(f"step {done}: validation accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    summary = {
        "config": asdict(config),
        "seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "final_loss": float(np.mean(losses[-50:])),
        "validation": history,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: ``python -m lmms_lostattn.models.training --out DIR``."""
    parser = argparse.ArgumentParser(description="Train shapes-llava from scratch (fixed seeds).")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the shipped run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train(args.out, TrainConfig(steps=args.steps))


if __name__ == "__main__":
    main()
