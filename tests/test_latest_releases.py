"""``.ci/latest``: how a run in an environment with the newest upstream releases becomes one verdict per upstream."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from importlib.machinery import SourceFileLoader

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / ".ci" / "latest"


@pytest.fixture(scope="module")
def latest():
    """The script as a module (it has no ``.py`` suffix; its dataclass needs it registered while it loads)."""
    loader = SourceFileLoader("ci_latest", str(SCRIPT))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("ci_latest", loader))
    sys.modules["ci_latest"] = module
    try:
        loader.exec_module(module)
        yield module
    finally:
        del sys.modules["ci_latest"]


DOCTOR = """contact points with upstream internals
  ok       transformers.integrations.sdpa_attention.sdpa_attention_forward
  FAILED   lmms-lostattn: the model forward's KV-cache argument (transformers 5.26.0) has moved: expected ...
  ok       lmms_eval.utils._smart_comma_split
NOT supported: 1 problem(s) above."""

PYTEST = """..F.E
FAILED tests/test_scope.py::test_cache - AssertionError: x
ERROR tests/test_families.py::test_llava[llava] - RuntimeError: y
1 failed, 700 passed, 76 deselected, 1 error in 300.12s (0:05:00)
"""


def test_doctor_and_pytest_output_are_read(latest) -> None:
    assert latest.doctor_failures(1, DOCTOR) == [
        "lmms-lostattn: the model forward's KV-cache argument (transformers 5.26.0) has moved: expected ..."
    ]
    failed, summary = latest.pytest_failures(1, PYTEST)
    assert failed == ["tests/test_scope.py::test_cache", "tests/test_families.py::test_llava[llava]"]
    assert summary == "1 failed, 700 passed, 76 deselected, 1 error in 300.12s (0:05:00)"
    assert latest.pytest_failures(0, "====== 732 passed, 76 deselected in 294.58s (0:04:54) ======") == (
        [],
        "732 passed, 76 deselected in 294.58s (0:04:54)",
    )


def test_a_crash_without_failure_lines_is_a_failure(latest) -> None:
    """A doctor that crashed, or a pytest that stopped at collection, fails the run even when it names nothing."""
    assert latest.doctor_failures(1, "Traceback ...\nImportError: cannot import name 'x'") == [
        "doctor exited 1: ImportError: cannot import name 'x'"
    ]
    assert latest.pytest_failures(4, "ERROR: usage") == (["pytest exited 4"], "no pytest summary")


def test_one_verdict_per_upstream(latest) -> None:
    locked = {"transformers": "5.25.0", "torch": "2.15.0", "lmms-eval": "0.7.3", "lm-eval": "0.4.13"}
    newest = {"transformers": "5.26.0", "torch": "2.16.0", "lmms-eval": "0.7.3", "lm-eval": "0.4.14"}
    failed = [f"tests/t.py::test_{i}" for i in range(5)]
    outcomes = {
        "transformers": latest.Outcome(doctor_failed=["the KV cache moved"]),
        "torch": latest.Outcome(tests_failed=failed, tests_summary="5 failed, 10 passed"),
        "lmms-eval": latest.Outcome(),
        "lm-eval": latest.Outcome(install_error="ERROR: No matching distribution"),
    }
    assert latest.verdicts(locked, newest, outcomes) == [
        "transformers 5.26.0 (locked 5.25.0): moved: the KV cache moved",
        "torch 2.16.0 (locked 2.15.0): failed: tests/t.py::test_0, tests/t.py::test_1, tests/t.py::test_2 and 2 more "
        "(5 failed, 10 passed)",
        "lmms-eval 0.7.3 (locked 0.7.3): current",
        "lm-eval 0.4.14 (locked 0.4.13): not installable: ERROR: No matching distribution",
    ]
    outcomes["torch"] = latest.Outcome(tests_summary="15 passed")
    assert latest.verdicts(locked, newest, outcomes)[1] == "torch 2.16.0 (locked 2.15.0): ok"


def test_the_lock_is_read_by_canonical_name(latest, tmp_path: pathlib.Path) -> None:
    lock = tmp_path / "constraints.txt"
    lock.write_text("# header with == in it\nlm_eval==0.4.13\nTorch==2.15.0\n")
    assert latest.locked_versions(lock) == {"lm-eval": "0.4.13", "torch": "2.15.0"}
