"""``lostattn check`` refuses what makes no sense (a threshold outside [0, 1], ``--limit 0``), states why two runs
cannot be compared once and the right way round, gates statistics rows in both directions and tests a metric per
sample by one rule; two runs of the same thing compare clean under either harness; relative output paths do not
nest."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from cli_helpers import results_of, run_cli_batch, run_error
from test_report import RUNS, copy_run, edit_json, lostattn, set_scores

from lmms_lostattn.models import SHAPES_LLAVA_DIR
from lmms_lostattn.tasks import tasks_path

POPE_METRICS = ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio")


@pytest.fixture
def pair(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(baseline, run): POPE accuracy 1 on all 8 documents, then on 2 of them (McNemar p = 0.031)."""
    good, bad = copy_run("none", tmp_path, "good"), copy_run("none", tmp_path, "bad")
    set_scores(good, [1.0] * 8)
    set_scores(bad, [1.0, 1.0] + [0.0] * 6)
    return good, bad


# --- A, B: thresholds and limits that make no sense ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "5", "-1", "1.5", "ten"])
def test_a_threshold_outside_0_1_exits_2_before_reading_runs(
    capsys: pytest.CaptureFixture[str], pair: tuple[pathlib.Path, pathlib.Path], tmp_path: pathlib.Path, value: str
) -> None:
    good, bad = pair
    assert lostattn(capsys, "check", bad, "--baseline", good)[0] == 1  # a 75-point drop
    code, out, err = lostattn(capsys, "check", bad, "--baseline", good, f"--max-drop={value}")
    assert code == 2 and "no regression" not in out and "argument --max-drop" in err
    assert "expected a number in [0, 1]" in err or "is not a number" in err
    code, _, err = lostattn(capsys, "check", tmp_path / "nothing", "--baseline", good, f"--max-drop={value}")
    assert code == 2 and "argument --max-drop" in err and "no such file" not in err  # refused before reading


def test_thresholds_0_and_1_are_accepted_and_the_help_says_fractions(
    capsys: pytest.CaptureFixture[str], pair: tuple[pathlib.Path, pathlib.Path]
) -> None:
    good, bad = pair
    assert lostattn(capsys, "check", bad, "--baseline", good, "--max-drop", "0")[0] == 1
    assert lostattn(capsys, "check", bad, "--baseline", good, "--max-drop", "1")[0] == 0
    _, out, _ = lostattn(capsys, "check", "--help")
    assert "[0, 1]" in " ".join(out.split())


def test_a_run_folder_without_results_exits_2_naming_it(capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path):
    (tmp_path / "empty").mkdir()
    for run in (tmp_path / "empty", tmp_path / "missing"):
        code, _, err = lostattn(capsys, "check", run, "--baseline", RUNS / "none")
        assert code == 2 and str(run) in err and "Traceback" not in err
    code, _, err = lostattn(capsys, "check", RUNS / "none", "--baseline", tmp_path / "empty")
    assert code == 2 and f"{tmp_path / 'empty'}: no <date>_results.json (lmms-eval) or results_<date>.json" in err


@pytest.mark.parametrize("command", ["demo", "reproduce"])
@pytest.mark.parametrize("limit", ["0", "-2", "two"])
def test_limit_must_be_a_positive_integer(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path, command: str, limit: str
) -> None:
    required = ["--model", "lostattn_llava", "--model_args", "pretrained=x", "--tasks", "t"] * (command == "reproduce")
    code, _, err = lostattn(capsys, command, *required, "--limit", limit, "--output", tmp_path / "out")
    assert code == 2 and "argument --limit" in err
    assert "expected a positive number of documents" in err or "is not an integer" in err
    assert not (tmp_path / "out").exists()


# --- C: why two runs cannot be compared, once and the right way round ------------------------------------------


def _drop_last_pope_sample(folder: pathlib.Path) -> None:
    (samples,) = folder.glob("*_samples_lostattn_pope.jsonl")
    samples.write_text("".join(samples.read_text().splitlines(keepends=True)[:-1]))
    edit_json(next(folder.glob("*_results.json")), lambda r: r["n-samples"]["lostattn_pope"].update(effective=7))


def test_fewer_documents_are_named_once_with_the_baselines_count_first(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    fewer = copy_run("gaussian", tmp_path, "fewer")
    _drop_last_pope_sample(fewer)
    code, _, err = lostattn(capsys, "check", fewer, "--baseline", RUNS / "none")
    assert code == 2 and err.count("lostattn_pope") == 1
    assert "different documents in lostattn_pope (8 in the baseline, 7 in this run: doc_id 7 only in the baseline)" \
        in err
    code, _, err = lostattn(capsys, "check", RUNS / "none", "--baseline", fewer)
    assert code == 2 and "(7 in the baseline, 8 in this run: doc_id 7 only in this run)" in err
    for log in fewer.glob("*_samples_*.jsonl"):
        log.unlink()
    code, _, err = lostattn(capsys, "check", fewer, "--baseline", RUNS / "none")
    assert code == 2 and err.count("lostattn_pope") == 1 and "(8 in the baseline, 7 in this run)" in err
    limited = copy_run("gaussian", tmp_path, "limited")
    edit_json(next(limited.glob("*_results.json")), lambda r: r["config"].update(limit=6.0))
    code, _, err = lostattn(capsys, "check", limited, "--baseline", RUNS / "none")
    assert code == 2 and err.count("different --limit (8.0 vs 6.0)") == 1  # once, not once per task


def test_documents_are_told_apart_by_prompt_and_target_not_by_lmms_evals_doc_hash(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    """lmms-eval's doc_hash is one value for every document of these runs; its logged prompt and target differ."""
    hashes = {json.loads(line)["doc_hash"] for log in (RUNS / "none").glob("*_samples_*.jsonl")
              for line in log.read_text().splitlines()}
    assert len(hashes) == 1
    other = copy_run("gaussian", tmp_path)
    (log,) = other.glob("*_samples_lostattn_shapes_color.jsonl")
    samples = [json.loads(line) for line in log.read_text().splitlines()]
    samples[0]["doc_hash"] = "another serialisation of the same document"
    log.write_text("".join(json.dumps(s) + "\n" for s in samples))
    assert lostattn(capsys, "check", other, "--baseline", RUNS / "none")[0] == 0
    samples[2]["input"] = "Another question?"
    log.write_text("".join(json.dumps(s) + "\n" for s in samples))
    code, _, err = lostattn(capsys, "check", other, "--baseline", RUNS / "none")
    assert code == 2 and "different documents in lostattn_shapes_color (doc_id 2: input/target differ)" in err


# --- D: statistics rows in both directions; one rule for per-sample tests ----------------------------------------


def test_statistics_rows_fail_on_a_significant_change_either_way(capsys: pytest.CaptureFixture[str]) -> None:
    """Noise Δ collapses attention's MixIG (0.14 -> 0.007): beyond the band whichever run is the baseline."""
    for base, run in (("none", "noise_delta"), ("noise_delta", "none")):
        code, out, _ = lostattn(capsys, "check", RUNS / run, "--baseline", RUNS / base, "--metrics",
                                "lostattn_pope/lostattn_mixig_attn")
        (line,) = [line for line in out.splitlines() if "lostattn_mixig_attn" in line]
        assert code == 1 and line.startswith("FAILED"), out
        assert "changed" in line and "band ±0.01" in line and "drop" not in line
        assert "permutation p=0.007812" in line  # 2 / 2^8: every one of the 8 documents moved the same way
    code, out, _ = lostattn(capsys, "check", RUNS / "none", "--baseline", RUNS / "noise_delta", "--metrics",
                            "lostattn_pope/lostattn_mixig_attn", "--max-drop", "0.5")
    assert code == 0 and "ok      lostattn_pope/lostattn_mixig_attn" in out


def test_a_failing_line_shows_a_change_too_small_for_four_decimals(capsys: pytest.CaptureFixture[str]) -> None:
    """The regression a line names is visible on it: -3.9e-06, not -0.0000."""
    code, out, _ = lostattn(capsys, "check", RUNS / "gaussian", "--baseline", RUNS / "none", "--max-drop", "0",
                            "--metrics", "lostattn_pope/lostattn_mixig_attn")
    (line,) = [line for line in out.splitlines() if "lostattn_mixig_attn" in line]
    assert code == 1 and line.startswith("FAILED") and "(changed -3.9e-06, band ±0.0," in line, out


def _set_pope(folder: pathlib.Path, scores: list[float], aggregates: dict[str, float]) -> None:
    """Every POPE metric's per-sample score (by doc_id) and the given aggregates, in a run copy."""
    (log,) = folder.glob("*_samples_lostattn_pope.jsonl")
    samples = [json.loads(line) for line in log.read_text().splitlines()]
    for sample in samples:
        for metric in POPE_METRICS:
            sample[metric]["score"] = scores[sample["doc_id"]]
    log.write_text("".join(json.dumps(s) + "\n" for s in samples))
    edit_json(next(folder.glob("*_results.json")),
              lambda r: r["results"]["lostattn_pope"].update({f"{m},none": v for m, v in aggregates.items()}))


@pytest.mark.parametrize("scores", [[1.0] * 8, [1.0, 0.0] * 4], ids=["all-1", "mixed"])
def test_only_metrics_declared_as_a_per_sample_mean_are_tested_whatever_the_values(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path, scores: list[float]
) -> None:
    """POPE's F1, precision and recall are skipped even where every value is 1 (their aggregate then equals the mean
    by coincidence); its accuracy (a mean of the scores) and exact_match (declared ``mean``) are tested."""
    runs = [copy_run("none", tmp_path, name) for name in ("a", "b")]
    mean = sum(scores) / len(scores)
    for run in runs:
        _set_pope(run, scores, {"pope_accuracy": mean, "pope_precision": mean, "pope_recall": mean,
                                "pope_f1_score": mean})
    code, out, _ = lostattn(capsys, "check", runs[1], "--baseline", runs[0])
    assert code == 0
    for metric in ("pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio"):
        assert f"skipped lostattn_pope/{metric}: aggregate is not a per-sample mean" in out
    assert "ok      lostattn_pope/pope_accuracy" in out and "ok      lostattn_shapes_color/exact_match" in out
    code, _, err = lostattn(capsys, "check", runs[1], "--baseline", runs[0], "--metrics", "pope_f1_score")
    assert code == 2 and "pope_f1_score: cannot be tested per sample (aggregate is not a per-sample mean)" in err


@pytest.mark.parametrize(("config", "tested"), [
    ({"metric_list": [{"metric": "exact_match"}], "output_type": "generate_until"}, True),  # as boolq lists acc
    ({"output_type": "generate_until"}, True),  # no metric_list: the output type's default metrics
    ({"metric_list": [{"metric": "other"}], "output_type": "generate_until"}, False),  # not listed: the task's code
    ({"output_type": "multiple_choice"}, False),  # not a default metric of its output type
], ids=["listed-without-aggregation", "no-metric-list", "not-listed", "not-a-default"])
def test_a_metric_without_a_declared_aggregation_is_tested_when_the_harness_default_is_the_mean(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path, config: dict, tested: bool
) -> None:
    """Both harnesses aggregate a metric listed without ``aggregation``, or a default metric of a config without
    ``metric_list``, by the metric's registered default: the mean for exact_match (SPEC §6: two identical runs
    compare clean)."""
    runs = [copy_run("none", tmp_path, name) for name in ("a", "b")]
    for run in runs:
        edit_json(next(run.glob("*_results.json")), lambda r: r["configs"].update({"lostattn_shapes_color": config}))
    code, out, _ = lostattn(capsys, "check", runs[1], "--baseline", runs[0])
    assert code == 0
    expected = "ok      lostattn_shapes_color/exact_match" if tested else \
        "skipped lostattn_shapes_color/exact_match: aggregate is not a per-sample mean"
    assert expected in out, out


def _drop_exact_match(results: dict) -> None:
    del results["results"]["lostattn_shapes_color"]["exact_match,none"]


def _accuracy_not_a_number(results: dict) -> None:
    results["results"]["lostattn_pope"]["pope_accuracy,none"] = "N/A"


@pytest.mark.parametrize("damage", [_drop_exact_match, _accuracy_not_a_number])
def test_a_baseline_metric_the_run_does_not_report_cannot_be_judged(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path, damage: Callable[[dict], None]
) -> None:
    run = copy_run("none", tmp_path, "run")
    (results_path,) = run.glob("*_results.json")
    edit_json(results_path, damage)
    code, out, err = lostattn(capsys, "check", run, "--baseline", RUNS / "none")
    assert code == 2 and "no regression" not in out
    assert f"missing from {results_path}, or not a number there" in err, err


def test_a_baseline_metric_that_is_not_a_finite_number_cannot_be_judged(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    """A null or NaN in the baseline is not left out of the check (the run's value would pass unjudged)."""
    for value in (None, float("nan")):
        base = copy_run("none", tmp_path, f"base_{value}")
        edit_json(next(base.glob("*_results.json")),
                  lambda r, v=value: r["results"]["lostattn_shapes_color"].update({"exact_match,none": v}))
        code, out, err = lostattn(capsys, "check", RUNS / "knockout", "--baseline", base)
        assert code == 2 and "no regression" not in out
        assert "lostattn_shapes_color/exact_match is not a finite number in the baseline" in err, err


def test_a_metric_that_is_not_a_per_sample_mean_is_skipped_even_when_not_a_number(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    """POPE's precision is skipped whatever its values, NaN (a judge that failed on every document) included."""
    base, run = copy_run("none", tmp_path, "base"), copy_run("none", tmp_path, "run")
    for folder, name in ((base, "run"), (run, "base")):
        nan = copy_run("none", tmp_path, f"{name}_nan")
        edit_json(next(nan.glob("*_results.json")),
                  lambda r: r["results"]["lostattn_pope"].update({"pope_precision,none": float("nan")}))
        pair = (nan, folder) if name == "run" else (folder, nan)
        code, out, err = lostattn(capsys, "check", pair[0], "--baseline", pair[1])
        assert code == 0 and "skipped lostattn_pope/pope_precision: aggregate is not a per-sample mean" in out, err


def _first_documents(folder: pathlib.Path, count: int, scores: list[float]) -> None:
    """Keep POPE's first ``count`` documents of a run copy (and only POPE), with these accuracy scores."""
    for log in folder.glob("*_samples_lostattn_shapes_color.jsonl"):
        log.unlink()
    (log,) = folder.glob("*_samples_lostattn_pope.jsonl")
    samples = [json.loads(line) for line in log.read_text().splitlines()][:count]
    for sample, score in zip(samples, scores, strict=True):
        sample["pope_accuracy"]["score"] = score
    log.write_text("".join(json.dumps(sample) + "\n" for sample in samples))

    def keep(results: dict) -> None:
        for block in ("results", "n-samples"):
            results[block] = {"lostattn_pope": results[block]["lostattn_pope"]}
        results["n-samples"]["lostattn_pope"]["effective"] = count
        results["results"]["lostattn_pope"]["pope_accuracy,none"] = sum(scores) / count

    edit_json(next(folder.glob("*_results.json")), keep)


@pytest.mark.parametrize(("count", "status"), [(5, 2), (6, 1)])
def test_a_drop_on_too_few_documents_to_be_significant_cannot_be_judged(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path, count: int, status: int
) -> None:
    """Every document going from right to wrong: p = 2 / 2^n, 0.0625 on 5 documents (never "no regression"), 0.03125
    on 6 (a regression)."""
    good, bad = copy_run("none", tmp_path, "good"), copy_run("none", tmp_path, "bad")
    _first_documents(good, count, [1.0] * count)
    _first_documents(bad, count, [0.0] * count)
    code, out, err = lostattn(capsys, "check", bad, "--baseline", good, "--metrics", "pope_accuracy")
    assert code == status and "no regression" not in out, out + err
    if status == 2:
        assert "on 5 documents no change can be significant (p >= 0.0625); run more documents" in err, err


def test_per_sample_scores_logged_as_booleans_are_tested_as_0_and_1(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    """A task whose process_results returns a comparison logs true/false; the harness averages them as 0/1."""
    good, bad = copy_run("none", tmp_path, "good"), copy_run("none", tmp_path, "bad")
    set_scores(good, [1.0] * 8)
    set_scores(bad, [1.0, 1.0] + [0.0] * 6)
    for run in (good, bad):
        (log,) = run.glob("*_samples_lostattn_pope.jsonl")
        samples = [json.loads(line) for line in log.read_text().splitlines()]
        log.write_text("".join(json.dumps({**s, "pope_accuracy": s["pope_accuracy"]["score"] == 1.0}) + "\n"
                               for s in samples))
    code, out, err = lostattn(capsys, "check", bad, "--baseline", good, "--metrics", "pope_accuracy")
    assert code == 1 and "FAILED  lostattn_pope/pope_accuracy" in out and "McNemar p=0.03125" in out, out + err


def test_a_task_without_documents_cannot_be_judged(capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path) -> None:
    empty = [copy_run("none", tmp_path, name) for name in ("a", "b")]
    for run in empty:
        next(run.glob("*_samples_lostattn_shapes_color.jsonl")).write_text("")
        edit_json(next(run.glob("*_results.json")),
                  lambda r: r["n-samples"]["lostattn_shapes_color"].update(effective=0))
    code, out, err = lostattn(capsys, "check", empty[1], "--baseline", empty[0])
    assert code == 2 and "no regression" not in out and "Traceback" not in err
    assert "lostattn_shapes_color/exact_match: cannot be tested per sample (no per-sample values)" in err, err


def test_an_unexpected_error_inside_check_is_cannot_judge_not_a_regression(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python's status for an uncaught exception is 1, which ``check`` uses for a regression."""
    def broken(*_: object) -> None:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("lmms_lostattn.cli.check.regressions", broken)
    code, out, err = lostattn(capsys, "check", RUNS / "none", "--baseline", RUNS / "none")
    assert code == 2 and "ZeroDivisionError" in err and "cannot judge (an unexpected error, above)" in err, err


def test_per_sample_values_that_do_not_average_to_the_aggregate_cannot_be_judged(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    run = copy_run("none", tmp_path, "run")
    edit_json(next(run.glob("*_results.json")), lambda r: r["results"]["lostattn_pope"].update(
        {"pope_accuracy,none": 0.123}))
    code, _, err = lostattn(capsys, "check", run, "--baseline", RUNS / "none")
    assert code == 2 and "pope_accuracy: cannot be tested per sample (per-sample values do not average" in err


def _keep_only_pope_f1(results: dict) -> None:
    pope = results["results"]["lostattn_pope"]
    results["results"] = {"lostattn_pope": {key: value for key, value in pope.items() if key.startswith("pope_f1")}}


def test_a_check_that_tests_nothing_cannot_be_judged(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    """No results at all, or only metrics that are not per-sample means: exit 2, never "no regression"."""
    empty = [copy_run("none", tmp_path, name) for name in ("a", "b")]
    for run in empty:
        edit_json(next(run.glob("*_results.json")), lambda r: r.update({"results": {}, "n-samples": {}}))
        for log in run.glob("*_samples_*.jsonl"):
            log.unlink()
    code, out, err = lostattn(capsys, "check", empty[1], "--baseline", empty[0])
    assert code == 2 and "no task results; nothing to check" in err and "no regression" not in out
    untestable = [copy_run("none", tmp_path, name) for name in ("c", "d")]
    for run in untestable:
        edit_json(next(run.glob("*_results.json")), _keep_only_pope_f1)
        next(run.glob("*_samples_lostattn_shapes_color.jsonl")).unlink()
    code, out, err = lostattn(capsys, "check", untestable[1], "--baseline", untestable[0])
    assert code == 2 and "no metric of lostattn_pope can be tested per sample" in err, err
    assert "no regression" not in out


def _lm_eval_filtered_run(
    folder: pathlib.Path, strict: list[float], flexible: list[float], stem: str = "results"
) -> pathlib.Path:
    """An lm-eval run folder of a gsm8k-like task: ``exact_match`` under two filters and no ``none`` filter, with a
    statistics row (lm-eval puts it under ``none``; each filter's lines carry its per-sample values). ``stem``: the
    results file's name before the date, ``results`` for an --output_path folder, the file's stem for one naming a
    .json file."""
    folder.mkdir()
    date, rid = "2026-12-05T00-00-00.000001", [0.1 * (i + 1) for i in range(len(strict))]
    task = {"alias": "gsm", "lostattn_rid_attn,none": sum(rid) / len(rid)}
    for name, scores in (("strict-match", strict), ("flexible-extract", flexible)):
        task[f"exact_match,{name}"] = sum(scores) / len(scores)
    results = {
        "results": {"gsm": task},
        "configs": {"gsm": {"metric_list": [{"metric": "exact_match", "aggregation": "mean"}]}},
        "higher_is_better": {"gsm": {"exact_match": True}},
        "n-samples": {"gsm": {"original": len(strict), "effective": len(strict)}},
        "config": {"model": "lostattn-hf", "model_args": "pretrained=tiny", "limit": len(strict)},
        "lostattn": {"spec_hash": "0123456789ab", "intervention": {"mode": "none"}, "tasks": {}},
    }
    (folder / f"{stem}_{date}.json").write_text(json.dumps(results))
    lines = [{"doc_id": doc, "filter": name, "prompt_hash": f"p{doc}", "target_hash": f"t{doc}",
              "exact_match": scores[doc], "lostattn_rid_attn": rid[doc]}
             for name, scores in (("strict-match", strict), ("flexible-extract", flexible)) for doc in range(len(rid))]
    (folder / f"samples_gsm_{date}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def test_lm_eval_metrics_under_other_filters_are_tested_per_filter(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    """gsm8k-style tasks report ``exact_match`` only under named filters: each is checked, named as lm-eval keys it,
    on its own filter's samples lines."""
    base = _lm_eval_filtered_run(tmp_path / "base", [1.0] * 8, [1.0] * 8)
    run = _lm_eval_filtered_run(tmp_path / "run", [0.0] * 8, [1.0] * 8)
    code, out, err = lostattn(capsys, "check", run, "--baseline", base)
    assert code == 1, out + err
    assert "FAILED  gsm/exact_match,strict-match: 1.0000 -> 0.0000" in out
    assert "ok      gsm/exact_match,flexible-extract: 1.0000 -> 1.0000" in out
    code, out, _ = lostattn(capsys, "check", run, "--baseline", base, "--metrics", "gsm/exact_match,flexible-extract",
                            "lostattn_rid_attn")
    assert code == 0 and "ok      gsm/lostattn_rid_attn: " in out and "strict-match" not in out


def test_lm_eval_runs_saved_under_a_json_output_path_are_read(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    """``--output_path out/base.json`` makes lm-eval write ``out/base_<date>.json`` and its samples logs beside it:
    such runs load, as a folder or as the file."""
    base = _lm_eval_filtered_run(tmp_path / "base", [1.0] * 8, [1.0] * 8, stem="base")
    run = _lm_eval_filtered_run(tmp_path / "run", [0.0] * 8, [1.0] * 8, stem="my_run.v2")
    code, out, err = lostattn(capsys, "check", run, "--baseline", next(base.glob("base_*.json")))
    assert code == 1 and "FAILED  gsm/exact_match,strict-match: 1.0000 -> 0.0000" in out, out + err
    assert lostattn(capsys, "check", run, "--baseline", run)[0] == 0


# --- E, F: two runs of the same thing compare clean, under either harness and for a group ------------------------


def _lm_eval(model: str, model_args: str, tasks: str, limit: int, output: pathlib.Path, *extra: str) -> list[str]:
    return [
        *("lostattn-lm-eval", "--model", model, "--model_args", model_args, "--tasks", tasks),
        *("--include_path", str(tasks_path(host="lm_eval")), "--limit", str(limit), "--batch_size", "4"),
        *("--device", "cpu", "--output_path", str(output), "--log_samples", *extra),
    ]  # fmt: skip


def _lmms_eval(model_args: str, output: pathlib.Path, include_path: pathlib.Path) -> list[str]:
    return [
        *("lmms_eval", "--model", "lostattn_llava", "--model_args", model_args),
        *("--tasks", "lostattn_pope,filtered_color", "--include_path", str(include_path), "--limit", "4"),
        *("--gen_kwargs", "max_new_tokens=3", "--output_path", str(output), "--log_samples"),
    ]  # fmt: skip


def _tasks_with_a_filtered_one(folder: pathlib.Path) -> pathlib.Path:
    """The local lmms-eval tasks plus ``filtered_color``: the colour task under two named filters (as gsm8k has),
    which lmms-eval aggregates and logs once per filter, its samples log naming none."""
    shutil.copytree(tasks_path(), folder)
    colour = (folder / "lostattn_shapes_color.yaml").read_text()
    task = colour.replace("task: lostattn_shapes_color", "task: filtered_color")
    filters = "".join(f"\n  - name: {name}\n    filter:\n      - function: take_first" for name in ("strict", "flex"))
    (folder / "filtered_color.yaml").write_text(f"{task}\nfilter_list:{filters}\n")
    return folder


@pytest.mark.cli
def test_two_runs_of_the_same_command_line_check_and_compare_clean(
    capsys: pytest.CaptureFixture[str], tiny_model: Callable[[str], pathlib.Path], tiny_llava: pathlib.Path,
    tmp_path: pathlib.Path,
) -> None:
    """Each command line run twice: an lm-eval image task (its doc_hash holds an image's repr), an lm-eval group (no
    samples log of its own) and lmms-eval with a task under two filters; ``check`` passes and ``compare`` marks no
    cell not comparable. The filtered task's statistics rows are under ``none`` once, as under lm-eval."""
    image = ("lostattn-hf-multimodal", f"pretrained={SHAPES_LLAVA_DIR},dtype=float32,stats=paper",
             "lostattn_shapes_color", 6, "--apply_chat_template")
    group = ("lostattn-hf", f"pretrained={tiny_model('llama')},dtype=float32,stats=paper", "lostattn_shapes_text", 4)
    lmms = f"pretrained={tiny_llava},device=cpu,device_map=cpu,dtype=float32,stats=paper"
    outputs = {name: (tmp_path / f"{name}-1", tmp_path / f"{name}-2") for name in ("image", "group", "lmms")}
    lm_eval_argvs = [_lm_eval(*args[:4], out, *args[4:]) for name, args in (("image", image), ("group", group))
                     for out in outputs[name]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        include_path = _tasks_with_a_filtered_one(tmp_path / "tasks")
        lmms_eval_runs = pool.submit(run_cli_batch, [_lmms_eval(lmms, out, include_path) for out in outputs["lmms"]],
                                     tmp_path)
        run_cli_batch(lm_eval_argvs, tmp_path, host="lm_eval")
        lmms_eval_runs.result()
    for first, second in outputs.values():
        assert not run_error(first) and not run_error(second), run_error(first) or run_error(second)
        code, out, err = lostattn(capsys, "check", second, "--baseline", first)
        assert code == 0 and "no regression" in out and "ok      " in out, out + err
        code, _, err = lostattn(capsys, "compare", first, second, "-o", first.parent / f"{first.name}-compare")
        assert code == 0, err
        with (first.parent / f"{first.name}-compare" / "leaderboard.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        tests = {column: value for column, value in rows[1].items() if column.endswith(" test")}
        assert tests and not any(value.startswith("not comparable") for value in tests.values()), tests
        table = (first.parent / f"{first.name}-compare" / "leaderboard.md").read_text()
        assert "(†)" not in table
    _, out, _ = lostattn(capsys, "check", outputs["group"][1], "--baseline", outputs["group"][0], "--metrics",
                         "lostattn_shapes_text/lostattn_rid_attn")
    assert ("note    lostattn_shapes_text is a group (no samples log of its own): checked through its tasks "
            "lostattn_shapes_text_mc, lostattn_shapes_text_gen, lostattn_shapes_text_rolling") in out
    assert sum(line.startswith("ok") and "/lostattn_rid_attn" in line for line in out.splitlines()) == 3
    filtered = results_of(outputs["lmms"][0])["results"]["filtered_color"]
    assert {"exact_match,strict", "exact_match,flex", "lostattn_rid_attn,none"} <= set(filtered), filtered
    assert not [key for key in filtered if key.startswith("lostattn_") and not key.endswith(",none")], filtered
    _, out, _ = lostattn(capsys, "check", outputs["lmms"][1], "--baseline", outputs["lmms"][0], "--metrics",
                         "lostattn_rid_attn")
    assert sum(line.startswith("ok") and "/lostattn_rid_attn" in line for line in out.splitlines()) == 2, out


# --- G: relative output paths ------------------------------------------------------------------------------------


@pytest.fixture
def fake_lmms_eval(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], pathlib.Path]]:
    """lmms-eval's subprocess replaced: records (command, cwd) and writes the golden vanilla run where lmms-eval
    would, under ``--output_path`` taken relative to its working directory."""
    calls: list[tuple[list[str], pathlib.Path]] = []

    def run(command: list[str], cwd: pathlib.Path, **_: object) -> subprocess.CompletedProcess:
        calls.append((command, pathlib.Path(cwd)))
        target = pathlib.Path(cwd) / command[command.index("--output_path") + 1] / "model"
        shutil.copytree(RUNS / "none", target)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr("lmms_lostattn.model_wrappers.lmms_eval.launch.subprocess.run", run)
    return calls


def _no_nesting(root: pathlib.Path, runs: list[str], calls: list[tuple[list[str], pathlib.Path]]) -> None:
    assert [cwd for _, cwd in calls] == [root / run for run in runs]
    for command, cwd in calls:
        assert command[command.index("--output_path") + 1] == str(cwd)
        assert [path.parent for path in cwd.rglob("*_results.json")] == [cwd / "model"]
        assert not (cwd / "out").exists()


def test_demo_with_a_relative_output_writes_no_nested_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
    fake_lmms_eval: list[tuple[list[str], pathlib.Path]],
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = lostattn(capsys, "demo", "--output", "out/demo", "--limit", "2")
    assert code == 0, err
    _no_nesting(tmp_path / "out" / "demo", ["learned", "gaussian", "uniform", "knockout"], fake_lmms_eval)
    assert all(command[command.index("--limit") + 1] == "2" for command, _ in fake_lmms_eval)
    assert (tmp_path / "out" / "demo" / "compare" / "leaderboard.md").is_file()
    assert f"Outputs: {tmp_path / 'out' / 'demo'}" in out


def test_demo_again_into_the_same_output_redoes_its_runs(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path, fake_lmms_eval: list[tuple[list[str], pathlib.Path]],
) -> None:
    """An earlier demo's run folders are replaced, not added to: the report reads one run per folder."""
    earlier = tmp_path / "demo" / "learned" / "model"
    shutil.copytree(RUNS / "gaussian", earlier)  # an earlier run, another date id
    code, _, err = lostattn(capsys, "demo", "--output", tmp_path / "demo", "--limit", "2")
    assert code == 0, err
    assert [path.name for path in (tmp_path / "demo" / "learned").rglob("*_results.json")] == [
        next((RUNS / "none").glob("*_results.json")).name]


@pytest.mark.parametrize("command", ["report", "compare"])
def test_an_output_path_that_is_a_file_exits_2_naming_it(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path, command: str
) -> None:
    (tmp_path / "afile").write_text("")
    code, _, err = lostattn(capsys, command, RUNS / "none", "-o", tmp_path / "afile")
    assert code == 2 and "Traceback" not in err and str(tmp_path / "afile") in err, err


def test_reproduce_with_relative_paths_writes_no_nested_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
    fake_lmms_eval: list[tuple[list[str], pathlib.Path]],
) -> None:
    """``-o``, ``--include_path`` and a local ``pretrained=`` given relative to the working directory."""
    model = shutil.copytree(SHAPES_LLAVA_DIR, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    include = os.path.relpath(tasks_path(), tmp_path)
    code, _, err = lostattn(capsys, "reproduce", "--model", "lostattn_llava", "--model_args", "pretrained=model",
                            "--tasks", "lostattn_pope", "--seeds", "0", "--include_path", include,
                            "--sap-args", "attn_layers=1:", "-o", "out/repro")
    assert code == 0, err
    _no_nesting(tmp_path / "out" / "repro", ["vanilla", "noise_delta", "noise_qkv", "sap_seed0"], fake_lmms_eval)
    for command, _ in fake_lmms_eval:
        assert command[command.index("--include_path") + 1] == str(tasks_path().resolve())
        assert command[command.index("--model_args") + 1].startswith(f"pretrained={model.resolve()},")
    assert (tmp_path / "out" / "repro" / "table2.md").is_file()
