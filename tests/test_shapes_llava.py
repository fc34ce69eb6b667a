"""The shipped trained model (shapes-llava): it sees, and the interventions have the effects they should.

Held-out data: the shipped tasks' scenes (generator seed 0) are never trained on (training draws other seeds).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from cli_helpers import OFFLINE, pope_argv, results_of, run_cli_batch, run_error
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from lmms_lostattn.config.spec import InterventionSpec
from lmms_lostattn.families import adapter_for
from lmms_lostattn.intervention.priors import vision_attention_prior
from lmms_lostattn.intervention.scope import intervene
from lmms_lostattn.models import training as shapes_llava
from lmms_lostattn.models.training import (
    COLOR_POST_PROMPT,
    POPE_POST_PROMPT,
    SHAPES_LLAVA_DIR,
    TrainConfig,
    answers,
    patch_targets,
)
from lmms_lostattn.tasks.generate_shapes import COLORS, SHAPES, make_color_rows, make_pope_rows, make_scene

N_ROWS = 200  # the shipped lostattn_pope rows (seed 0)


@pytest.fixture(scope="module")
def shipped():
    model = LlavaForConditionalGeneration.from_pretrained(SHAPES_LLAVA_DIR, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(SHAPES_LLAVA_DIR)


@pytest.fixture(scope="module")
def pope_rows():
    return make_pope_rows(N_ROWS, seed=0)


def _accuracy(predictions: list[str], rows: list[dict]) -> float:
    return sum(p == row["answer"] for p, row in zip(predictions, rows, strict=True)) / len(rows)


def _one_prompt(processor, row: dict) -> dict:
    prompt = shapes_llava.prompt(processor, row["question"] + POPE_POST_PROMPT)
    return processor(images=[row["image"]], text=[prompt], return_tensors="pt")


@contextlib.contextmanager
def _eager(model):
    """The whole model on eager attention (which returns the weights), sdpa again after."""
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")


def _scoped(model, **args: str):
    adapter = adapter_for(model.config)
    text = model.config.text_config
    intervention = InterventionSpec.from_model_args(args).resolve(
        text.num_hidden_layers, text.num_attention_heads, adapter.preset(model.config)
    )
    return intervene(model, intervention, adapter)


@pytest.fixture(scope="module")
def learned(shipped, pope_rows):
    model, processor = shipped
    return answers(model, processor, pope_rows, POPE_POST_PROMPT)


def test_shipped_files_are_small_and_documented():
    weights = SHAPES_LLAVA_DIR / "model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20
    assert any(key.startswith("vision_tower.") for key in load_file(weights))
    card = (SHAPES_LLAVA_DIR / "README.md").read_text()
    training = json.loads((SHAPES_LLAVA_DIR / "training.json").read_text())
    assert training["config"]["seed"] == TrainConfig().seed
    for heading in ("## Data", "## Training", "## Accuracy", "## What it is not", "## Residual statistics"):
        assert heading in card


def test_no_shipped_task_is_drawn_from_the_training_or_validation_stream():
    """numpy pads a seed list with zeros, so scene i of generator seed s, ``default_rng([s, 0, i])``, is training scene
    0 of vision-stage batch i, ``default_rng([TRAIN_SEED, 0, i, 0])``, when s is TRAIN_SEED: every shipped parquet is
    made with another seed than training and validation (its question ids name it), and none of its images is that
    scene. (Equal scenes drawn by chance from different streams remain: the model card counts them.)"""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from lmms_lostattn.tasks import DATA_DIR

    for name in ("lostattn_pope", "lostattn_shapes_color"):
        rows = pq.read_table(DATA_DIR / f"{name}.parquet").to_pylist()
        seeds = {int(re.search(r"_s(\d+)_", row["question_id"]).group(1)) for row in rows}
        assert seeds.isdisjoint({shapes_llava.TRAIN_SEED, shapes_llava.VALIDATION_SEED}), (name, seeds)
        shipped = {np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")).tobytes() for row in rows}
        for step in range(len(rows)):
            scene = make_scene(np.random.default_rng([shapes_llava.TRAIN_SEED, shapes_llava._VISION_STAGE, step, 0]))
            assert np.asarray(scene.image.convert("RGB")).tobytes() not in shipped, (name, step)


def test_prompts_match_lmms_eval_tasks():
    import yaml
    from lmms_eval.tasks.pope import utils  # noqa: F401  (the task's module must import)

    from lmms_lostattn.tasks import TEMPLATE_DIR, pope_yaml_path

    pope = pope_yaml_path().read_text()
    assert json.dumps(POPE_POST_PROMPT) in pope.replace("'", '"')
    color = yaml.safe_load(
        re.sub(r"!function \S+", "fn", (TEMPLATE_DIR / "lostattn_shapes_color.yaml").read_text())
    )
    assert color["lmms_eval_specific_kwargs"]["default"]["post_prompt"] == COLOR_POST_PROMPT


def test_sees_the_image_on_held_out_scenes(shipped, learned, pope_rows):
    model, processor = shipped
    assert _accuracy(learned, pope_rows) >= 0.9
    colour_rows = make_color_rows(100, seed=0)
    assert _accuracy(answers(model, processor, colour_rows, COLOR_POST_PROMPT), colour_rows) >= 0.9


def test_attn_none_keeps_every_answer(shipped, learned, pope_rows):
    model, processor = shipped
    with _scoped(model, attn="none"):
        assert answers(model, processor, pope_rows, POPE_POST_PROMPT) == learned


def test_knocking_out_every_image_key_drops_to_chance(shipped, learned, pope_rows):
    model, processor = shipped
    with _scoped(model, attn="knockout", attn_layers="all", attn_rows="text") as scope:
        cut = answers(model, processor, pope_rows, POPE_POST_PROMPT)
        scope.raise_pending()
    assert abs(_accuracy(cut, pope_rows) - 0.5) <= 0.1
    assert cut != learned


def test_uniform_in_one_layer_edits_that_layer_only(shipped, pope_rows):
    """probs-space uniform over image keys in layer 2, last row: layers 0-1 keep every weight; layer 2 changes only its
    last row, which becomes uniform over the image keys with the learned image mass; later layers differ only in rows
    that can see that row's output (the last one)."""
    model, processor = shipped
    row = pope_rows[0]
    batch = _one_prompt(processor, row)
    image = batch["input_ids"][0] == model.config.image_token_index
    with _eager(model), torch.no_grad():
        before = model(**batch, output_attentions=True).attentions
        with _scoped(model, attn="uniform", attn_layers="2"):
            after = model(**batch, output_attentions=True).attentions
    for layer in (0, 1):
        torch.testing.assert_close(after[layer], before[layer], rtol=0, atol=0)
    torch.testing.assert_close(after[2][..., :-1, :], before[2][..., :-1, :], rtol=0, atol=0)
    last_before, last_after = before[2][0, :, -1], after[2][0, :, -1]
    mass = last_before[:, image].sum(-1, keepdim=True)
    torch.testing.assert_close(last_after[:, image], (mass / int(image.sum())).expand(-1, int(image.sum())))
    torch.testing.assert_close(last_after[:, ~image], last_before[:, ~image])
    assert not torch.allclose(last_before[:, image], last_after[:, image])
    for layer in range(3, len(before)):
        torch.testing.assert_close(after[layer][..., :-1, :], before[layer][..., :-1, :], rtol=0, atol=0)
        assert not torch.equal(after[layer][..., -1, :], before[layer][..., -1, :])


def test_image_priors_give_the_class_token_no_mass(shipped, pope_rows):
    """shapes-llava keeps CLIP's class token as the first of its image tokens (select strategy ``full``): the
    vision-attention prior covers the 36 patch tokens, in order, and the class token gets none (probs space, lambda 1,
    layer 0, last row); the prior is computed here from the tower's own eager attention weights."""
    model, processor = shipped
    row = pope_rows[0]
    batch = _one_prompt(processor, row)
    image = batch["input_ids"][0] == model.config.image_token_index
    with _eager(model), torch.no_grad():
        vision = model.model.vision_tower(batch["pixel_values"], output_attentions=True).attentions[-1]
        with _scoped(model, attn="vision_attention", attn_space="probs", attn_layers="0"):
            weights = model(**batch, output_attentions=True).attentions[0][0, :, -1]
    on_image = weights[:, image]
    assert on_image.shape[1] == 37 and torch.equal(on_image[:, 0], torch.zeros(on_image.shape[0]))
    prior = vision_attention_prior(vision, first=1)[0]
    torch.testing.assert_close(on_image[:, 1:] / on_image.sum(-1, keepdim=True), prior.expand(on_image.shape[0], -1))


@pytest.mark.cli
def test_image_priors_run_through_lmms_eval(tmp_path):
    """Both released priors with the paper preset (LLaVA: p rescaled to the scores) on shapes-llava, through the
    lmms-eval command line."""
    base = f"pretrained={SHAPES_LLAVA_DIR},device=cpu,device_map=cpu,dtype=float32,attn_preset=paper,attn_layers=1:"
    runs = {mode: tmp_path / mode for mode in ("vision_attention", "complexity")}
    run_cli_batch([pope_argv("lostattn_llava", f"{base},attn={mode}", out) for mode, out in runs.items()], tmp_path)
    for mode, out in runs.items():
        assert not run_error(out), run_error(out)
        results = results_of(out)
        assert "pope_accuracy,none" in results["results"]["lostattn_pope"]
        assert results["lostattn"]["intervention"]["mode"] == mode
        assert results["lostattn"]["intervention"]["scale"] == "scores"


def test_patch_targets_mark_each_object_cell():
    scene = make_scene(np.random.default_rng([7, 7]))
    targets = patch_targets(scene).reshape(6, 6)  # 96 px / 16 px patches; each 32 px cell is 2 x 2 patches
    for obj in scene.objects:
        row, col = obj.box[1] // 32, obj.box[0] // 32
        for label in targets[2 * row : 2 * row + 2, 2 * col : 2 * col + 2].flatten().tolist():
            assert (SHAPES[(label - 1) // len(COLORS)], list(COLORS)[(label - 1) % len(COLORS)]) == obj[:2]
    assert int((targets > 0).sum()) == 4 * len(scene.objects)


def test_training_is_reproducible(tmp_path):
    config = TrainConfig(vision_steps=2, steps=2, batch_size=4, warmup=1, eval_every=2, eval_rows=4)
    first = shapes_llava.train(tmp_path / "a", config, log=lambda _: None)
    second = shapes_llava.train(tmp_path / "b", config, log=lambda _: None)
    assert first["final_loss"] == second["final_loss"]
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    trained = LlavaForConditionalGeneration.from_pretrained(tmp_path / "a").state_dict()
    untrained = shapes_llava.build_untrained(config.seed)[0].state_dict()
    changed = [k for k in trained if not torch.equal(trained[k], untrained[k])]
    assert any("vision_tower" in k for k in changed) and any("language_model" in k for k in changed)


@pytest.mark.cli
def test_demo_compares_runs_through_lmms_eval(tmp_path, learned, pope_rows):
    """The README's main job: four lmms-eval runs, one table, the report; learned attention scores what the model
    scores outside lmms-eval (same prompts), and knocking out the image costs accuracy."""
    limit = 30
    done = subprocess.run([sys.executable, "-m", "lmms_lostattn", "demo", "--limit", str(limit), "--output",
                           str(tmp_path)], env={**os.environ, **OFFLINE}, capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = {}
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[0].startswith("lostattn_"):
            table[cells[1]] = dict(zip(("learned", "gaussian", "uniform", "knockout"), cells[2:], strict=True))
    assert float(table["pope_accuracy"]["learned"]) == pytest.approx(_accuracy(learned[:limit], pope_rows[:limit]))
    assert float(table["pope_accuracy"]["knockout"]) <= float(table["pope_accuracy"]["learned"]) - 0.2
    assert float(table["exact_match"]["knockout"]) <= float(table["exact_match"]["learned"]) - 0.4
    for metric in ("lostattn_rid_attn", "lostattn_rid_ffn", "lostattn_mixig_attn", "lostattn_mixig_ffn"):
        assert all(value != "n/a" for value in table[metric].values())
    assert (tmp_path / "report" / "modules.md").is_file()
    assert (tmp_path / "compare" / "leaderboard.html").is_file()
