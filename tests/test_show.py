"""``lostattn show``: the last prompt token's attention over the image patches of the shipped trained model.

The scenes are the shipped tasks' scenes (generator seed 0, never trained on), regenerated to know where each object
is; the question names the scene's first object, as the POPE task asks it.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import pathlib
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from siglip_llava import siglip_llava
from transformers import LlavaForConditionalGeneration

from lmms_lostattn import tasks
from lmms_lostattn.cli import main
from lmms_lostattn.config.spec import SpecError
from lmms_lostattn.inspection import attention_maps
from lmms_lostattn.inspection.attention_maps import Inspector, load
from lmms_lostattn.model_wrappers.lmms_eval.documents import task_documents
from lmms_lostattn.models import SHAPES_LLAVA_DIR
from lmms_lostattn.models.training import PATCH_SIZE, POPE_POST_PROMPT
from lmms_lostattn.tasks.generate_shapes import Scene, ShapeObject, make_scenes

RUNS = pathlib.Path(__file__).parent / "data" / "runs"
N_SCENES = 16
GRID = 6  # 96-pixel images, 16-pixel patches; 37 image tokens with the class token
SHOWN_LAYERS = (1, 2, 3)  # layer 0 puts almost no mass on the image (about 2e-4 in all on these scenes)


def _question(obj: ShapeObject) -> str:
    return f"Is there a {obj.color} {obj.shape} in the image?{POPE_POST_PROMPT}"


def _object_patches(obj: ShapeObject) -> np.ndarray:
    """``(GRID, GRID)`` bool: the patches the object's box touches."""
    x0, y0, x1, y1 = obj.box
    starts = np.arange(GRID) * PATCH_SIZE
    rows = (starts <= y1) & (starts + PATCH_SIZE > y0)
    columns = (starts <= x1) & (starts + PATCH_SIZE > x0)
    return rows[:, None] & columns[None, :]


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return make_scenes(N_SCENES, seed=0)


@pytest.fixture(scope="module")
def learned() -> Inspector:
    return load(SHAPES_LLAVA_DIR, {})


def test_learned_attention_falls_on_the_named_object(learned: Inspector, scenes: list[Scene]) -> None:
    """Per patch, on average over the scenes, the last prompt token puts more attention on the named object's
    patches than on the rest of the image and than on the same patches mirrored through the image's centre (where
    the image is mostly blank), in each of layers 1-3; in layers 1 and 3 also more than on the scene's other objects.

    Measured on these 16 scenes (object / rest / mirrored / other objects): layer 1 0.094 / 0.0045 / 0.016 / 0.027,
    layer 2 0.033 / 0.0099 / 0.017 / 0.033 (it looks at every object alike), layer 3 0.066 / 0.0042 / 0.012 /
    0.028; layer 0 puts almost no mass on the image (about 2e-4 in all)."""
    kinds = ("named", "rest", "mirrored", "others")
    means: dict[tuple[str, int], list[float]] = {(kind, layer): [] for kind in kinds for layer in SHOWN_LAYERS}
    for scene in scenes:
        obj = scene.objects[0]
        named = _object_patches(obj)
        masks = {"named": named, "rest": ~named, "mirrored": named[::-1, ::-1]}
        others = np.any([_object_patches(o) for o in scene.objects[1:]], axis=0) & ~named
        if others.any():
            masks["others"] = others
        for layer in learned.maps(scene.image, _question(obj), SHOWN_LAYERS):
            for kind, mask in masks.items():
                means[kind, layer.layer].append(float(layer.learned[mask].mean()))
    average = {key: np.mean(values) for key, values in means.items()}
    for layer in SHOWN_LAYERS:
        assert average["named", layer] > average["rest", layer], (layer, average)
        assert average["named", layer] > average["mirrored", layer], (layer, average)
    for layer in (1, 3):
        assert average["named", layer] > average["others", layer], (layer, average)


def test_the_map_is_the_eager_attention_on_the_image_tokens(scenes: list[Scene]) -> None:
    """Closed form against a plain transformers forward: each patch holds the mean over heads of the last prompt
    token's weight on its image token (row-major after the class token), and the map plus the class token's mass
    is the attention mass on the image tokens; an unedited layer before the first edited one is unchanged, and the
    edited heads' maps are their mean."""
    inspector = load(SHAPES_LLAVA_DIR, {"attn": "gaussian", "attn_preset": "paper", "attn_layers": "1:"})
    plain = LlavaForConditionalGeneration.from_pretrained(SHAPES_LLAVA_DIR, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    obj = scenes[0].objects[0]
    inputs = inspector.inputs(scenes[0].image, _question(obj))
    with torch.no_grad():
        attentions = plain(**inputs, output_attentions=True).attentions
    image = (inputs["input_ids"][0] == plain.config.image_token_index).nonzero().flatten()
    assert image.numel() == GRID * GRID + 1
    maps = inspector.maps(scenes[0].image, _question(obj), range(4))
    for layer in maps:
        row = attentions[layer.layer][0, :, -1]
        np.testing.assert_allclose(layer.learned.flatten(), row[:, image[1:]].mean(0).numpy(), rtol=1e-5, atol=1e-7)
        mass = float(row[:, image].mean(0).sum())
        assert layer.learned.sum() + layer.class_token[0] == pytest.approx(mass, rel=1e-5)
        if layer.band_heads:
            banded = row[list(layer.band_heads)][:, image[1:]].mean(0).numpy()
            np.testing.assert_allclose(layer.band_learned.flatten(), banded, rtol=1e-5, atol=1e-7)
    assert [bool(layer.band_heads) for layer in maps] == [False, True, True, True]  # the p0.3-0.6 band of 4 heads
    np.testing.assert_allclose(maps[0].edited, maps[0].learned, rtol=1e-5, atol=1e-7)
    assert not np.allclose(maps[1].edited, maps[1].learned)


def test_a_first_patch_the_model_drops_is_drawn_at_zero(tmp_path: pathlib.Path, scenes: list[Scene]) -> None:
    """LLaVA with a SigLIP tower and the default feature selection sees every patch but the first: the map lays the
    last prompt token's weights on the other patches, row-major, and the first holds 0."""
    model, processor = siglip_llava("default")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    inspector = load(tmp_path, {})
    inputs = inspector.inputs(scenes[0].image, "Is there a circle?")
    with torch.no_grad():
        row = model(**inputs, output_attentions=True).attentions[1][0, :, -1]
    image = inputs["input_ids"][0] == model.config.image_token_index
    (layer,) = inspector.maps(scenes[0].image, "Is there a circle?", [1])
    expected = np.concatenate([[0.0], row[:, image].mean(0).numpy()])
    np.testing.assert_allclose(layer.learned.flatten(), expected, rtol=1e-5, atol=1e-7)
    assert layer.class_token == (0.0, None)


def test_knockout_leaves_no_attention_on_the_image(scenes: list[Scene]) -> None:
    inspector = load(SHAPES_LLAVA_DIR, {"attn": "knockout", "attn_layers": "all", "attn_rows": "text"})
    obj = scenes[1].objects[0]
    for layer in inspector.maps(scenes[1].image, _question(obj), range(4)):
        assert layer.learned.sum() > 0
        assert not layer.edited.any() and layer.class_token[1] == 0.0, layer.layer


@pytest.mark.parametrize("rows", ["all", "text", "last"])
def test_listed_heads_are_named_edited_whichever_rows_are_edited(scenes: list[Scene], rows: str) -> None:
    obj = scenes[0].objects[0]
    edit = {"attn": "uniform", "attn_heads": "0,1", "attn_layers": "1:", "attn_rows": rows}
    maps = load(SHAPES_LLAVA_DIR, edit).maps(scenes[0].image, _question(obj), (1, 3))
    assert [layer.band_heads for layer in maps] == [(0, 1), (0, 1)]


def test_heads_are_named_edited_only_where_the_last_prompt_token_was_edited(scenes: list[Scene]) -> None:
    """``attn_rows=image`` edits the image rows, not the last prompt token: no head is named edited on it (in the
    first edited layer its map is the learned one; later ones see the edited image tokens); ``attn_rows=last`` with
    the same band names the band's heads."""
    obj = scenes[0].objects[0]
    band = {"attn": "uniform", "attn_heads": "p0.3-0.6", "attn_layers": "1:"}
    maps = load(SHAPES_LLAVA_DIR, {**band, "attn_rows": "image"}).maps(scenes[0].image, _question(obj), (1, 3))
    np.testing.assert_allclose(maps[0].edited, maps[0].learned, rtol=1e-5, atol=1e-7)
    assert all(layer.band_heads == () and layer.band_edited is None for layer in maps)
    maps = load(SHAPES_LLAVA_DIR, {**band, "attn_rows": "last"}).maps(scenes[0].image, _question(obj), (1, 3))
    assert all(layer.band_heads for layer in maps)


@pytest.mark.parametrize(
    "settings", [{}, {"do_normalize": False}, {"do_normalize": False, "do_rescale": False}],
    ids=["normalised", "rescaled", "raw"],
)
def test_the_maps_lie_on_the_image_the_model_sees(learned: Inspector, settings: dict[str, bool]) -> None:
    """The processor resizes and centre-crops: a wide image's left end, with a red square on it, never reaches the
    model, and the figure's image is the crop (the patch grid's image), not the file; whether or not the processor
    rescales and normalises."""
    processor = copy.deepcopy(learned.processor)
    for name, value in settings.items():
        setattr(processor.image_processor, name, value)
    inspector = dataclasses.replace(learned, processor=processor)
    wide = Image.new("RGB", (3 * 96, 96), (255, 255, 255))
    wide.paste((220, 20, 20), (8, 30, 40, 62))  # a red square in the left third, cropped away
    wide.paste((20, 20, 220), (130, 30, 160, 62))  # a blue square in the middle third
    seen = np.asarray(inspector.seen_image(wide)).astype(int)
    size = learned.model.config.vision_config.image_size
    assert seen.shape == (size, size, 3)
    red = (seen[..., 0] > 150) & (seen[..., 1] < 80) & (seen[..., 2] < 80)
    blue = (seen[..., 2] > 150) & (seen[..., 0] < 80) & (seen[..., 1] < 80)
    assert not red.any() and blue.any() and (seen > 240).all(axis=-1).mean() > 0.5  # mostly the white canvas
    pixels = processor.image_processor(images=[wide], return_tensors="pt")["pixel_values"]
    again = processor.image_processor(images=[Image.fromarray(seen.astype(np.uint8))], return_tensors="pt")
    level = 1.0 if settings.get("do_rescale") is False else 0.02  # one grey level, or a little more once normalised
    torch.testing.assert_close(again["pixel_values"], pixels, atol=level, rtol=0)  # the same view, to rounding


def test_layers_outside_the_model_are_refused_by_name_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights loaded before the refusal")

    monkeypatch.setattr(attention_maps.AutoModelForImageTextToText, "from_pretrained", no_weights)
    with pytest.raises(SpecError, match=r"--layers='7' is not valid; .*this model has layers 0-3"):
        load(SHAPES_LLAVA_DIR, {}, layers="7")


def test_a_family_without_one_token_per_patch_is_refused_before_loading(
    tiny_llava_next, monkeypatch, capsys, tmp_path
) -> None:
    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights loaded before the refusal")

    monkeypatch.setattr(attention_maps.AutoModelForImageTextToText, "from_pretrained", no_weights)
    with pytest.raises(SpecError, match=r"llava_next \(family llava\).*supported model types: llava \(llava\)"):
        load(tiny_llava_next, {})
    Image.new("RGB", (32, 32)).save(tmp_path / "blank.png")
    with pytest.raises(SystemExit) as stopped:
        main(["show", "--pretrained", str(tiny_llava_next), "--image", str(tmp_path / "blank.png"), "--question", "q"])
    assert stopped.value.code == 2
    assert "one image token per vision patch" in capsys.readouterr().err


def test_the_command_writes_one_png_per_document(
    tmp_path: pathlib.Path, scenes: list[Scene], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--pretrained", str(SHAPES_LLAVA_DIR), "--model_args", "attn=gaussian,attn_preset=paper,attn_layers=1:",
            "--layers", "1,3", "-o", str(tmp_path / "out")]
    for index, scene in enumerate(scenes[:2]):
        scene.image.save(tmp_path / f"scene{index}.png")
        argv += ["--image", str(tmp_path / f"scene{index}.png"), "--question", _question(scene.objects[0])]
    code, out, err = _show(capsys, *argv)
    assert code == 0, err[-3000:]
    written = sorted((tmp_path / "out").glob("*.png"))
    assert [path.name for path in written] == ["00_scene0.png", "01_scene1.png"]
    assert out.split() == [str(path) for path in written]
    for path in written:
        with Image.open(path) as figure:
            assert figure.width > 600 and figure.height > 400


def _show(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["show", *argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_task_documents_are_the_task_s_own_image_and_question() -> None:
    """Read against the shipped data file itself: document 3's image bytes and question."""
    frame = pd.read_parquet(pathlib.Path(tasks.__file__).parent / "data" / "lostattn_pope.parquet")
    (document,) = task_documents("lostattn_pope", [3])
    with Image.open(io.BytesIO(frame.iloc[3]["image"]["bytes"])) as stored:
        assert np.array_equal(np.asarray(document.image), np.asarray(stored.convert("RGB")))
    assert document.text.startswith(frame.iloc[3]["question"]) and document.text.endswith(POPE_POST_PROMPT.strip())


def test_the_command_draws_a_task_s_documents(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _show(capsys, "--pretrained", str(SHAPES_LLAVA_DIR), "--task", "lostattn_pope", "--doc-ids",
                           "0,3", "--layers", "3", "-o", str(tmp_path))  # fmt: skip
    assert code == 0, err
    assert out.split() == [str(tmp_path / "00_lostattn_pope_0.png"), str(tmp_path / "01_lostattn_pope_3.png")]


def test_the_command_draws_a_run_s_documents_with_its_intervention(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run's model, its attn* arguments (the edited map beside the learned one; the host's attn_implementation
    and a device map with commas inside braces, read as lmms-eval reads them, left out) and every task of the run."""
    run = pathlib.Path(shutil.copytree(RUNS / "gaussian", tmp_path / "run"))
    (results,) = run.rglob("*_results.json")
    raw = json.loads(results.read_text())
    pretrained = raw["config"]["model_args"].split(",")[0]
    model_args = raw["config"]["model_args"].replace(pretrained, f"pretrained={SHAPES_LLAVA_DIR}")
    raw["config"]["model_args"] = f'{model_args},attn_implementation=sdpa,device_map={{"":"cpu","vision":"cpu"}}'
    results.write_text(json.dumps(raw))
    code, out, err = _show(capsys, "--run", str(run), "--doc-ids", "1", "--layers", "3", "-o", str(tmp_path / "out"))
    assert code == 0, err
    names = [pathlib.Path(path).name for path in out.split()]
    assert names == ["00_lostattn_pope_1.png", "01_lostattn_shapes_color_1.png"]
    with Image.open(tmp_path / "out" / names[0]) as edited, Image.open(_learned_only(tmp_path, capsys)) as learned:
        assert edited.width > learned.width  # a column of edited maps beside the learned ones


def _learned_only(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> pathlib.Path:
    code, out, err = _show(capsys, "--pretrained", str(SHAPES_LLAVA_DIR), "--task", "lostattn_pope", "--doc-ids", "1",
                           "--layers", "3", "-o", str(tmp_path / "learned"))  # fmt: skip
    assert code == 0, err
    return pathlib.Path(out.split()[0])


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--task", "lostattn_pope", "--doc-ids", "500"], "lostattn_pope has documents 0-199; no document 500"),
        (["--task", "lostattn_pope", "--doc-ids", "one"], "--doc-ids 'one': give document ids"),
        (["--task", "nosuch_task"], "no lmms-eval task 'nosuch_task'"),
        (["--task", "lostattn_pope", "--image", "x.png", "--question", "q"], "give the documents one way"),
        ([], "give the documents one way: --image/--question, --task or --run (got none)"),
        (["--task", "lostattn_pope", "--model_args", "attn=gaussian,stats=paper"],
         "--model_args stats: show draws attention maps and takes only the attn* arguments"),
    ],
)
def test_documents_that_cannot_be_drawn_are_refused(
    argv: list[str], says: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _show(capsys, "--pretrained", str(SHAPES_LLAVA_DIR), *argv, "-o", str(tmp_path))
    assert code == 2 and says in err.strip().splitlines()[-1], err
    assert not list(tmp_path.glob("*.png"))


def test_a_checkpoint_of_a_model_type_transformers_does_not_know_is_refused(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text('{"model_type": "no_such_model"}')
    Image.new("RGB", (32, 32)).save(tmp_path / "scene.png")
    code, _, err = _show(capsys, "--pretrained", str(tmp_path / "ckpt"), "--image", str(tmp_path / "scene.png"),
                         "--question", "q", "-o", str(tmp_path / "out"))
    assert code == 2 and "Traceback" not in err and "no_such_model" in err.strip().splitlines()[-1], err


def test_only_the_command_line_imports_the_inspection_folder() -> None:
    """It runs a model for a picture; no run, host glue or report depends on it."""
    package = pathlib.Path(attention_maps.__file__).resolve().parents[1]
    importers = [
        path.relative_to(package).as_posix()
        for path in package.rglob("*.py")
        if path.relative_to(package).parts[0] not in ("inspection", "cli")
        and "lmms_lostattn.inspection" in path.read_text()
    ]
    assert importers == []
