"""``lostattn report | compare | check`` on golden run folders made by the real pipeline (``data/make_runs.py``)."""

from __future__ import annotations

import csv
import itertools
import json
import math
import pathlib
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from lmms_lostattn.cli import main
from lmms_lostattn.reporting.plots import ALL_TASKS, layer_curve
from lmms_lostattn.reporting.runs import load_run
from lmms_lostattn.reporting.significance import EXACT_UP_TO, mcnemar, paired_permutation
from lmms_lostattn.reporting.tables import Table, markdown, text_cell

RUNS = pathlib.Path(__file__).parent / "data" / "runs"
TASKS = ("lostattn_pope", "lostattn_shapes_color")


def lostattn(capsys: pytest.CaptureFixture[str], *args: str | pathlib.Path) -> tuple[int, str, str]:
    """Run the console script in-process; (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def results(name: str | pathlib.Path) -> dict:
    folder = RUNS / name if isinstance(name, str) else name
    (path,) = folder.glob("*_results.json")
    return json.loads(path.read_text())


def copy_run(name: str, tmp_path: pathlib.Path, as_name: str | None = None) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(RUNS / name, tmp_path / (as_name or name)))


def edit_json(path: pathlib.Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def set_scores(folder: pathlib.Path, scores: list[float]) -> None:
    """Rewrite POPE accuracy in a run copy: per-sample scores (by doc_id) and the aggregate, consistently."""
    (samples_path,) = folder.glob("*_samples_lostattn_pope.jsonl")
    samples = [json.loads(line) for line in samples_path.read_text().splitlines()]
    for sample in samples:
        sample["pope_accuracy"]["score"] = scores[sample["doc_id"]]
    samples_path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    (results_path,) = folder.glob("*_results.json")
    accuracy = float(np.mean(scores))
    edit_json(results_path, lambda r: r["results"]["lostattn_pope"].update({"pope_accuracy,none": accuracy}))


def read_csv(path: pathlib.Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("report") / "out"
    main(["report", *(str(RUNS / n) for n in ("none", "gaussian", "noise_delta", "knockout")), "-o", str(out)])
    return out


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("compare") / "out"
    main(["compare", *(str(RUNS / n) for n in ("gaussian", "none", "knockout", "noise_delta")), "-o", str(out)])
    return out


# --- report ------------------------------------------------------------------------------------------------------


def test_module_table_has_the_papers_rows_with_the_raw_numbers(report_dir: pathlib.Path) -> None:
    rows = read_csv(report_dir / "modules.csv")
    expected = [("attention", "none", "attn"), ("FFN", "none", "ffn"), ("Noise Δ", "noise_delta", "attn")]
    assert [(r["row"], r["run"]) for r in rows] == [(label, run) for label, run, _ in expected]
    markdown = (report_dir / "modules.md").read_text()
    for row, (_, run, module) in zip(rows, expected, strict=True):
        for task in TASKS:
            for metric, column in (("rid", "RID"), ("mixig", "MixIG")):
                raw = results(run)["results"][task]
                mean, stderr = raw[f"lostattn_{metric}_{module},none"], raw[f"lostattn_{metric}_{module}_stderr,none"]
                assert float(row[f"{task} {column}"]) == mean
                assert float(row[f"{task} {column} stderr"]) == stderr
                assert f"{mean:.4f} ± {stderr:.4f}" in markdown


def test_module_table_shows_the_ffn_under_both_references_where_both_were_measured(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    """``stats=all`` records the FFN's RID against the layer's input too (the sidecar's ``rid_layer``)."""
    run = copy_run("none", tmp_path)
    (sidecar,) = run.glob("*_lostattn.json")

    def add_layer_reference(data: dict) -> None:
        for index, task in enumerate(TASKS):
            data["tasks"][task]["per_layer"]["ffn"]["all"]["rid_layer"] = {
                "overall": {"mean": 0.5 + index, "stderr": 0.25}
            }

    edit_json(sidecar, add_layer_reference)
    assert lostattn(capsys, "report", run, "-o", tmp_path / "out")[0] == 0
    rows = read_csv(tmp_path / "out" / "modules.csv")
    assert [row["row"] for row in rows] == ["attention", "FFN", "FFN (RID against the layer's input)"]
    for index, task in enumerate(TASKS):
        assert float(rows[2][f"{task} RID"]) == 0.5 + index and float(rows[2][f"{task} RID stderr"]) == 0.25
        assert rows[2][f"{task} MixIG"] == rows[1][f"{task} MixIG"]  # of the FFN's own input under either


def test_markdown_shows_every_text_as_written() -> None:
    names = ["a|b", "<i>1", "**best**", "__cand__", "run_2 [x] `y` ~z~ \\"]
    notes = ["<b>run</b>: p < 0.05", "* marked", "1. uniform: versions differ", "# sweep: x", "- a", "> b", "==="]
    table = Table(["task", "em|strict", "c", "d", "e"], [[text_cell(name) for name in names]], notes)
    header, separator, row, _, note, marked, *blocks = markdown(table).splitlines()
    assert header == "| task | em\\|strict | c | d | e |" and separator == "|---|---|---|---|---|"
    assert row == ("| a\\|b | \\<i>1 | \\*\\*best\\*\\* | \\_\\_cand\\_\\_ | "
                   "run_2 \\[x\\] \\`y\\` \\~z\\~ \\\\ |")
    assert note == "\\<b>run\\</b>: p < 0.05  "  # shown as written, not as HTML
    assert marked == "\\* marked  "  # not a list item
    # nor a list, a heading, a quote or a heading's underline: a note may start with a run's folder name
    assert blocks == ["1\\. uniform: versions differ  ", "\\# sweep: x  ", "\\- a  ", "\\> b  ", "\\===  "]


def test_accuracy_table_puts_vanilla_first_with_each_tasks_headline_metric(report_dir: pathlib.Path) -> None:
    rows = read_csv(report_dir / "accuracy.csv")
    assert rows[0]["run"] == "none" and {r["run"] for r in rows} == {"none", "gaussian", "noise_delta", "knockout"}
    for row in rows:
        raw = results(row["run"])
        assert row["intervention"].startswith(raw["lostattn"]["intervention"]["mode"])
        assert raw["lostattn"]["spec_hash"] in row["intervention"]
        assert float(row["lostattn_pope pope_accuracy"]) == raw["results"]["lostattn_pope"]["pope_accuracy,none"]
        assert float(row["lostattn_shapes_color exact_match"]) == raw["results"]["lostattn_shapes_color"][
            "exact_match,none"]
    assert "| model | intervention | run | lostattn_pope pope_accuracy |" in (report_dir / "accuracy.md").read_text()


def test_plots_are_valid_non_blank_images_of_the_fixed_size(report_dir: pathlib.Path) -> None:
    for task in (*TASKS, ALL_TASKS):
        with Image.open(report_dir / f"layers_{task}.png") as image:
            assert image.size == (1100, 420)
            extrema = image.convert("L").getextrema()
            assert extrema[0] < 100 < extrema[1]
        assert ET.parse(report_dir / f"layers_{task}.svg").getroot().tag.endswith("svg")


def test_across_tasks_curve_is_the_sample_weighted_mean_of_the_task_curves() -> None:
    run = load_run(RUNS / "none")
    layers = [run.sidecar["tasks"][t]["per_layer"]["attn"]["all"]["rid"]["layers"] for t in TASKS]
    n = np.array([layer["n"] for layer in layers], dtype=float)
    expected = (n * np.array([layer["mean"] for layer in layers])).sum(axis=0) / n.sum(axis=0)
    mean, stderr = layer_curve(run, ALL_TASKS, "attn", "rid")
    np.testing.assert_allclose(mean, expected, rtol=1e-12)
    np.testing.assert_allclose(layer_curve(run, TASKS[0], "attn", "rid")[1], layers[0]["stderr"], rtol=1e-12)
    assert np.all(stderr > 0)


def test_nothing_is_overwritten_without_force(capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path) -> None:
    target = tmp_path / "out"
    assert lostattn(capsys, "report", RUNS / "none", "-o", target)[0] == 0
    (target / "modules.md").write_text("mine")
    code, _, err = lostattn(capsys, "report", RUNS / "none", "-o", target)
    assert code == 2 and "already exists" in err and "--force" in err
    assert (target / "modules.md").read_text() == "mine"
    assert lostattn(capsys, "report", RUNS / "none", "-o", target, "--force")[0] == 0
    assert (target / "modules.md").read_text() != "mine"


def test_compare_refused_to_overwrite_prints_no_leaderboard(capsys: pytest.CaptureFixture[str],
                                                            tmp_path: pathlib.Path) -> None:
    runs = (RUNS / "none", RUNS / "gaussian")
    assert lostattn(capsys, "compare", *runs, "-o", tmp_path)[0] == 0
    code, out, err = lostattn(capsys, "compare", *runs, "-o", tmp_path)
    assert code == 2 and "already exists" in err and out == ""


# --- paired tests ------------------------------------------------------------------------------------------------


def test_mcnemar_is_exact_on_closed_forms() -> None:
    assert mcnemar([1] * 6 + [0, 0], [0] * 8) == pytest.approx(2 * 0.5**6)  # b=6, c=0
    assert mcnemar([1, 0, 1, 0], [0, 1, 0, 1]) == 1.0  # b = c
    assert mcnemar([1, 1, 0], [1, 1, 0]) == 1.0  # no discordant pair
    assert mcnemar([1] * 10, [0] * 10) == pytest.approx(2 * 0.5**10)


def _sign_flip_p(diff: list[float]) -> float:
    """The exact two-sided sign-flip p-value by brute force over every sign pattern."""
    sums = [abs(sum(s * d for s, d in zip(signs, diff, strict=True))) for signs in itertools.product((1, -1),
                                                                                                     repeat=len(diff))]
    return sum(total >= abs(sum(diff)) - 1e-12 for total in sums) / len(sums)


def test_paired_permutation_is_exact_on_closed_forms() -> None:
    assert paired_permutation([0.4], [0.5]) == 1.0  # one document: either sign reaches |d|
    assert paired_permutation([0.0] * 3, [1.0, 2.0, 3.0]) == pytest.approx(2 / 8)  # only ±(1, 2, 3) reach 6
    assert paired_permutation([0.0] * 4, [1.0, 1.0, 1.0, -1.0]) == pytest.approx(10 / 16)  # |sum| >= 2: 1+4+4+1
    assert paired_permutation([0.0] * 8, [0.1] * 8) == pytest.approx(2 / 2**8)
    base = np.linspace(0, 1, 12)
    assert paired_permutation(base, base) == 1.0
    assert paired_permutation(base, base + 0.3) == paired_permutation(base + 0.3, base)  # two-sided


def test_paired_permutation_samples_sign_flips_beyond_the_exact_range() -> None:
    rng = np.random.default_rng(1)
    diff = list(rng.normal(0.3, 1.0, EXACT_UP_TO + 1))
    exact = _sign_flip_p(diff)
    sampled = paired_permutation([0.0] * len(diff), diff)
    assert sampled == paired_permutation([0.0] * len(diff), diff)  # seeded
    assert abs(sampled - exact) < 4 * math.sqrt(exact * (1 - exact) / 10_000) and 0.01 < exact < 0.5
    many = 200
    assert paired_permutation([0.0] * many, [0.01] * many) == pytest.approx(1 / 10_001)  # no flip reaches it


# --- compare -----------------------------------------------------------------------------------------------------


def test_leaderboard_deltas_are_against_the_vanilla_baseline(compare_dir: pathlib.Path) -> None:
    rows = read_csv(compare_dir / "leaderboard.csv")
    assert [r["run"] for r in rows] == ["none", "gaussian", "knockout", "noise_delta"]
    base = results("none")["results"]
    markdown = (compare_dir / "leaderboard.md").read_text()
    for row in rows[1:]:
        raw = results(row["run"])["results"]
        for task in TASKS:
            for metric in ("lostattn_rid_attn", "lostattn_mixig_ffn"):
                column = f"{task}/{metric}"
                assert float(row[column]) == raw[task][f"{metric},none"]
                assert float(row[f"{column} delta"]) == pytest.approx(
                    raw[task][f"{metric},none"] - base[task][f"{metric},none"], abs=1e-15)
                assert row[f"{column} test"] == "permutation"
        assert row["lostattn_pope/pope_accuracy test"] == "McNemar"
        assert row["lostattn_pope/pope_yes_ratio test"] == "aggregate is not a per-sample mean"
    noise = rows[3]
    # the paper's Noise Δ: attention's MixIG collapses, far beyond sampling noise, and the cell is marked
    assert float(noise["lostattn_pope/lostattn_mixig_attn p"]) < 0.05
    assert f"{float(noise['lostattn_pope/lostattn_mixig_attn delta']):+.4f}\\*)" in markdown


def test_significance_mark_follows_the_p_value(compare_dir: pathlib.Path) -> None:
    rows = read_csv(compare_dir / "leaderboard.csv")
    lines = [line for line in (compare_dir / "leaderboard.md").read_text().splitlines() if line.startswith("| /")]
    header = [h.strip() for h in (compare_dir / "leaderboard.md").read_text().splitlines()[0].strip("|").split("|")]
    marked = 0
    for row, line in zip(rows[1:], lines[1:], strict=True):
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        for column in header[3:]:
            significant = row[f"{column} p"] != "" and float(row[f"{column} p"]) < 0.05
            assert cells[column].endswith("*)") == significant, (row["run"], column)
            marked += significant
    assert marked > 0


def test_explicit_baseline_comes_first_once(capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path) -> None:
    code, _, _ = lostattn(capsys, "compare", RUNS / "none", RUNS / "gaussian", "--baseline", RUNS / "gaussian",
                          "-o", tmp_path)
    rows = read_csv(tmp_path / "leaderboard.csv")
    assert code == 0 and [r["run"] for r in rows] == ["gaussian", "none"]
    assert rows[0]["lostattn_pope/pope_accuracy test"] == "baseline"


def test_runs_with_a_different_limit_are_flagged_not_compared(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    other = copy_run("gaussian", tmp_path)

    def edit(raw: dict) -> None:
        raw["config"]["limit"] = 6.0
        raw["lostattn"]["versions"]["torch"] = "0.0"

    edit_json(next(other.glob("*_results.json")), edit)
    code, out, _ = lostattn(capsys, "compare", RUNS / "none", other, "-o", tmp_path / "out")
    assert code == 0
    row = read_csv(tmp_path / "out" / "leaderboard.csv")[1]
    assert row["lostattn_pope/pope_accuracy delta"] == ""
    assert "different --limit" in row["lostattn_pope/pope_accuracy test"]
    assert "(†)" in out and "different --limit (8.0 vs 6.0)" in out
    assert f"versions differ from the baseline (torch {results('none')['lostattn']['versions']['torch']} -> 0.0)" in out


def test_a_metric_the_baseline_lacks_is_shown_as_such_not_as_not_comparable(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    base = copy_run("none", tmp_path)
    edit_json(next(base.glob("*_results.json")),
              lambda raw: raw["results"]["lostattn_shapes_color"].pop("exact_match,none"))
    code, out, _ = lostattn(capsys, "compare", base, RUNS / "gaussian", "-o", tmp_path / "out")
    assert code == 0
    row = read_csv(tmp_path / "out" / "leaderboard.csv")[1]
    assert row["lostattn_shapes_color/exact_match delta"] == ""
    assert "exact_match missing from" in row["lostattn_shapes_color/exact_match test"]
    assert "(no baseline)" in out and "(†)" not in out, out


def test_runs_on_different_hub_kernels_are_noted(capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path) -> None:
    base, other = copy_run("none", tmp_path / "base"), copy_run("gaussian", tmp_path / "other")
    for run, layers in ((base, {"LigerRMSNorm": 9, "Silu": 4}), (other, {})):
        record = {"use_kernels": bool(layers), "USE_HUB_KERNELS": None, "layers": layers}
        edit_json(next(run.glob("*_results.json")), lambda raw, record=record: raw["lostattn"].update(kernels=record))
    code, out, _ = lostattn(capsys, "compare", base, other, "-o", tmp_path / "out")
    assert code == 0 and "versions differ from the baseline (hub kernels LigerRMSNorm x9, Silu x4 -> none)" in out
    code, out, _ = lostattn(capsys, "check", other, "--baseline", base)
    assert "note: versions differ (hub kernels LigerRMSNorm x9, Silu x4 -> none)" in out


def test_html_leaderboard_renders_sorts_and_is_not_blank(compare_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    from test_leaderboard_page import browser_page

    page_text = (compare_dir / "leaderboard.html").read_text()
    assert "http://" not in page_text and "https://" not in page_text and page_text.count("data:image/png;base64,") == 3
    order = "rows => rows.map(row => row.cells[2].dataset.v)"
    with browser_page(tmp_path / "profile") as (page, errors):
        page.goto((compare_dir / "leaderboard.html").as_uri())
        before = page.eval_on_selector_all("#view-lostattn_pope tbody tr", order)
        header = page.locator("#view-lostattn_pope th[title='lostattn_pope/lostattn_mixig_ffn']")
        header.click()
        ascending = page.eval_on_selector_all("#view-lostattn_pope tbody tr", order)
        other_view = page.eval_on_selector_all("#view-lostattn_shapes_color tbody tr", order)
        header.click()
        descending = page.eval_on_selector_all("#view-lostattn_pope tbody tr", order)
        page.locator("#view-lostattn_pope thead tr:last-child th:nth-child(3)").click()  # run
        by_name = page.eval_on_selector_all("#view-lostattn_pope tbody tr", order)
        shot = tmp_path / "shot.png"
        page.screenshot(path=str(shot), full_page=True)
    assert before == other_view == ["none", "gaussian", "knockout", "noise_delta"]
    mixig = {name: _pope_metric(name, "lostattn_mixig_ffn") for name in before}  # from the results files themselves
    assert ascending == sorted(before, key=mixig.__getitem__) != sorted(before, key=lambda name: str(mixig[name]))
    assert descending == ascending[::-1] and by_name == sorted(before)
    assert errors == []
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert image.size[1] > 1000 and len(np.unique(pixels, axis=0)) > 500 and (pixels.min(axis=1) < 235).mean() > 0.05


def _pope_metric(run: str, metric: str) -> float:
    (results,) = (RUNS / run).glob("*_results.json")
    return json.loads(results.read_text())["results"]["lostattn_pope"][f"{metric},none"]


# --- check -------------------------------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path: pathlib.Path) -> pathlib.Path:
    """A copy of the vanilla run whose POPE accuracy is 1 on all 8 documents."""
    folder = copy_run("none", tmp_path, "good")
    set_scores(folder, [1.0] * 8)
    return folder


def test_check_passes_identical_configurations(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = lostattn(capsys, "check", RUNS / "gaussian", "--baseline", RUNS / "none")
    assert code == 0 and "no regression" in out and "lostattn_pope/pope_accuracy" in out


def test_check_catches_an_injected_regression(
    capsys: pytest.CaptureFixture[str], good: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    bad = copy_run("none", tmp_path, "bad")
    set_scores(bad, [1.0, 1.0] + [0.0] * 6)  # 6 of 8 flipped: McNemar p = 2/2^6 = 0.031
    code, out, _ = lostattn(capsys, "check", bad, "--baseline", good)
    assert code == 1
    (failure,) = [line for line in out.splitlines() if line.startswith("FAILED")]
    assert "lostattn_pope/pope_accuracy: 1.0000 -> 0.2500" in failure and "McNemar p=0.03125" in failure
    assert "1 regression(s)" in out
    assert lostattn(capsys, "check", bad, "--baseline", good, "--max-drop", "0.8")[0] == 0


def test_check_ignores_a_drop_within_noise(
    capsys: pytest.CaptureFixture[str], good: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    slightly = copy_run("none", tmp_path, "slightly")
    set_scores(slightly, [1.0] * 7 + [0.0])  # drop 0.125 > 0.01, but one discordant pair: p = 1
    code, out, _ = lostattn(capsys, "check", slightly, "--baseline", good, "--metrics", "pope_accuracy")
    assert code == 0 and "McNemar p=1" in out


def test_a_drop_of_exactly_the_bound_passes(capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path) -> None:
    """0.97 - 0.96 is 0.010000000000000009 in floating point: a drop of exactly --max-drop is within it."""
    base, run = copy_run("none", tmp_path, "base"), copy_run("none", tmp_path, "run")
    set_scores(base, [0.97] * 8)
    set_scores(run, [0.96] * 8)  # every document lower: sign-flip p = 2/2^8
    gate = ("check", run, "--baseline", base, "--metrics", "pope_accuracy", "--max-drop")
    code, out, _ = lostattn(capsys, *gate, "0.01")
    assert code == 0 and "drop +0.0100, bound 0.01" in out
    assert lostattn(capsys, *gate, "0.0099")[0] == 1


def test_a_run_without_statistics_is_named_as_such(capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path) -> None:
    """Against a run with ``stats=none`` a statistics row is not "defined differently": that run measured none. Two
    runs without statistics compare with no note about them."""
    unmeasured, other = copy_run("none", tmp_path, "unmeasured"), copy_run("gaussian", tmp_path, "other")

    def without_statistics(results: dict) -> None:
        results["lostattn"]["stats"].update({"stats": "none", "table_group": None})
        for task in results["results"].values():
            for key in [key for key in task if key.startswith("lostattn_")]:
                del task[key]

    for run in (unmeasured, other):
        edit_json(next(run.glob("*_results.json")), without_statistics)
        next(run.glob("*_lostattn.json")).unlink()
    code, _, err = lostattn(capsys, "check", unmeasured, "--baseline", RUNS / "none", "--metrics", "lostattn_rid_attn")
    assert code == 2 and f"no statistics measured in {next(unmeasured.glob('*_results.json'))} (stats=none)" in err
    assert "defined differently" not in err
    code, _, err = lostattn(capsys, "compare", unmeasured, other, "-o", tmp_path / "board")
    assert code == 0 and "no statistics measured" not in (tmp_path / "board" / "leaderboard.md").read_text(), err


def test_statistics_rows_defined_differently_get_no_delta_and_cannot_be_checked(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    """A run whose rows measured image tokens only, at a smaller token cap, has rows of the same names: compared with
    the baseline they get no delta and ``check`` cannot judge them; the task's own metrics are still compared."""
    other = copy_run("none", tmp_path, "image_tokens")
    edit_json(next(other.glob("*_results.json")),
              lambda r: r["lostattn"]["stats"].update({"table_group": "image", "stats_max_tokens": 64}))
    code, _, err = lostattn(capsys, "compare", RUNS / "none", other, "-o", tmp_path / "board")
    assert code == 0, err
    (row,) = [r for r in read_csv(tmp_path / "board" / "leaderboard.csv") if r["run"] == "image_tokens"]
    assert row["lostattn_pope/lostattn_rid_attn delta"] == "" and row["lostattn_pope/pope_accuracy delta"] == "0.0"
    assert ("† image_tokens: statistics defined differently (table_group all vs image; stats_max_tokens 1024 vs 64)"
            in (tmp_path / "board" / "leaderboard.md").read_text())
    code, _, err = lostattn(capsys, "check", other, "--baseline", RUNS / "none", "--metrics", "lostattn_rid_attn")
    assert code == 2 and "statistics defined differently (table_group all vs image" in err
    code, out, _ = lostattn(capsys, "check", other, "--baseline", RUNS / "none")
    assert code == 0 and "no regression" in out


def test_check_refuses_different_documents_or_missing_logs(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    other = copy_run("gaussian", tmp_path)
    (samples_path,) = other.glob("*_samples_lostattn_shapes_color.jsonl")
    samples_path.write_text(samples_path.read_text().replace('"input": "', '"input": "x', 1))
    code, _, err = lostattn(capsys, "check", other, "--baseline", RUNS / "none")
    assert code == 2 and "different documents in lostattn_shapes_color" in err
    samples_path.unlink()
    code, _, err = lostattn(capsys, "check", other, "--baseline", RUNS / "none")
    assert code == 2 and "no samples log for lostattn_shapes_color" in err and "--log_samples" in err
    edit_json(next(other.glob("*_results.json")), lambda r: r["results"].pop("lostattn_shapes_color"))
    code, _, err = lostattn(capsys, "check", other, "--baseline", RUNS / "none")
    assert code == 2 and "lostattn_shapes_color is not in both runs" in err
    code, _, err = lostattn(capsys, "check", RUNS / "gaussian", "--baseline", RUNS / "none", "--metrics", "nope")
    assert code == 2 and "nope is in no task" in err and "its metrics: exact_match, " in err and "pope_f1_score" in err
    code, _, err = lostattn(capsys, "check", RUNS / "gaussian", "--baseline", RUNS / "none", "--metrics",
                            "pope_yes_ratio")
    assert code == 2 and "pope_yes_ratio: cannot be tested per sample (aggregate is not a per-sample mean)" in err


# --- malformed, truncated, mixed-up folders -----------------------------------------------------------------------


def _truncate_results(folder: pathlib.Path) -> str:
    (path,) = folder.glob("*_results.json")
    path.write_text(path.read_text()[:500])
    return f"{path}: not valid JSON"


def _truncate_samples(folder: pathlib.Path) -> str:
    (path,) = folder.glob("*_samples_lostattn_pope.jsonl")
    path.write_text(path.read_text()[:-300])
    return f"{path}: line 8 is not valid JSON"


def _drop_last_sample(folder: pathlib.Path) -> str:
    (path,) = folder.glob("*_samples_lostattn_pope.jsonl")
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    return f"{path}: 7 samples, but"


def _foreign_sidecar(folder: pathlib.Path) -> str:
    (mine,) = folder.glob("*_lostattn.json")
    (foreign,) = (RUNS / "gaussian").glob("*_lostattn.json")
    shutil.copy(foreign, mine)
    return f"{mine}: spec_hash {json.loads(foreign.read_text())['spec_hash']} differs"


def _stray_file(folder: pathlib.Path) -> str:
    (foreign,) = (RUNS / "gaussian").glob("*_samples_lostattn_pope.jsonl")
    shutil.copy(foreign, folder)
    return f"{folder / foreign.name}: belongs to no results file in {folder}"


def _counts_as_a_list(folder: pathlib.Path) -> str:
    (path,) = folder.glob("*_results.json")
    edit_json(path, lambda r: r.update({"n-samples": [8, 8]}))
    return f"{path}: 'n-samples' is not an object of objects"


def _task_results_as_text(folder: pathlib.Path) -> str:
    (path,) = folder.glob("*_results.json")
    edit_json(path, lambda r: r["results"].update({"lostattn_pope": "0.97"}))
    return f"{path}: 'results' is not an object of objects"


def _lostattn_value(edit: Callable[[dict], object], message: str) -> Callable[[pathlib.Path], str]:
    """A damage: a value of the results file's ``lostattn`` block changed by ``edit`` to another kind."""
    def damage(folder: pathlib.Path) -> str:
        (path,) = folder.glob("*_results.json")
        edit_json(path, lambda results: edit(results["lostattn"]))
        return f"{path}: {message}"

    return damage


def _one_layer_short(folder: pathlib.Path) -> str:
    (path,) = folder.glob("*_lostattn.json")
    edit_json(path, lambda s: s["tasks"]["lostattn_pope"]["per_layer"]["attn"]["all"]["rid"]["layers"]["mean"].pop())
    return f"{path}: per-layer statistics of different lengths (3, 4)"


def _per_layer_rid(edit: Callable[[dict], object], message: str) -> Callable[[pathlib.Path], str]:
    """A damage: the sidecar's per-layer RID of the attention on POPE changed by ``edit``."""
    def damage(folder: pathlib.Path) -> str:
        (path,) = folder.glob("*_lostattn.json")
        edit_json(path, lambda s: edit(s["tasks"]["lostattn_pope"]["per_layer"]["attn"]["all"]["rid"]["layers"]))
        return f"{path}: {message}"

    return damage


NOT_NESTED = "the per-layer statistics are not nested as a run writes them"
NOT_A_NUMBER = "a per-layer mean or stderr is neither a number nor null, or a count is not a non-negative integer"


def _two_results(folder: pathlib.Path) -> str:
    shutil.copytree(RUNS / "gaussian", folder / "again")
    return f"{folder}: several results files"


def _not_lostattn(folder: pathlib.Path) -> str:
    (path,) = folder.glob("*_results.json")
    edit_json(path, lambda r: r.pop("lostattn"))
    return f"{path}: no 'lostattn' block"


def _samples_cut_inside_a_character(folder: pathlib.Path) -> str:
    """lmms-eval writes prompts as raw UTF-8 (``ensure_ascii=False``); a copy cut mid-character is not text."""
    (path,) = folder.glob("*_samples_lostattn_pope.jsonl")
    path.write_bytes(path.read_bytes() + '{"doc_id": 8, "input": "\u2212'.encode()[:-1])
    return f"{path}: not UTF-8 text"


def _empty(folder: pathlib.Path) -> str:
    for path in folder.iterdir():
        path.unlink()
    return f"{folder}: no <date>_results.json (lmms-eval) or results_<date>.json"


def test_runs_sharing_a_folder_are_read_by_their_results_file(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    """Either harness writes every run of one model into the same folder: each results file reads its own sidecar and
    samples logs beside the other runs' files; the folder itself names them."""
    shared = tmp_path / "model"
    for name in ("none", "gaussian"):
        shutil.copytree(RUNS / name, shared, dirs_exist_ok=True)
    (base,), (run,) = ((RUNS / name).glob("*_results.json") for name in ("none", "gaussian"))
    for name, path in (("none", base), ("gaussian", run)):
        loaded = load_run(shared / path.name)
        alone = load_run(RUNS / name)
        assert loaded.sidecar == alone.sidecar and loaded.samples == alone.samples
    code, out, err = lostattn(capsys, "check", shared / run.name, "--baseline", shared / base.name, "--max-drop", "1")
    assert code == 0 and "no regression" in out, err
    code, _, err = lostattn(capsys, "check", shared, "--baseline", shared / base.name)
    assert code == 2 and f"{shared}: several results files" in err
    code, _, err = lostattn(capsys, "compare", shared / base.name, shared / run.name, "-o", tmp_path / "compared")
    assert code == 0, err
    names = [row["run"] for row in read_csv(tmp_path / "compared" / "leaderboard.csv")]
    assert names == [f"model/{base.stem}", f"model/{run.stem}"]  # not "model" twice


@pytest.mark.parametrize("damage", [_truncate_results, _truncate_samples, _drop_last_sample, _foreign_sidecar,
                                    _stray_file, _counts_as_a_list, _task_results_as_text, _one_layer_short,
                                    _two_results, _not_lostattn, _samples_cut_inside_a_character, _empty,
                                    _lostattn_value(lambda block: block.update(versions="2.15"),
                                                    "lostattn.'versions' is not an object"),
                                    _lostattn_value(lambda block: block.update(kernels="none"),
                                                    "lostattn.kernels is not an object whose 'layers' counts"),
                                    _lostattn_value(lambda block: block["stats"].update(table_group=["all"]),
                                                    "lostattn.stats.table_group is not a name"),
                                    _per_layer_rid(lambda layers: layers.pop("n"), NOT_NESTED),
                                    _per_layer_rid(lambda layers: layers.update(mean=3), NOT_NESTED),
                                    _per_layer_rid(lambda layers: layers["mean"].__setitem__(0, "x"), NOT_A_NUMBER),
                                    _per_layer_rid(lambda layers: layers["n"].__setitem__(0, 2.5), NOT_A_NUMBER)])
def test_damaged_folders_give_a_clear_error_naming_the_file(
    damage: Callable[[pathlib.Path], str], capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    folder = copy_run("none", tmp_path)
    expected = damage(folder)
    for command in (["report", folder, "-o", tmp_path / "r"], ["check", folder, "--baseline", RUNS / "none"]):
        code, out, err = lostattn(capsys, *command)
        assert code == 2 and expected in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "r").exists()
