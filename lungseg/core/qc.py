"""How far a predicted lung mask can be trusted, without a ground truth to compare it with.

:func:`implausible` names masks that cannot be a pair of lungs. Its bounds come from the 604
expert masks of the Montgomery and Shenzhen sets, taken to the model's 256 x 256: lungs cover
8.4% to 43.3% of an image (1st to 99th percentile 13.3% to 39.7%), every mask has two lungs, and
the smaller lung is at least a tenth of the larger (1st percentile 0.46).

:func:`assess` predicts the Dice of plausible masks too (``qc_dice``), from four measures of
the one pass of the model that drew the mask and the image it saw (:func:`features`): how much
of the image the lungs cover, how much of the mask the model was unsure of, how much
probability it left outside the mask, and whether the mask's lower border sits on a diaphragm
(:func:`lower_border`). A ridge regression of the true Dice on them, fitted by the model's
trainer on its own training images (:func:`calibrate`, stored in the model file as
:class:`Calibration`), turns them into a Dice. The bundled model's poor masks are confident ones
(they leave out the lung behind the heart or an opacity): an atlas check, a CNN regressor and a
second, contrast-enhanced view were measured beside this and did not rank them better for their
cost (docs/quality-control.md has the table).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import mean

import cv2
import numpy as np

from lungseg.core import imaging
from lungseg.core.layout import REVIEW
from lungseg.core.metrics import auroc, confusion, spearman

LUNG_FRACTION = (0.04, 0.60)
"""The share of the image that plausible lungs cover: half the least and 1.4 times the most of
the expert masks."""
SMALLER_LUNG = 0.10
"""The least area of the smaller lung as a share of the larger (expert masks: 0.10 and up)."""


def implausible(mask: np.ndarray) -> list[str]:
    """Why a post-processed 0/1 mask (two largest components, holes filled) is not a plausible
    pair of lungs; empty when it is."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), 8)
    if count == 1:
        return ["no lung found"]
    reasons = []
    fraction = float(mask.mean())
    low, high = LUNG_FRACTION
    if not low <= fraction <= high:
        reasons.append(f"lungs cover {fraction:.1%} of the image, not {low:.0%}-{high:.0%}")
    areas = sorted(stats[1:, cv2.CC_STAT_AREA], reverse=True)
    if count == 2:
        left, width = stats[1, cv2.CC_STAT_LEFT], stats[1, cv2.CC_STAT_WIDTH]
        middle = mask.shape[1] / 2
        if left + width <= middle or left >= middle:  # one lung, on one side of the midline
            reasons.append("one lung found: the other is missing")
    elif areas[1] < SMALLER_LUNG * areas[0]:
        reasons.append(f"one lung is {areas[1] / areas[0]:.0%} of the size of the other")
    return reasons


SURE = 0.9
"""Mask pixels with a probability under this are ones the model was unsure of."""
OUTSIDE = 0.05
"""Probabilities above this outside the mask count as lung the mask may have left out."""
BORDER_BAND = 4
"""The rows just below and just above a lung's lowest mask pixel that :func:`lower_border`
compares. With :data:`BORDER_COLUMNS`, measured at 3, 4 and 6 rows and 40, 60 and 80% of the
columns on the bundled model's validation split: AUROC 0.707-0.759 alone, 0.758 at these."""
BORDER_COLUMNS = 0.6
"""The middle share of a lung's columns that :func:`lower_border` reads, leaving out the
costophrenic angle and the heart's edge, where a good mask's border is no diaphragm either."""
FEATURES = ("lung_fraction", "unsure", "outside", "lower_border")
"""What :func:`features` measures of a mask, in this order: the share of the image the lungs
cover, the share of the mask under :data:`SURE`, the probability above :data:`OUTSIDE`
outside the mask over the mask's area, and :func:`lower_border`."""
RIDGE = 1.0
"""The ridge penalty on the standardised features' weights: measured at 1, 10 and 50 on the
bundled model's validation split, Spearman 0.649, 0.648 and 0.638 (at 256 px)."""
REVIEW_SHARE = 0.14
"""The share of a model's own training images whose predicted Dice is below its cut
(:class:`Calibration`): the largest, in steps of 0.005, that sends at most 15% of the bundled
model's validation split to review (19 of 132; 0.145 sends 20)."""
MIN_FILMS = 8
"""The fewest plausible training masks a calibration is fitted on."""
POOR_DICE = 0.93
"""A mask below this Dice is a poor one, that quality control should send to review."""


@dataclass(frozen=True)
class Calibration:
    """How one model's masks are judged, fitted on the images of its training split: a ridge
    regression of the true Dice on the standardised :func:`features` (``mean``, ``scale``,
    ``weights``, ``intercept``), its mean absolute ``error`` there (the unit of ``qc_score``),
    and ``review_dice``, the predicted Dice below which :data:`REVIEW_SHARE` of those images lie:
    the cut. A trainer fits it (:func:`calibrate`) and stores it in the model file, so that a
    model sends about as large a share of images like its training ones to review as the bundled
    one, whatever its sharpness.
    """

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    intercept: float
    error: float
    review_dice: float
    films: int

    def __post_init__(self) -> None:
        for name in ("mean", "scale", "weights"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != len(FEATURES):
                raise ValueError(f"{name} has {len(values)} values, not {len(FEATURES)}")
            object.__setattr__(self, name, values)

    def contributions(self, measured: np.ndarray) -> np.ndarray:
        """What each feature adds to the predicted Dice, against a training mask's average."""
        return np.asarray(self.weights) * (measured - self.mean) / np.asarray(self.scale)

    def dice(self, measured: np.ndarray) -> float:
        """The Dice predicted from a mask's :func:`features`, within [0, 1]."""
        return float(np.clip(self.intercept + self.contributions(measured).sum(), 0.0, 1.0))


@dataclass(frozen=True)
class Quality:
    """One mask's quality control: ``dice``, the Dice it is predicted to have (None for an
    :func:`implausible` mask); ``score`` in [0, 1], above 0.5 where ``dice`` is above the
    model's cut, in units of its error; ``review`` whether a person should look at it, and why
    (``reasons``); ``implausible`` is true when the reasons are :func:`implausible`'s (the job
    then flags the image)."""

    dice: float | None
    score: float
    review: bool
    reasons: tuple[str, ...]
    implausible: bool = False


def lower_border(image: np.ndarray, mask: np.ndarray) -> float:
    """How much brighter the X-ray is just below a mask's lower border than just above it, in
    grey levels (uint8 ``image`` and 0/1 ``mask``, the same size): per lung, the median over the
    middle :data:`BORDER_COLUMNS` of its columns of the mean of the :data:`BORDER_BAND` rows
    below its lowest pixel less the mean of those above (the image smoothed 3 x 3), and the
    smaller of the lungs'. A lung that ends on the diaphragm ends dark above bright; a mask that
    stops short of it (the lung behind the heart or an opacity left out: the bundled model's
    poor masks) does not. 0 where no column can be read."""
    smooth = cv2.GaussianBlur(image.astype(np.float32), (3, 3), 0)
    rows = len(smooth)
    band = np.arange(1, BORDER_BAND + 1)[:, None]
    count, lungs = cv2.connectedComponents(mask.astype(np.uint8))
    contrasts = []
    for lung in range(1, count):
        inside = lungs == lung
        columns = np.flatnonzero(inside.any(axis=0))
        low, high = np.quantile(columns, [(1 - BORDER_COLUMNS) / 2, (1 + BORDER_COLUMNS) / 2])
        columns = columns[(columns >= low) & (columns <= high)]
        bottom = rows - 1 - np.argmax(inside[::-1, columns], axis=0)
        readable = (bottom >= BORDER_BAND) & (bottom < rows - 1 - BORDER_BAND)
        bottom, columns = bottom[readable], columns[readable]
        if not len(columns):
            contrasts.append(0.0)
            continue
        below = smooth[bottom + band, columns].mean(axis=0)
        above = smooth[bottom - band, columns].mean(axis=0)
        contrasts.append(float(np.median(below - above)))
    return min(contrasts, default=0.0)


def features(mask: np.ndarray, probability: np.ndarray, image: np.ndarray) -> np.ndarray:
    """:data:`FEATURES` of a post-processed, plausible 0/1 ``mask`` drawn from ``probability``
    for the uint8 ``image`` the model saw (all three at the model's size)."""
    inside = mask > 0
    area = max(int(np.count_nonzero(inside)), 1)
    unsure = np.count_nonzero(inside & (probability < SURE)) / area
    left_out = probability[~inside]
    outside = float(left_out[left_out > OUTSIDE].sum()) / area
    return np.array([area / mask.size, unsure, outside, lower_border(image, mask)])


def calibrate(
    images: np.ndarray, probabilities: np.ndarray, masks: np.ndarray, threshold: float
) -> Calibration | None:
    """A model's :class:`Calibration` from training images (uint8), its probabilities of them
    and their true 0/1 masks (``(n, size, size)`` each), over the images whose masks are
    plausible: the ridge (penalty :data:`RIDGE`) of the Dice of each post-processed mask on its
    :func:`features`. None where it has too little to fit: fewer than :data:`MIN_FILMS`
    plausible masks with a ground truth that holds lung."""
    rows, dice = [], []
    for image, probability, truth in zip(images, probabilities, masks, strict=True):
        mask = imaging.postprocess(probability, threshold)
        if truth.any() and not implausible(mask):
            rows.append(features(mask, probability, image))
            dice.append(confusion(mask, truth).dice)
    if len(rows) < MIN_FILMS:
        return None
    x, y = np.array(rows), np.array(dice)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0  # a feature that never varies adds nothing
    z = (x - mean) / scale
    intercept = float(y.mean())
    weights = np.linalg.solve(z.T @ z + RIDGE * np.eye(len(FEATURES)), z.T @ (y - intercept))
    fitted = np.clip(intercept + z @ weights, 0.0, 1.0)
    error = max(float(np.mean(np.abs(fitted - y))), 1e-3)
    cut = float(np.quantile(fitted, REVIEW_SHARE))
    return Calibration(tuple(mean), tuple(scale), tuple(weights), intercept, error, cut, len(rows))


def _said(name: str, value: float) -> str:
    return {
        "lung_fraction": f"lungs cover {value:.1%} of the image",
        "unsure": f"the model was unsure of {value:.0%} of the mask",
        "outside": f"probability outside the mask: {value:.0%} of its area",
        "lower_border": f"little contrast at its lower border ({value:.0f} grey levels): it may "
        "stop short of the diaphragm",
    }[name]


def assess(
    mask: np.ndarray, probability: np.ndarray, image: np.ndarray, calibration: Calibration
) -> Quality:
    """The quality of a post-processed 0/1 ``mask`` drawn from ``probability`` for ``image``
    (all at the model's size), for the model of ``calibration``: its predicted Dice, and
    ``score`` = 1 / (1 + exp(-(dice - cut) / error)). An :func:`implausible` mask scores 0 and
    has no predicted Dice. A mask goes to review below the cut, and the reasons give the
    predicted Dice and name the features that lower it most (each at least half the largest
    drop).
    """
    doubts = implausible(mask)
    if doubts:
        return Quality(None, 0.0, True, tuple(doubts), implausible=True)
    measured = features(mask, probability, image)
    dice = calibration.dice(measured)
    margin = (dice - calibration.review_dice) / calibration.error
    score = 1 / (1 + math.exp(min(-margin, 700)))
    if dice >= calibration.review_dice:
        return Quality(dice, score, False, ())
    parts = calibration.contributions(measured)
    worst = parts.min()
    named = [
        _said(name, value)
        for name, value, part in zip(FEATURES, measured, parts, strict=True)
        if worst < 0 and part <= worst / 2
    ]
    reasons = (f"predicted Dice {dice:.3f}, under the model's cut {calibration.review_dice:.3f}",)
    return Quality(dice, score, True, reasons + tuple(named))


def review_order(row: dict) -> tuple:
    """How a table's rows sent to review are listed: the lowest ``qc_dice`` first, implausible
    masks (none predicted) before all, then by id."""
    return (row["qc_dice"] is not None, row["qc_dice"] or 0.0, row["id"])


def agreement(rows: list[dict]) -> dict:
    """How well ``qc_dice``, ``qc_score`` and ``qc`` foretell the ``dice`` of the scored rows:
    the mean absolute error of ``qc_dice`` (over the masks it predicts, all but the
    implausible), Spearman's correlation of ``qc_score`` (implausible masks score 0) with the
    Dice, the AUROC of a low ``qc_score`` for the masks below :data:`POOR_DICE`, the share sent
    to review, and how many of those poor masks review caught."""
    scored = [r for r in rows if r["dice"] is not None and r["qc_score"] is not None]
    predicted = [r for r in scored if r["qc_dice"] is not None]
    poor = [r for r in scored if r["dice"] < POOR_DICE]
    review = [r for r in scored if r["qc"] == REVIEW]
    caught = sum(r["qc"] == REVIEW for r in poor)
    return {
        "scored": len(scored),
        "qc_dice_mae": mean(abs(r["qc_dice"] - r["dice"]) for r in predicted)
        if predicted
        else None,
        "spearman_qc_score_dice": spearman(
            [r["qc_score"] for r in scored], [r["dice"] for r in scored]
        ),
        "auroc_poor": auroc(
            [-r["qc_score"] for r in scored], [r["dice"] < POOR_DICE for r in scored]
        ),
        "review": len(review),
        "review_share": len(review) / len(scored) if scored else None,
        "poor_dice_below": POOR_DICE,
        "poor": len(poor),
        "poor_in_review": caught,
        "poor_caught_share": caught / len(poor) if poor else None,
    }
