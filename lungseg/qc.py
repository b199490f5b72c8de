"""How far a predicted lung mask can be trusted, without a ground truth to compare it with.

:func:`implausible` names masks that cannot be a pair of lungs. Its bounds come from the 604
expert masks of the Montgomery and Shenzhen sets, taken to the model's 256 x 256: lungs cover
8.4% to 43.3% of a film (1st to 99th percentile 13.3% to 39.7%), every mask has two lungs, and
the smaller lung is at least a tenth of the larger (1st percentile 0.46).

:func:`assess` scores plausible masks too. The bundled model's bad masks (Dice < 0.93 on the
validation split) are confident ones: they leave out the lung behind the heart or above the
diaphragm, where the film is dense. Two signals find them: the mask the model draws on a
contrast-enhanced copy of the film (:func:`second_view`), which shows those dense parts
brighter, differs from the first; and more of the lungs' border is uncertain. Neither needs
the truth; both cost one more pass of the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from lungseg import imaging
from lungseg.metrics import confusion

LUNG_FRACTION = (0.04, 0.60)
"""The share of the film that plausible lungs cover: half the least and 1.4 times the most of
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
        reasons.append(f"lungs cover {fraction:.1%} of the film, not {low:.0%}-{high:.0%}")
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
DISAGREEMENT_SCALE = 0.0157
"""The median of 1 - Dice between the masks of a film and its :func:`second_view`: the bundled
model on the 472 films of its training split."""
UNCERTAIN_SCALE = 0.109
"""The median of the uncertain pixels' count over the mask's, likewise."""
DISAGREEMENT_WEIGHT = 0.5
"""The weight of disagreement in the risk, against 1 for uncertainty."""
REVIEW_RISK = 2.28
"""The risk (:func:`assess`) at which ``qc_score`` is 0.5 and a mask goes to review: chosen,
with :data:`DISAGREEMENT_WEIGHT`, on the validation split, to send at most 15% of its films
there (19 of 132; the model card has the figures)."""
CONTRAST_CLIP, CONTRAST_TILES = 2.0, 8


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
    the film as :func:`assess` has the model see it a second time."""
    return cv2.createCLAHE(CONTRAST_CLIP, (CONTRAST_TILES, CONTRAST_TILES)).apply(image)


def assess(
    mask: np.ndarray, probability: np.ndarray, second: np.ndarray, threshold: float
) -> Quality:
    """The quality of a post-processed 0/1 ``mask`` drawn from ``probability``, with ``second``
    the probabilities of the film's :func:`second_view` (all at the model's size).

    Risk = :data:`DISAGREEMENT_WEIGHT` x (1 - Dice of ``mask`` and ``second``'s mask) /
    :data:`DISAGREEMENT_SCALE` + (uncertain pixels / mask pixels) / :data:`UNCERTAIN_SCALE`,
    about 1.5 for a typical film; ``score`` = 1 / (1 + exp(risk - :data:`REVIEW_RISK`)). An
    :func:`implausible` mask scores 0. A mask goes to review below a score of 0.5, and the
    reasons name each signal that makes up at least half of the review risk.
    """
    doubts = implausible(mask)
    if doubts:
        return Quality(0.0, True, tuple(doubts), implausible=True)
    agreement = confusion(mask, imaging.postprocess(second, threshold)).dice
    low, high = UNCERTAIN
    uncertain = cv2.countNonZero(((probability > low) & (probability < high)).astype(np.uint8))
    uncertain /= max(cv2.countNonZero(mask), 1)
    parts = (
        DISAGREEMENT_WEIGHT * (1 - agreement) / DISAGREEMENT_SCALE,
        uncertain / UNCERTAIN_SCALE,
    )
    risk = sum(parts)
    score = 1 / (1 + math.exp(min(risk - REVIEW_RISK, 700)))
    if score >= 0.5:
        return Quality(score, False, ())
    said = (
        f"the mask of a contrast-enhanced copy differs (Dice {agreement:.3f})",
        f"uncertain border: {uncertain:.0%} of the lungs' area",
    )
    return Quality(
        score,
        True,
        tuple(text for part, text in zip(parts, said, strict=True) if part >= REVIEW_RISK / 2),
    )
