"""Per-layer RID and MixIG against layer depth, from the runs' sidecars (matplotlib, Agg backend).

One figure per task and one across tasks (``ALL_TASKS``): two panels (RID, MixIG), a colour per run, attention
solid and FFN dashed, a band of ± one stderr. Across tasks, each layer's value is the sample-weighted mean of the
task means, with stderr sqrt(Σ (n_t/N)² se_t²) (tasks as independent strata).
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from lmms_lostattn.reporting.runs import LoadedRun  # noqa: E402

ALL_TASKS = "all_tasks"
FIGSIZE, DPI = (11.0, 4.2), 100  # 1100 x 420 pixels
STYLES = {"attn": ("attention", "-"), "ffn": ("FFN", "--")}


def layer_curve(run: LoadedRun, task: str, module: str, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, stderr) per layer of ``metric`` for ``module`` on ``task`` (or pooled over tasks), None if absent."""
    group = (run.block.get("stats") or {}).get("table_group") or "all"
    tasks = (run.sidecar or {}).get("tasks", {})
    entries: list[dict[str, Any]] = [
        layers for name, entry in tasks.items() if task in (ALL_TASKS, name)
        if (layers := entry.get("per_layer", {}).get(module, {}).get(group, {}).get(metric, {}).get("layers"))
    ]
    if not entries:
        return None
    n = np.array([e["n"] for e in entries], dtype=float)
    weights = n / np.maximum(n.sum(axis=0), 1)
    mean = (weights * np.array([e["mean"] for e in entries], dtype=float)).sum(axis=0)
    stderr = np.sqrt((weights**2 * np.array([e["stderr"] for e in entries], dtype=float) ** 2).sum(axis=0))
    return mean, stderr


def layer_figure(runs: Sequence[LoadedRun], task: str) -> plt.Figure | None:
    """The figure for ``task`` (or ``ALL_TASKS``); None when no run has per-layer statistics for it."""
    figure, axes = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI)
    drawn = False
    for colour, run in zip(itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"]), runs):
        for axis, metric in zip(axes, ("rid", "mixig"), strict=True):
            for module, (name, style) in STYLES.items():
                curve = layer_curve(run, task, module, metric)
                if curve is None:
                    continue
                mean, stderr = curve
                layers = np.arange(len(mean))
                axis.plot(layers, mean, style, color=colour, marker="o", ms=3, label=f"{run.name}: {name}")
                axis.fill_between(layers, mean - stderr, mean + stderr, color=colour, alpha=0.2, lw=0)
                drawn = True
    if not drawn:
        plt.close(figure)
        return None
    for axis, title in zip(axes, ("RID", "MixIG"), strict=True):
        axis.set(xlabel="decoder layer", ylabel=title, title=f"{title} — {task.replace('_', ' ')}")
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].legend(fontsize=7, loc="best")
    figure.tight_layout()
    return figure


def layer_images(runs: Sequence[LoadedRun], formats: Sequence[str] = ("png",)) -> dict[str, dict[str, bytes]]:
    """Encoded figures (format -> bytes, at the fixed size) keyed by task name, then ``ALL_TASKS``; tasks without
    per-layer statistics are left out."""
    tasks = sorted({task for run in runs for task in (run.sidecar or {}).get("tasks", {})})
    images = {}
    for task in [*tasks, ALL_TASKS] if tasks else []:
        figure = layer_figure(runs, task)
        if figure is not None:
            images[task] = {}
            for fmt in formats:
                buffer = io.BytesIO()
                figure.savefig(buffer, format=fmt)
                images[task][fmt] = buffer.getvalue()
            plt.close(figure)
    return images
