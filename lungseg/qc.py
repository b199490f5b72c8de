"""Whether a predicted lung mask is plausible, without a ground truth to compare it with.

The bounds come from the 604 expert masks of the Montgomery and Shenzhen sets, taken to the
model's 256 x 256: lungs cover 8.4% to 43.3% of a film (1st to 99th percentile 13.3% to 39.7%),
every mask has two lungs, and the smaller lung is at least a tenth of the larger (1st
percentile 0.46). A mask well outside that is flagged for a person to look at.
"""

from __future__ import annotations

import cv2
import numpy as np

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
