"""Shared pytest fixtures."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator

import pytest


def pytest_sessionstart(session: pytest.Session) -> None:
    """Outside the tested versions, stop before any model runs, naming the package and its range."""
    from lmms_lostattn.compat.versions import UpstreamError, require_tested_versions

    try:
        require_tested_versions()
    except UpstreamError as error:
        pytest.exit(str(error), returncode=2)


def _tiny_model(tmp_path_factory: pytest.TempPathFactory, variant: str) -> pathlib.Path:
    """Build (once per session) a tiny random model (any factory variant) in a session temp cache, not the user
    cache."""
    from lmms_lostattn.testing import tiny_model_dir

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOSTATTN_CACHE", str(tmp_path_factory.getbasetemp() / "lostattn_cache"))
        return tiny_model_dir(variant)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Directory of a tiny random-weight LLaVA-1.5-style model + processor (16 image tokens per image)."""
    return _tiny_model(tmp_path_factory, "llava")


@pytest.fixture(scope="session")
def tiny_llava_next(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Directory of a tiny random-weight LLaVA-NeXT-style model + processor (36-88 image tokens per image)."""
    return _tiny_model(tmp_path_factory, "llava_next")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], pathlib.Path]:
    """``tiny_model(variant)``: directory of a tiny model of any ``lmms_lostattn.testing.FAMILY_VARIANTS``, built
    once per session."""
    return lambda variant: _tiny_model(tmp_path_factory, variant)


@pytest.fixture
def logged_warnings() -> Iterator[list[str]]:
    """The warnings the package logs meanwhile (loguru, as the hosts log; lmms-eval silences the warnings module)."""
    from loguru import logger

    messages: list[str] = []
    handle = logger.add(lambda message: messages.append(str(message)), level="WARNING", format="{message}")
    yield messages
    logger.remove(handle)
