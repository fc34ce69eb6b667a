"""lmms-lostattn: attention interventions and residual statistics for LVLMs under lmms-eval."""

from __future__ import annotations

__version__ = "0.1.0"
