"""One figure per document: the image and, laid on its patches, the last prompt token's attention per layer
(matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from lmms_lostattn.inspection.attention_maps import LayerMap  # noqa: E402

PANEL, DPI = 2.6, 100  # inches per panel


def _panels(layer: LayerMap) -> list[tuple[str, np.ndarray]]:
    """(title, map) of one layer's row: learned and edited, over every head and over the edited heads."""
    heads = ",".join(map(str, layer.band_heads))
    found = [
        ("learned, mean over heads", layer.learned),
        ("edited (as run), mean over heads", layer.edited),
        (f"learned, edited heads {heads}", layer.band_learned),
        (f"edited, heads {heads}", layer.band_edited),
    ]
    return [(title, values) for title, values in found if values is not None]


def save_figure(image: Image.Image, question: str, layers: Sequence[LayerMap], path: Path) -> Path:
    """Write ``path`` (PNG): a row per layer, the image beside each of its maps laid over it (one colour scale per
    row, 0 to the row's largest patch value; each panel titled with its total mass on the patches)."""
    rows = [_panels(layer) for layer in layers]
    columns = 1 + max(len(row) for row in rows)
    figure, axes = plt.subplots(len(rows), columns, figsize=(PANEL * columns, PANEL * len(rows) + 0.6), squeeze=False)
    picture = np.asarray(image.convert("RGB"))
    extent = (0, picture.shape[1], picture.shape[0], 0)
    for axis_row, layer, panels in zip(axes, layers, rows, strict=True):
        top = max(float(values.max()) for _, values in panels) or 1.0
        axis_row[0].imshow(picture)
        axis_row[0].set_title(f"layer {layer.layer}", fontsize=9)
        for axis, (title, values) in zip(axis_row[1:], panels, strict=False):
            axis.imshow(picture)
            shown = axis.imshow(values, extent=extent, cmap="magma", alpha=0.65, vmin=0.0, vmax=top,
                                interpolation="nearest")
            axis.set_title(f"{title}\nmass on patches {values.sum():.3f}", fontsize=8)
        figure.colorbar(shown, ax=axis_row[len(panels)], fraction=0.046)
        for axis in axis_row:
            axis.set_xticks([])
            axis.set_yticks([])
        for axis in axis_row[1 + len(panels):]:
            axis.axis("off")
    figure.suptitle(f"last prompt token's attention over the image: {question}", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return path
