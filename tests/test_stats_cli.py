"""``stats=paper`` through the lmms-eval command line: table rows, sidecar, samples, two ranks, cache, parity."""

from __future__ import annotations

import json
import math
import pathlib
import sys

import pytest
from cli_helpers import lmms_eval_argv, results_of, run_cli, run_cli_batch, run_error, samples_of

from lmms_lostattn.model_wrappers.lmms_eval.base import PROGRESS

pytestmark = pytest.mark.cli

TASKS = ("lostattn_pope", "lostattn_shapes_color")  # yes/no POPE format and a free-form colour question
ROWS = ("lostattn_rid_attn", "lostattn_rid_ffn", "lostattn_mixig_attn", "lostattn_mixig_ffn")
LIMIT = 5  # odd, so two ranks get unequal shares and lmms-eval pads one of them


def model_args(tiny: pathlib.Path, **extra: str) -> str:
    args = {
        "pretrained": str(tiny),
        "device": "cpu",
        "device_map": "cpu",
        "dtype": "float32",
        "attn": "gaussian",
        "attn_layers": "1-3",
        **extra,
    }
    return ",".join(f"{k}={v}" for k, v in args.items())


@pytest.fixture(scope="module")
def runs(tiny_llava: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The runs that depend on no other, one after another in one lmms-eval process, each under ``<dir>/<name>``
    (their log in ``<dir>/stderr.txt``): ``one_rank`` (stats=paper, both tasks, ``--log_samples``), ``plain`` (the
    same with stats=none) and ``released`` / ``all`` (those statistics, POPE, 2 documents)."""
    root = tmp_path_factory.mktemp("stats_cli")
    both = {"tasks": ",".join(TASKS), "limit": LIMIT}
    stats = {"one_rank": "paper", "plain": None, "released": "released", "all": "all"}
    argvs = []
    for name, kind in stats.items():
        args = model_args(tiny_llava, **({"stats": kind} if kind else {}))
        options = both if name in ("one_rank", "plain") else {}
        extra = ("--log_samples",) if options else ()
        argvs.append(lmms_eval_argv("lostattn_llava", args, root / name, *extra, **options))
    (root / "stderr.txt").write_text(run_cli_batch(argvs, root))
    for name in stats:
        assert not run_error(root / name), f"{name}:\n{run_error(root / name)}"
    return root


@pytest.fixture(scope="module")
def one_rank(runs: pathlib.Path) -> pathlib.Path:
    return runs / "one_rank"


def test_table_rows_are_finite_beside_each_tasks_own_metrics(one_rank: pathlib.Path) -> None:
    results = results_of(one_rank)
    for task, own_metric in zip(TASKS, ("pope_accuracy,none", "exact_match,none"), strict=True):
        metrics = results["results"][task]
        assert own_metric in metrics
        for row in ROWS:
            assert math.isfinite(metrics[f"{row},none"]), (task, row)
            assert math.isfinite(metrics[f"{row}_stderr_clt,none"])
        assert metrics["lostattn_samples,none"] == LIMIT
        assert not any(key.startswith("lostattn_layers") for key in metrics)
    assert results["lostattn"]["intervention"]["mode"] == "gaussian"
    assert len(results["lostattn"]["spec_hash"]) == 12


def test_one_progress_bar_over_all_requests(runs: pathlib.Path) -> None:
    """Requests run one at a time inside the scope: the base class's per-call bars are silenced, one bar counts all."""
    log = (runs / "stderr.txt").read_text()
    assert f"{PROGRESS}: 100%" in log
    assert "Model Responding:" not in log


def test_sidecar_has_one_entry_per_decoder_layer(one_rank: pathlib.Path) -> None:
    (sidecar_path,) = one_rank.rglob("*_lostattn.json")
    sidecar = json.loads(sidecar_path.read_text())
    assert sidecar["spec_hash"] == results_of(one_rank)["lostattn"]["spec_hash"]
    assert {"torch", "transformers", "lmms_eval", "lmms-lostattn"} == set(sidecar["versions"])
    for task in TASKS:
        per_layer = sidecar["tasks"][task]["per_layer"]
        assert sidecar["tasks"][task]["samples"] == LIMIT
        for module in ("attn", "ffn"):
            for metric in ("rid", "mixig"):
                layers = per_layer[module]["all"][metric]["layers"]
                assert len(layers["mean"]) == 4 and all(math.isfinite(v) for v in layers["mean"])
                assert layers["n"] == [LIMIT] * 4
                overall = per_layer[module]["all"][metric]["overall"]["mean"]
                table = results_of(one_rank)["results"][task][f"lostattn_{metric}_{module},none"]
                assert overall == pytest.approx(table)


def test_samples_log_carries_per_sample_values(one_rank: pathlib.Path) -> None:
    samples = samples_of(one_rank, "lostattn_pope")
    assert len(samples) == LIMIT
    for sample in samples:
        assert math.isfinite(sample["lostattn_rid_attn"])
        per_layer = sample["lostattn_layers"]["values"]["attn"]["all"]["rid"]
        assert sample["lostattn_rid_attn"] == pytest.approx(sum(per_layer) / len(per_layer))


def test_two_ranks_aggregate_like_one(tiny_llava: pathlib.Path, one_rank: pathlib.Path, tmp_path: pathlib.Path) -> None:
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533")
    run_cli(
        "--model",
        "lostattn_llava",
        "--model_args",
        model_args(tiny_llava, stats="paper"),
        "--tasks",
        ",".join(TASKS),
        output=tmp_path,
        limit=LIMIT,
        launcher=launcher,
    )
    two, one = results_of(tmp_path)["results"], results_of(one_rank)["results"]
    for task in TASKS:
        assert two[task]["lostattn_samples,none"] == LIMIT
        for row in ROWS:
            assert two[task][f"{row},none"] == pytest.approx(one[task][f"{row},none"], rel=1e-5, abs=1e-7)


def test_stats_none_answers_exactly_like_stats_paper(runs: pathlib.Path, one_rank: pathlib.Path) -> None:
    for task in TASKS:
        plain = [s["filtered_resps"] for s in samples_of(runs / "plain", task)]
        assert plain == [s["filtered_resps"] for s in samples_of(one_rank, task)] and len(plain) == LIMIT
    assert not any(key.startswith("lostattn_") for key in results_of(runs / "plain")["results"][TASKS[0]])


def test_cached_answers_are_counted_not_crashed_on(tiny_llava: pathlib.Path, tmp_path: pathlib.Path) -> None:
    cache = ("--use_cache", str(tmp_path / "cache"))
    argv = model_args(tiny_llava, stats="paper")
    runs = [lmms_eval_argv("lostattn_llava", argv, tmp_path / name, *cache, tasks=TASKS[0], limit=3)
            for name in ("first", "second")]  # one after the other, in one process
    run_cli_batch(runs, tmp_path)
    assert not run_error(tmp_path / "first") and not run_error(tmp_path / "second")
    first = results_of(tmp_path / "first")["results"][TASKS[0]]
    second = results_of(tmp_path / "second")["results"][TASKS[0]]
    assert first["lostattn_samples,none"] == 3 and second["lostattn_samples,none"] == 0
    assert "lostattn_rid_attn,none" not in second
    assert second["pope_accuracy,none"] == first["pope_accuracy,none"]


def test_released_definitions_name_their_rows(runs: pathlib.Path) -> None:
    """``stats=released`` (the FFN's RID against the layer's input, ΔD as l2) and ``stats=all`` with the module
    reference through the command line: the RID rows say which definition they report, MixIG rows keep their name,
    the choices are in the results JSON and its spec hash, and the sidecar has the FFN's layer-referenced RID."""
    hashes = {}
    for kind in ("released", "all"):
        out = runs / kind
        results = results_of(out)
        metrics, settings = results["results"][TASKS[0]], results["lostattn"]["stats"]
        rid_rows = ("lostattn_rid_attn_l2", "lostattn_rid_ffn_layer_l2") if kind == "released" else ROWS[:2]
        for row in (*rid_rows, "lostattn_mixig_attn", "lostattn_mixig_ffn"):
            assert math.isfinite(metrics[f"{row},none"]), (kind, row)
        assert (settings["stats_reference"], settings["stats_combine"]) == (
            ("layer", "l2") if kind == "released" else ("module", "mean")
        )
        hashes[kind] = results["lostattn"]["spec_hash"]
        if kind == "all":
            (sidecar,) = out.rglob("*_lostattn.json")
            ffn = json.loads(sidecar.read_text())["tasks"][TASKS[0]]["per_layer"]["ffn"]["all"]
            assert {"rid_layer", "delta_d_layer", "tme_update"} <= set(ffn)
    assert hashes["released"] != hashes["all"]
