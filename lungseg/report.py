"""Pictures people look at: training curves (matplotlib, no Ray)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def curves_png(history: list[dict]) -> bytes:
    """Loss and Dice per epoch, training and validation side by side, as PNG bytes."""
    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for axis, metric in zip(axes, ("loss", "dice"), strict=True):
        for prefix, style in (("", "-o"), ("val_", "--s")):
            values = [row.get(prefix + metric) for row in history]
            points = [(e, v) for e, v in zip(epochs, values, strict=True) if v is not None]
            if points:
                axis.plot(*zip(*points, strict=True), style, label=prefix + metric)
        axis.set_xlabel("epoch")
        axis.set_title(metric.capitalize())
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
