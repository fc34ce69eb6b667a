"""Tests of the shape generator, the shipped parquet files and the lostattn lmms-eval tasks."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lmms_lostattn.tasks import DATA_DIR, pope_yaml_path, tasks_path
from lmms_lostattn.tasks.generate_shapes import (
    COLORS,
    POPE_COLUMNS,
    SHAPES,
    make_color_rows,
    make_pope_rows,
    make_scenes,
    write_parquet,
)
from lmms_lostattn.tasks.generate_shapes import main as generate_shapes_main

POPE_PARQUET = DATA_DIR / "lostattn_pope.parquet"
COLOR_PARQUET = DATA_DIR / "lostattn_shapes_color.parquet"
POPE_METRICS = ["pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio"]
QUESTION = re.compile(r"Is there a (?:(\w+) )?(\w+) in the image\?")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _pixels(image: Image.Image | dict) -> np.ndarray:
    if isinstance(image, dict):  # parquet cell of a datasets.Image() column
        image = Image.open(io.BytesIO(image["bytes"]))
    return np.asarray(image.convert("RGB"))


def _read(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _assert_same_rows(actual: list[dict], expected: list[dict]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got.keys() == want.keys()
        assert {k: v for k, v in got.items() if k != "image"} == {k: v for k, v in want.items() if k != "image"}
        np.testing.assert_array_equal(_pixels(got["image"]), _pixels(want["image"]))


@pytest.fixture
def offline_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """Offline hub settings and a private datasets cache, also for subprocesses."""
    env = {**OFFLINE_ENV, "LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "hf_datasets")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tasks_path(tmp_path_factory.mktemp("lostattn_cache"))


# --- generator ----------------------------------------------------------------------------------------------


def test_generator_is_deterministic() -> None:
    _assert_same_rows(make_pope_rows(12, 3), make_pope_rows(12, 3))
    _assert_same_rows(make_color_rows(6, 3), make_color_rows(6, 3))
    assert [s.objects for s in make_scenes(5, 3)] == [s.objects for s in make_scenes(10, 3)[:5]]
    assert [s.objects for s in make_scenes(5, 3)] != [s.objects for s in make_scenes(5, 4)]


def test_scene_pixels_match_objects() -> None:
    for scene in make_scenes(50, 0):
        assert scene.image.size == (96, 96)
        assert 1 <= len(scene.objects) <= 3
        assert len({o.shape for o in scene.objects}) == len({o.color for o in scene.objects}) == len(scene.objects)
        pixels = _pixels(scene.image)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            assert tuple(pixels[(y0 + y1) // 2, (x0 + x1) // 2]) == COLORS[obj.color], obj
        drawn = {tuple(c) for c in pixels.reshape(-1, 3)} - {(255, 255, 255)}
        assert drawn == {COLORS[o.color] for o in scene.objects}


def test_pope_rows_balanced_and_consistent_with_objects() -> None:
    n, seed = 200, 0
    rows, scenes = make_pope_rows(n, seed), make_scenes(n, seed)
    assert all(tuple(row) == POPE_COLUMNS for row in rows)
    assert len({row["question_id"] for row in rows}) == n
    assert Counter((row["answer"], row["category"]) for row in rows) == {
        (a, c): n // 4 for a in ("yes", "no") for c in ("adversarial", "random")
    }
    for row, scene in zip(rows, scenes, strict=True):
        color, shape = QUESTION.fullmatch(row["question"]).groups()
        assert shape in SHAPES and (color is None or color in COLORS)
        present = any(o.shape == shape and color in (None, o.color) for o in scene.objects)
        assert present == (row["answer"] == "yes"), (row["question"], scene.objects)
        if row["category"] == "adversarial":
            assert color is not None
            assert any(o.shape == shape or o.color == color for o in scene.objects)
        np.testing.assert_array_equal(_pixels(row["image"]), _pixels(scene.image))


def test_color_rows_ask_about_a_unique_object() -> None:
    rows, scenes = make_color_rows(100, 0), make_scenes(100, 0)
    assert {row["answer"] for row in rows} == set(COLORS)
    for row, scene in zip(rows, scenes, strict=True):
        assert row["question"] == f"What colour is the {row['shape']}?"
        (obj,) = [o for o in scene.objects if o.shape == row["shape"]]
        assert row["answer"] == obj.color
        assert [o.color for o in scene.objects].count(obj.color) == 1


def test_shipped_parquets_reproduce() -> None:
    assert POPE_PARQUET.stat().st_size < 2_000_000 and COLOR_PARQUET.stat().st_size < 2_000_000
    for path, rows in ((POPE_PARQUET, make_pope_rows(200, 0)), (COLOR_PARQUET, make_color_rows(100, 0))):
        stored = _read(path)
        assert [{k: v for k, v in r.items() if k != "image"} for r in stored] == [
            {k: v for k, v in r.items() if k != "image"} for r in rows
        ]
        _assert_same_rows(stored[:5], rows[:5])


def test_write_parquet_roundtrip(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "sub" / "p.parquet", 8, 7)
    _assert_same_rows(_read(path), make_pope_rows(8, 7))
    assert b"Image" in pq.read_schema(path).metadata[b"huggingface"]


@pytest.mark.parametrize("n", ["0", "-3"])
def test_the_generator_refuses_no_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str], n: str) -> None:
    with pytest.raises(SystemExit) as stopped:
        generate_shapes_main(["--out", str(tmp_path / "p.parquet"), "--n", n])
    assert stopped.value.code == 2 and f"--n {n}: give the number of rows" in capsys.readouterr().err
    assert not (tmp_path / "p.parquet").exists()


# --- tasks_path ---------------------------------------------------------------------------------------------


def test_tasks_path_renders_only_our_yamls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOSTATTN_CACHE", str(tmp_path))
    path = tasks_path()
    assert path.parent == tmp_path.resolve() and path.name.startswith("tasks-")
    assert sorted(p.name for p in path.iterdir()) == ["lostattn_pope.yaml", "lostattn_shapes_color.yaml"]
    assert tasks_path() == path
    assert list(tmp_path.iterdir()) == [path]  # no leftover temporary directory
    text = (path / "lostattn_pope.yaml").read_text()
    assert f'include: "{pope_yaml_path().as_posix()}"' in text
    assert f'test: "{POPE_PARQUET.as_posix()}"' in text
    assert "$" not in text + (path / "lostattn_shapes_color.yaml").read_text()


def test_tasks_path_without_pope_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = importlib.machinery.ModuleSpec("lmms_eval", None, is_package=True)
    fake.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: fake)
    with pytest.raises(FileNotFoundError, match="pope.yaml"):
        tasks_path(tmp_path / "cache")


def test_the_colour_task_scores_an_answer_alike_on_both_hosts(rendered: Path) -> None:
    """lm-eval's ``lostattn_shapes_color`` stops generating at a newline or period and compares without case,
    punctuation or spaces; lmms-eval's, which generates on, scores the same answers the same (a generation that
    starts with a newline aside: lmms-eval strips it first, lm-eval stops there)."""
    from lm_eval.tasks import TaskManager, get_task_dict
    from lmms_eval.tasks import TaskManager as LmmsTaskManager
    from lmms_eval.tasks import get_task_dict as lmms_task_dict

    lm_task = get_task_dict(["lostattn_shapes_color"], TaskManager(include_path=str(tasks_path(host="lm_eval")),
                                                                    include_defaults=False))["lostattn_shapes_color"]
    lmms_task = lmms_task_dict(["lostattn_shapes_color"], LmmsTaskManager(include_path=[str(rendered)],
                                                                          include_defaults=False))["lostattn_shapes_color"]
    until = lm_task.config.generation_kwargs["until"]
    doc = lm_task.test_docs()[0]
    answer = doc["answer"]
    for response in (answer, answer.upper() + ".", f" {answer}, ", f"{answer}\nblue", f"{answer}. It is blue.",
                     f"{answer}!", f"re {answer}", "blue", f"{answer} and blue"):
        generated = re.split("|".join(map(re.escape, until)), response, maxsplit=1)[0]  # what lm-eval generates
        expected = lm_task.process_results(doc, [generated])["exact_match"]
        assert lmms_task.process_results(doc, [response])["exact_match"] == expected, response


def test_tasks_load_with_task_manager(rendered: Path, offline_env: dict[str, str]) -> None:
    from lmms_eval.tasks import TaskManager, get_task_dict

    # built-in tasks are not needed (pope.yaml is included by path); the CLI tests index them too
    manager = TaskManager(include_path=[str(rendered)], include_defaults=False)
    tasks = get_task_dict(["lostattn_pope", "lostattn_shapes_color"], manager)
    pope, color = tasks["lostattn_pope"], tasks["lostattn_shapes_color"]
    assert len(pope.test_docs()) == 200 and len(color.test_docs()) == 100
    assert list(pope._metric_fn_list) == POPE_METRICS
    assert list(color._metric_fn_list) == ["exact_match"]
    assert pope.config.generation_kwargs["max_new_tokens"] == 128
    assert color.config.generation_kwargs["max_new_tokens"] == 8

    doc = pope.test_docs()[0]
    assert pope.doc_to_text(doc).startswith(doc["question"] + "\nAnswer the question")
    assert pope.doc_to_visual(doc)[0].size == (96, 96)
    assert pope.process_results(doc, [doc["answer"]])["pope_accuracy"]["score"] == 1.0

    doc = color.test_docs()[0]
    assert color.doc_to_text(doc) == f"{doc['question']} Answer with one word."
    assert color.doc_to_visual(doc)[0].mode == "RGB"
    assert color.doc_to_target(doc) == doc["answer"]
    assert color.process_results(doc, [f" {doc['answer'].upper()}\n"]) == {"exact_match": 1.0}
    assert color.process_results(doc, [f"{doc['answer']}."]) == {"exact_match": 1.0}  # lm-eval stops at "."
    assert color.process_results(doc, [f"{doc['answer']}ish"]) == {"exact_match": 0.0}


# --- lmms-eval command line ---------------------------------------------------------------------------------


@pytest.mark.cli
@pytest.mark.parametrize(
    ("task", "response", "metric", "parquet"),
    [
        ("lostattn_pope", "yes", "pope_accuracy", POPE_PARQUET),
        ("lostattn_shapes_color", "red", "exact_match", COLOR_PARQUET),
    ],
)
def test_lmms_eval_cli(
    task: str, response: str, metric: str, parquet: Path, rendered: Path, offline_env: dict[str, str], tmp_path: Path
) -> None:
    limit = 8
    expected = sum(row["answer"] == response for row in _read(parquet)[:limit]) / limit
    assert 0 < expected < 1  # the constant answer must be neither always right nor always wrong
    command = [str(Path(sys.executable).with_name("lmms-eval")), "--model", "dummy", "--model_args"]
    command += [f"response={response}", "--tasks", task, "--include_path", str(rendered), "--limit", str(limit)]
    command += ["--output_path", str(tmp_path / "out"), "--verbosity", "DEBUG"]
    proc = subprocess.run(command, env={**os.environ, **offline_env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("*_results.json")
    results = json.loads(results_file.read_text())["results"][task]
    assert results[f"{metric},none"] == pytest.approx(expected)
    if task == "lostattn_pope":
        assert results["pope_recall,none"] == 1.0
        assert {f"{m},none" for m in POPE_METRICS} <= results.keys()
