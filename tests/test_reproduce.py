"""``lostattn reproduce``: bad input fails before any run; shapes-llava end to end on CPU, then again with nothing
re-run, then an interrupted run redone alone."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from lmms_lostattn.cli import main
from lmms_lostattn.model_wrappers.lmms_eval.launch import OFFLINE
from lmms_lostattn.models import SHAPES_LLAVA_DIR
from lmms_lostattn.tasks import tasks_path

BASE = f"pretrained={SHAPES_LLAVA_DIR},device=cpu,device_map=cpu,dtype=float32"
RUNS = ("vanilla", "noise_delta", "noise_qkv", "sap_seed0", "sap_seed1")


def _argv(
    output: pathlib.Path,
    model: str = "lostattn_llava",
    model_args: str = BASE,
    tasks: str = "lostattn_pope",
    seeds: str = "0,1",
    sap: str = "attn_layers=1:",
) -> list[str]:
    return [
        "reproduce",
        "--model",
        model,
        "--model_args",
        model_args,
        "--tasks",
        tasks,
        "--seeds",
        seeds,
        "--include_path",
        str(tasks_path()),
        "--sap-args",
        sap,
        "--limit",
        "4",
        "--gen_kwargs",
        "max_new_tokens=4",
        "-o",
        str(output),
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "llava_hf"}, r"--model 'llava_hf' is not a lostattn model; accepted: .*lostattn_llava"),
        ({"seeds": "0,one"}, r"--seeds '0,one': expected integers"),
        ({"seeds": "0,--1"}, r"--seeds '0,--1': expected integers"),
        ({"model_args": "pretrained=/no/such/checkpoint"}, r"pretrained=/no/such/checkpoint: "),
        ({"tasks": "lostattn_pope,no_such_task"}, r"--tasks: lmms-eval knows no task no_such_task"),
        ({"model_args": f"{BASE},attn=uniform"}, r"--model_args sets attn, which the runs set themselves"),
        ({"model_args": f"{BASE},atn_seed=3"}, r"--model_args: .*unknown argument\(s\) atn_seed \(did you mean"),
        ({"sap": "attn_layers=1:,attn_seed=3"}, r"--sap-args: attn_seed cannot be given; accepted: attn_space"),
        ({"sap": ""}, r"the sap_seed0 run cannot run on this model: .*selects layers 18-23 .* --sap-args"),
    ],
)
def test_bad_input_fails_before_any_run(tmp_path, capsys, change: dict, message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(_argv(tmp_path / "out", **change))
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_a_run_the_model_cannot_take_fails_before_any_run(tmp_path, capsys) -> None:
    """A LLaVA on Phi-3 (fused q/k/v) cannot take the third run, noise_qkv: refused before the first (config only)."""
    from transformers import CLIPVisionConfig, LlavaConfig, Phi3Config

    text = Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=400)
    LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2), text_config=text).save_pretrained(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(_argv(tmp_path / "out", model_args=f"pretrained={tmp_path},device=cpu,device_map=cpu"))
    assert exit_info.value.code == 2
    message = r"Table 1 needs the noise_qkv run \(attn=noise_qkv,.*\), which this model cannot run: .*noise_qkv"
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def _reproduce(output: pathlib.Path) -> str:
    argv = _argv(output, tasks="lostattn_pope,lostattn_shapes_color")
    done = subprocess.run(
        [sys.executable, "-m", "lmms_lostattn", *argv],
        env={**os.environ, **OFFLINE},
        capture_output=True,
        text=True,
        timeout=900,
        cwd=output.parent,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _results(output: pathlib.Path, run: str) -> pathlib.Path:
    (found,) = (output / run).rglob("*_results.json")
    return found


@pytest.mark.cli
def test_shapes_llava_end_to_end_then_nothing_re_run(tmp_path) -> None:
    output = tmp_path / "out"
    _reproduce(output)
    rows = list(csv.DictReader((output / "table1.csv").open()))
    assert [(row["row"], row["RID measured against"]) for row in rows] == [
        ("attention", "the layer's input (its own)"),
        ("FFN", "the FFN's input"),
        ("FFN", "the layer's input"),
        ("Noise Δ", "the layer's input (its own)"),
        ("Noise QKV", "the layer's input (its own)"),
    ]
    vanilla = json.loads(_results(output, "vanilla").read_text())["results"]["lostattn_pope"]
    (sidecar,) = (output / "vanilla").rglob("*_lostattn.json")
    layer_rid = json.loads(sidecar.read_text())["tasks"]["lostattn_pope"]["per_layer"]["ffn"]["all"]["rid_layer"]
    assert float(rows[0]["lostattn_pope RID"]) == pytest.approx(vanilla["lostattn_rid_attn,none"])
    assert float(rows[1]["lostattn_pope RID"]) == pytest.approx(vanilla["lostattn_rid_ffn,none"])
    assert float(rows[2]["lostattn_pope RID"]) == pytest.approx(layer_rid["overall"]["mean"])
    table2 = list(csv.DictReader((output / "table2.csv").open()))
    assert [row["task"] for row in table2] == ["lostattn_pope", "lostattn_shapes_color"]
    saps = [json.loads(_results(output, f"sap_seed{s}").read_text()) for s in (0, 1)]
    assert [sap["lostattn"]["intervention"]["seed"] for sap in saps] == [0, 1]
    accuracies = [sap["results"]["lostattn_pope"]["pope_accuracy,none"] for sap in saps]
    assert float(table2[0]["SAP mean ± sd (2 seeds)"]) == pytest.approx(sum(accuracies) / 2)
    assert len(table2[0]["p per seed (0, 1)"].split(", ")) == 2
    assert (output / "report" / "layers_lostattn_pope.png").is_file()

    written = {run: _results(output, run).stat().st_mtime_ns for run in RUNS}
    again = _reproduce(output)
    assert all(f"{run} is done" in again for run in RUNS)
    assert {run: _results(output, run).stat().st_mtime_ns for run in RUNS} == written

    _results(output, "noise_qkv").unlink()  # a finished run's results file lost
    (output / "sap_seed1" / "command.json").unlink()  # a run interrupted while writing its samples log
    (samples,) = (output / "sap_seed1").rglob("*_samples_lostattn_pope.jsonl")
    samples.write_text(samples.read_text()[:50])
    third = _reproduce(output)
    redone = ("noise_qkv", "sap_seed1")
    assert all(f"{run} is done" not in third for run in redone)
    assert all(f"{run} is done" in third for run in RUNS if run not in redone)
    (samples,) = (output / "sap_seed1").rglob("*_samples_lostattn_pope.jsonl")
    assert _results(output, "noise_qkv").is_file() and len(samples.read_text().splitlines()) == 4


def test_the_tables_note_a_run_kept_from_other_versions(tmp_path: pathlib.Path) -> None:
    """A run kept from an earlier invocation may have run under other package versions (or hub kernels): both tables
    say so. The golden runs of the tiny model stand in for the plan's runs."""
    import shutil

    from lmms_lostattn.model_wrappers.lmms_eval.reproduce import tables

    golden = pathlib.Path(__file__).parent / "data" / "runs"
    plan = {"vanilla": "none", "noise_delta": "noise_delta", "noise_qkv": "knockout", "sap_seed0": "gaussian",
            "sap_seed1": "gaussian"}
    folders = {name: pathlib.Path(shutil.copytree(golden / run, tmp_path / name)) for name, run in plan.items()}
    assert not any("versions differ" in text for text in tables(folders).values())

    def recorded_under(run: str, release: str) -> None:
        (results,) = folders[run].rglob("*_results.json")
        raw = json.loads(results.read_text())
        raw["lostattn"]["versions"]["transformers"] = release
        results.write_text(json.dumps(raw))

    recorded_under("sap_seed0", "5.23.0")
    written = tables(folders)
    assert "sap_seed0: versions differ from vanilla (transformers 5.24.0 -> 5.23.0)" in written["table2.md"]
    assert "versions differ" not in written["table1.md"]  # Table 1 holds no SAP run
    recorded_under("sap_seed0", "5.24.0")
    recorded_under("vanilla", "5.23.0")  # the odd one out is named, against a run the others agree with
    written = tables(folders)
    assert "vanilla: versions differ from noise_delta (transformers 5.24.0 -> 5.23.0)" in written["table1.md"]
    assert "vanilla: versions differ from sap_seed0 (transformers 5.24.0 -> 5.23.0)" in written["table2.md"]
    assert all(text.count("versions differ") == 1 for name, text in written.items() if name.endswith(".md"))


def test_a_run_that_stops_midway_is_run_again(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run is done once lmms-eval returned: one stopped after writing its results file (before its samples logs)
    is run again by the next invocation, and a finished one is not (golden runs stand in for lmms-eval's output)."""
    import shutil

    from lmms_lostattn.model_wrappers.lmms_eval import reproduce

    golden = pathlib.Path(__file__).parent / "data" / "runs" / "none"
    calls: list[str] = []

    def lmms_eval(model: str, model_args: str, tasks: tuple, folder: pathlib.Path, *extra: str) -> None:
        calls.append(folder.name)
        shutil.copytree(golden, folder, dirs_exist_ok=True)
        if len(calls) == 1:
            raise KeyboardInterrupt  # stopped with the results file written

    monkeypatch.setattr(reproduce, "run_lmms_eval", lmms_eval)
    plan = reproduce.Plan("lostattn_llava", "pretrained=m", ("lostattn_pope",), (), {"vanilla": "attn=none"})
    with pytest.raises(KeyboardInterrupt):
        reproduce.run_plan(plan, tmp_path)
    reproduce.run_plan(plan, tmp_path)
    reproduce.run_plan(plan, tmp_path)
    assert calls == ["vanilla", "vanilla"]

    def unreadable(model: str, model_args: str, tasks: tuple, folder: pathlib.Path, *extra: str) -> None:
        calls.append(folder.name)
        shutil.copytree(golden, folder, dirs_exist_ok=True)
        for log in folder.rglob("*_samples_*.jsonl"):
            log.write_text(log.read_text() * 2)  # every doc_id twice

    monkeypatch.setattr(reproduce, "run_lmms_eval", unreadable)
    plan = reproduce.Plan("lostattn_llava", "pretrained=m", ("lostattn_pope",), (), {"vanilla": "attn=gaussian"})
    for _ in range(2):  # refused at once, each time, and never taken for done
        with pytest.raises(reproduce.ReproduceError, match="vanilla: lmms-eval ended, but its output does not load"):
            reproduce.run_plan(plan, tmp_path)
    assert calls == ["vanilla"] * 4
