"""How far a predicted lung mask can be trusted, without a ground truth to compare it with.

:func:`implausible` names masks that cannot be a pair of lungs. Its bounds come from the 604
expert masks of the Montgomery and Shenzhen sets, taken to the model's 256 x 256: lungs cover
8.4% to 43.3% of an image (1st to 99th percentile 13.3% to 39.7%), every mask has two lungs, and
the smaller lung is at least a tenth of the larger (1st percentile 0.46).

:func:`assess` scores plausible masks too. The bundled model's bad masks (Dice < 0.93 on the
validation split) are confident ones: they leave out the lung behind the heart or above the
diaphragm, where the image is dense. Two signals find them: the mask the model draws on a
contrast-enhanced copy of the image (:func:`second_view`), which shows those dense parts
brighter, differs from the first; and more of the lungs' border is uncertain. Neither needs
the truth; both cost one more pass of the model. Both are measured in units of what is usual
for the model that drew the mask (:class:`Calibration`), so that the same cut serves any model
a lungseg trainer made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from lungseg.core import imaging
from lungseg.core.config import CONTRAST_CLIP, CONTRAST_TILES
from lungseg.core.metrics import confusion

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


UNCERTAIN = (0.1, 0.9)
"""Probabilities between these are uncertain pixels."""
DISAGREEMENT_WEIGHT = 0.5
"""The weight of disagreement in the risk, against 1 for uncertainty."""
REVIEW_SHARE = 0.135
"""The share of a model's own training images whose risk is above its cut (:class:`Calibration`):
chosen, with :data:`DISAGREEMENT_WEIGHT`, on the bundled model's validation split, to send at
most 15% of it to review (19 of 132; the model card has the figures)."""


@dataclass(frozen=True)
class Calibration:
    """What is usual for one model, measured on the images of its training split: the medians
    of the disagreement (1 - Dice) between the masks of an image and of its :func:`second_view`
    and of the uncertain pixels' count over the mask's, the units of :func:`assess`'s risk;
    and ``review_risk``, the risk above which :data:`REVIEW_SHARE` of those images lie, its cut.

    A trainer measures them (:func:`calibrate`) and stores them in the model file: a model
    sends about as large a share of images like its training ones to review as the bundled one,
    whatever its sharpness (in the bundled model's units, a model trained for 8 epochs sent 42%
    of the validation split; in its own, 14%).
    """

    disagreement: float
    uncertain: float
    review_risk: float
    films: int


@dataclass(frozen=True)
class Signals:
    """The two measures of one mask that :func:`assess` weighs."""

    disagreement: float
    uncertain: float


@dataclass(frozen=True)
class Quality:
    """One mask's quality control: ``score`` in [0, 1], higher more likely a good mask;
    ``review`` whether a person should look at it, and why (``reasons``); ``implausible``
    is true when the reasons are :func:`implausible`'s (the job then flags the image)."""

    score: float
    review: bool
    reasons: tuple[str, ...]
    implausible: bool = False


def second_view(image: np.ndarray) -> np.ndarray:
    """The model's input (uint8) with its local contrast equalised (CLAHE, clip 2, 8 x 8 tiles):
    the image as :func:`assess` has the model see it a second time."""
    return imaging.equalise(image, CONTRAST_CLIP, CONTRAST_TILES)


def signals(
    mask: np.ndarray, probability: np.ndarray, second: np.ndarray, threshold: float
) -> Signals:
    """The disagreement (1 - Dice) of a post-processed 0/1 ``mask`` drawn from ``probability``
    with the mask of ``second`` (the probabilities of the image's :func:`second_view`), and the
    pixels of ``probability`` within :data:`UNCERTAIN` over the mask's pixels."""
    agreement = confusion(mask, imaging.postprocess(second, threshold)).dice
    low, high = UNCERTAIN
    uncertain = cv2.countNonZero(((probability > low) & (probability < high)).astype(np.uint8))
    return Signals(1 - agreement, uncertain / max(cv2.countNonZero(mask), 1))


def _parts(measured: Signals, disagreement: float, uncertain: float) -> tuple[float, float]:
    """The two terms of a mask's risk: its :class:`Signals` in units of their medians."""
    return (
        DISAGREEMENT_WEIGHT * measured.disagreement / disagreement,
        measured.uncertain / uncertain,
    )


def calibrate(
    probabilities: np.ndarray, seconds: np.ndarray, threshold: float
) -> Calibration | None:
    """A model's :class:`Calibration` from its probabilities of images and of their second views
    (``(n, size, size)`` each), over the images whose masks are plausible; None where it has no
    unit to give: no plausible mask, or a median of 0 (a model that has not learnt lungs)."""
    measured = []
    for probability, second in zip(probabilities, seconds, strict=True):
        mask = imaging.postprocess(probability, threshold)
        if not implausible(mask):
            measured.append(signals(mask, probability, second, threshold))
    if not measured:
        return None
    disagreement = float(np.median([m.disagreement for m in measured]))
    uncertain = float(np.median([m.uncertain for m in measured]))
    if not (disagreement > 0 and uncertain > 0):
        return None
    risks = [sum(_parts(m, disagreement, uncertain)) for m in measured]
    cut = float(np.quantile(risks, 1 - REVIEW_SHARE))
    return Calibration(disagreement, uncertain, cut, len(measured))


def assess(
    mask: np.ndarray,
    probability: np.ndarray,
    second: np.ndarray,
    threshold: float,
    calibration: Calibration,
) -> Quality:
    """The quality of a post-processed 0/1 ``mask`` drawn from ``probability``, with ``second``
    the probabilities of the image's :func:`second_view` (all at the model's size), for the
    model of ``calibration``.

    Risk = :data:`DISAGREEMENT_WEIGHT` x disagreement / its median + uncertain share / its
    median (:func:`signals`, :class:`Calibration`), about 1.5 for a typical image; ``score`` =
    1 / (1 + exp(risk - the calibration's ``review_risk``)). An :func:`implausible` mask scores
    0. A mask goes to review below a score of 0.5, and the reasons name each signal that makes
    up at least half of that cut.
    """
    doubts = implausible(mask)
    if doubts:
        return Quality(0.0, True, tuple(doubts), implausible=True)
    measured = signals(mask, probability, second, threshold)
    parts = _parts(measured, calibration.disagreement, calibration.uncertain)
    cut = calibration.review_risk
    score = 1 / (1 + math.exp(min(sum(parts) - cut, 700)))
    if score >= 0.5:
        return Quality(score, False, ())
    said = (
        f"the mask of a contrast-enhanced copy differs (Dice {1 - measured.disagreement:.3f})",
        f"uncertain border: {measured.uncertain:.0%} of the lungs' area",
    )
    return Quality(
        score,
        True,
        tuple(text for part, text in zip(parts, said, strict=True) if part >= cut / 2),
    )
