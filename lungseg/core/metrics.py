"""Per-image confusion counts, Dice and IoU in NumPy: what lands in the Parquet tables; and
Spearman's rank correlation and the AUROC, for how well quality control foretells them.

Both-empty masks (no lung in truth nor prediction) count as perfect agreement: Dice = IoU = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Confusion:
    """Pixel counts of one predicted mask against its ground truth."""

    tp: int
    fp: int
    fn: int

    @property
    def dice(self) -> float:
        denominator = 2 * self.tp + self.fp + self.fn
        return 1.0 if denominator == 0 else 2 * self.tp / denominator

    @property
    def iou(self) -> float:
        denominator = self.tp + self.fp + self.fn
        return 1.0 if denominator == 0 else self.tp / denominator


def confusion(prediction: np.ndarray, truth: np.ndarray) -> Confusion:
    """Count true positives, false positives and false negatives of two same-shape masks."""
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in shape")
    pred, true = prediction.astype(bool), truth.astype(bool)
    return Confusion(
        tp=int(np.count_nonzero(pred & true)),
        fp=int(np.count_nonzero(pred & ~true)),
        fn=int(np.count_nonzero(~pred & true)),
    )


def ranks(values: list[float]) -> np.ndarray:
    """1-based ranks of ``values``, ties sharing their mean rank."""
    array = np.asarray(values, float)
    order = np.argsort(array, kind="stable")
    ranked = np.empty(len(array))
    ranked[order] = np.arange(1, len(array) + 1)
    for value in np.unique(array):
        tied = array == value
        ranked[tied] = ranked[tied].mean()
    return ranked


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation of two equally long lists; None where either is constant."""
    rx, ry = ranks(x), ranks(y)
    if len(x) < 2 or rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def auroc(scores: list[float], positive: list[bool]) -> float | None:
    """The area under the ROC curve of ``scores`` for telling the ``positive`` items from the
    others: the chance that a positive scores above a negative, ties counting half
    (Mann-Whitney's U over both counts). None without both."""
    flags = np.asarray(positive, bool)
    positives, negatives = int(flags.sum()), int((~flags).sum())
    if not positives or not negatives:
        return None
    above = ranks(scores)[flags].sum() - positives * (positives + 1) / 2
    return float(above / (positives * negatives))
