"""Contact points: one upstream internal each, with a quick behavioural check of it. Every component declares its
own (:mod:`lmms_lostattn.intervention.contacts` for transformers, each host folder's ``contacts.py``); the tests run
each one, and ``lostattn doctor`` runs them in a user's environment."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lmms_lostattn.compat.versions import installed


@dataclass(frozen=True)
class ContactPoint:
    """One upstream internal and a quick behavioural check of it (``check`` raises with what it found)."""

    name: str
    package: str
    check: Callable[[], None]

    def problem(self) -> str | None:
        """None when the check passes, else a line naming the contact point, the version and what went wrong."""
        try:
            self.check()
        except Exception as error:  # any failure of an upstream call is the finding
            found = installed(self.package) or "not installed"
            return f"{self.name} ({self.package} {found}): {type(error).__name__}: {error}"
        return None


def expect(condition: bool, what: str) -> None:
    """A contact point's check: ``what`` was found where ``condition`` was expected."""
    if not condition:
        raise AssertionError(what)
