"""The tested versions of the upstream packages, and the error for anything upstream that moved.

transformers changes its internals between minor releases (5.24 renamed the forward's KV-cache argument
``past_key_values`` to ``cache`` and stopped passing an all-ones ``attention_mask``), and a moved internal must
read as one clear error naming it, never as a wrong number. :func:`version_problems` compares the installed
versions with the ranges this package declares (its own metadata, i.e. ``pyproject.toml``),
:func:`require_tested_versions` refuses to start outside them, and :func:`drift` is the error every contact point
raises when an internal moved.
"""

from __future__ import annotations

import functools
import os
from importlib.metadata import PackageNotFoundError, requires, version

from loguru import logger
from packaging.requirements import Requirement

DISTRIBUTION = "lmms-lostattn"
ALLOW_UNTESTED = "LOSTATTN_ALLOW_UNTESTED"  # set to 1 to run outside the tested ranges (a warning instead)
HOST_EXTRAS = ("lm-eval",)  # the extras that add a second host: their pins hold whenever the host is installed

class UpstreamError(RuntimeError):
    """An upstream package is outside the tested range or moved an internal the package relies on."""


def installed(package: str) -> str | None:
    """The installed version of ``package``, or None."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def optional(req: Requirement) -> bool:
    """Whether ``req`` comes with an extra (:data:`HOST_EXTRAS`): its range holds only where it is installed."""
    return req.marker is not None and "extra" in str(req.marker)


def in_force(req: Requirement) -> bool:
    """Whether ``req``'s range holds here: always, or for a host extra's requirement where that host is installed."""
    return not optional(req) or installed(req.name) is not None


@functools.cache
def tested_requirements() -> tuple[Requirement, ...]:
    """The package's own runtime requirements and those of :data:`HOST_EXTRAS` (the bounds in ``pyproject.toml``)."""
    try:
        lines = requires(DISTRIBUTION) or []
    except PackageNotFoundError as error:
        raise UpstreamError(
            f"{DISTRIBUTION} is not installed (pip install .), so its tested ranges are unknown"
        ) from error
    return tuple(
        req for req in map(Requirement, lines)
        if not optional(req) or any(req.marker.evaluate({"extra": extra}) for extra in HOST_EXTRAS)
    )


def tested_range(package: str) -> str:
    """The declared range of ``package`` (e.g. ``>=5.23,<5.25``), or ``any`` when it is not a dependency."""
    for req in tested_requirements():
        if req.name.lower().replace("_", "-") == package.lower().replace("_", "-"):
            return str(req.specifier) or "any"
    return "any"


def drift(package: str, contact: str, expected: str) -> UpstreamError:
    """The error for an internal that moved: the contact point, the version found, what was expected."""
    found = installed(package) or "not installed"
    return UpstreamError(
        f"lmms-lostattn: {contact} ({package} {found}) has moved: expected {expected}. Tested {package} "
        f"{tested_range(package)}; run `lostattn doctor` for the whole environment."
    )


def version_problems() -> list[str]:
    """One line per declared dependency whose installed version is missing (a host extra's may be) or outside its
    declared range."""
    problems = []
    for req in filter(in_force, tested_requirements()):
        found = installed(req.name)
        if found is None:
            problems.append(f"{req.name} is not installed (need {req.specifier or 'any version'})")
        elif not req.specifier.contains(found, prereleases=True):
            problems.append(f"{req.name} {found} is installed; lmms-lostattn is tested with {req.name}{req.specifier}")
    return problems


def install_command() -> str:
    """``pip install`` of the tested ranges (a host extra's only where that host is installed)."""
    wanted = [req for req in tested_requirements() if req.specifier and in_force(req)]
    return "pip install " + " ".join(f"'{req.name}{req.specifier}'" for req in wanted)


@functools.cache
def require_tested_versions() -> None:
    """Refuse to start outside the tested ranges (before any model loads); ``LOSTATTN_ALLOW_UNTESTED=1`` turns the
    refusal into a warning."""
    problems = version_problems()
    if not problems:
        return
    fix = install_command()
    message = "; ".join(problems) + f". Install the tested versions ({fix}), or run `lostattn doctor`."
    if os.environ.get(ALLOW_UNTESTED) == "1":
        logger.warning(f"lmms-lostattn: running outside the tested versions: {message}")
        return
    raise UpstreamError(f"lmms-lostattn: {message} ({ALLOW_UNTESTED}=1 runs anyway, untested.)")


