"""The HTML leaderboard of ``lostattn compare`` in a real headless browser (playwright, the system chromium): one view
per task that fits 1400 px, short model names, cells coloured by their paired test against the baseline."""

from __future__ import annotations

import contextlib
import pathlib
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from test_report import RUNS, TASKS, copy_run, edit_json, set_scores

from lmms_lostattn.cli import main
from lmms_lostattn.reporting.html import short_name
from lmms_lostattn.reporting.runs import load_run

WIDTH = 1400
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]
CELLS = """(cells, column) => cells.map(td => {
  const th = td.closest("table").tHead.rows[1].cells[td.cellIndex];
  return th.title === column ? {run: td.parentElement.cells[2].dataset.v, title: td.title, cls: td.className,
                                background: getComputedStyle(td).backgroundColor} : null;
}).filter(Boolean)"""


@contextlib.contextmanager
def browser_page(profile: pathlib.Path) -> Iterator[tuple[Any, list[str]]]:
    """A 1400 px wide page of the system chromium (headless, no background networking) and the console errors it
    logs; skips without playwright or chromium."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install '.[test]')")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install -y chromium); .ci/run installs it when it can")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=FLAGS, viewport={"width": WIDTH, "height": 900})
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        yield page, errors
        context.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, list[str]]]:
    with browser_page(tmp_path_factory.mktemp("profile")) as opened:
        yield opened


def compare(out: pathlib.Path, *args: str | pathlib.Path) -> pathlib.Path:
    main(["compare", *map(str, args), "-o", str(out)])
    return out / "leaderboard.html"


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    runs = (RUNS / name for name in ("gaussian", "none", "knockout", "noise_delta"))
    return compare(tmp_path_factory.mktemp("golden"), *runs)


@pytest.fixture(scope="module")
def shifted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """Pages of two run copies whose POPE accuracy differs significantly (McNemar p = 2/2^6): ``worse`` against the
    high one (with a run of another ``--limit`` beside them), ``better`` against the low one."""
    tmp = tmp_path_factory.mktemp("shifted")
    high, low, other = copy_run("none", tmp, "high"), copy_run("knockout", tmp, "low"), copy_run("gaussian", tmp)
    set_scores(high, [1.0] * 8)
    set_scores(low, [1.0, 1.0] + [0.0] * 6)
    edit_json(next(other.glob("*_results.json")), lambda raw: raw["config"].update(limit=6.0))
    return {"worse": compare(tmp / "worse", high, low, other),
            "better": compare(tmp / "better", high, "--baseline", low)}


def test_short_name() -> None:
    assert short_name("/opt/models/hf/hub/models--llava-hf--llava-1.5-7b-hf/snapshots/8c85e9a/") == "8c85e9a"
    assert short_name("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    assert short_name("pretrained=/data/ckpt/shapes-llava,device=cpu,attn=none") == "shapes-llava"
    assert short_name("./local/model") == "model"


def test_one_view_per_task_fits_1400px_with_short_names(browser: tuple[Any, list[str]], golden: pathlib.Path) -> None:
    page, errors = browser
    page.goto(golden.as_uri())
    assert page.eval_on_selector_all("section.view", "views => views.map(v => v.id)") == [f"view-{t}" for t in TASKS]
    assert page.evaluate("document.documentElement.scrollWidth") <= WIDTH
    run = load_run(RUNS / "none")
    for task in TASKS:
        view = page.locator(f"#view-{task}")
        wrap = view.locator(".wrap").evaluate("w => [w.scrollWidth, w.clientWidth]")
        assert wrap[0] <= wrap[1] and view.locator("table").bounding_box()["width"] <= WIDTH
        columns = view.locator("thead tr").nth(1).locator("th").evaluate_all("ths => ths.map(th => th.title)")
        own = [m for m in run.metrics(task) if not m.startswith("lostattn_")]
        stats = [m for m in run.metrics(task) if m.startswith("lostattn_")]
        assert columns == ["", "", ""] + [f"{task}/{m}" for m in own + stats] and own and stats
        models = view.locator("tbody td:first-child").evaluate_all("tds => tds.map(td => [td.textContent, td.title])")
        assert models == [["tiny", run.model]] * 4 and "/" in run.model
        labels = view.locator("tbody td:nth-child(2)").all_text_contents()
        assert labels == [load_run(RUNS / name).label for name in ("none", "gaussian", "knockout", "noise_delta")]
    assert errors == []


def _rgb(css: str) -> tuple[int, ...]:
    return tuple(int(part) for part in css[css.index("(") + 1:-1].split(","))


def test_significant_cells_are_coloured_with_the_test_on_hover(
    browser: tuple[Any, list[str]], shifted: dict[str, pathlib.Path]
) -> None:
    page, errors = browser
    page.goto(shifted["worse"].as_uri())
    (worse,) = [c for c in page.eval_on_selector_all("td", CELLS, "lostattn_pope/pope_accuracy") if c["run"] == "low"]
    red, green, blue = _rgb(worse["background"])
    assert red > green + 25 and red > blue + 25 and "worse" in worse["cls"]
    assert worse["title"] == "-0.75 vs the baseline; McNemar p = 0.0312, significant at α = 0.05"
    (changed,) = [c for c in page.eval_on_selector_all("td", CELLS, "lostattn_pope/lostattn_mixig_attn")
                  if c["run"] == "low"]  # knockout's MixIG: a statistics row, so neither better nor worse
    red, green, blue = _rgb(changed["background"])
    assert "changed" in changed["cls"] and blue > red + 25 and "permutation p = 0.00781" in changed["title"]
    (ratio,) = [c for c in page.eval_on_selector_all("td", CELLS, "lostattn_pope/pope_yes_ratio") if c["run"] == "low"]
    assert ratio["cls"] == "n" and ratio["title"].endswith("no test (aggregate is not a per-sample mean)")
    (apart,) = [c for c in page.eval_on_selector_all("td", CELLS, "lostattn_pope/pope_accuracy")
                if c["run"] == "gaussian"]
    assert "nc" in apart["cls"] and apart["title"].startswith("not comparable: different --limit")
    assert page.locator("tr", has_text="gaussian").locator("td.nc .d").first.text_content() == "†"
    notes = page.locator("footer").text_content()
    assert "exact McNemar" in notes and "10000 sign flips" in notes and "p < 0.05" in notes
    assert "† gaussian: different --limit" in notes
    page.goto(shifted["better"].as_uri())
    (better,) = [c for c in page.eval_on_selector_all("td", CELLS, "lostattn_pope/pope_accuracy") if c["run"] == "high"]
    red, green, blue = _rgb(better["background"])
    assert green > red + 25 and green > blue + 25 and "better" in better["cls"]
    assert errors == []
