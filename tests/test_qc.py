"""Quality control without ground truth (lungseg.qc) and its figures in evaluate's summary:
tiny arrays, exact values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lungseg import qc
from lungseg.evaluate import POOR_DICE, quality_control
from lungseg.layout import OK, REVIEW
from lungseg.metrics import ranks, spearman


def lungs() -> np.ndarray:
    """Two 40 x 20 lungs on a 64 x 64 film: 39% of it, plausible to qc.implausible."""
    mask = np.zeros((64, 64), np.uint8)
    mask[10:50, 6:26] = mask[10:50, 38:58] = 1
    return mask


def score(risk: float) -> float:
    return 1 / (1 + math.exp(risk - qc.REVIEW_RISK))


def test_a_confident_mask_that_both_views_agree_on_is_ok() -> None:
    mask = lungs()
    probability = mask.astype(np.float64)
    quality = qc.assess(mask, probability, probability, 0.5)
    assert quality == qc.Quality(pytest.approx(score(0.0)), False, ())
    assert quality.score == pytest.approx(0.907207, abs=1e-6)


def test_an_uncertain_border_is_sent_to_review_and_named() -> None:
    mask = lungs()
    probability = mask.astype(np.float64)
    probability[10:50, 26:29] = 0.4  # 120 uncertain pixels: 7.5% of the mask's 1,600
    probability[10:50, 3:6] = 0.3  # 120 more: 15% in all
    quality = qc.assess(mask, probability, mask.astype(np.float64), 0.5)
    risk = 0.15 / qc.UNCERTAIN_SCALE
    assert quality.score == pytest.approx(score(risk))
    assert quality.review == (risk > qc.REVIEW_RISK)
    assert not quality.review  # 15% is not yet enough on its own
    probability[10:50, 29:35] = 0.6  # 30%
    quality = qc.assess(mask, probability, mask.astype(np.float64), 0.5)
    assert quality.score == pytest.approx(score(0.3 / qc.UNCERTAIN_SCALE))
    assert quality.score < 0.5
    assert quality.reasons == ("uncertain border: 30% of the lungs' area",)
    assert quality.review and not quality.implausible


def test_a_second_view_that_draws_other_lungs_sends_the_mask_to_review() -> None:
    mask = lungs()
    second = mask.astype(np.float64)
    second[40:50] = 0  # the second view's lungs end 10 rows higher: Dice 1,200 / 1,400
    quality = qc.assess(mask, mask.astype(np.float64), second, 0.5)
    dice = 2 * 1200 / (1600 + 1200)
    assert quality.score == pytest.approx(
        score(qc.DISAGREEMENT_WEIGHT * (1 - dice) / qc.DISAGREEMENT_SCALE)
    )
    assert quality.reasons == (f"the mask of a contrast-enhanced copy differs (Dice {dice:.3f})",)
    assert quality.review


def test_an_implausible_mask_scores_0_with_implausibles_reasons() -> None:
    empty = np.zeros((64, 64), np.uint8)
    quality = qc.assess(empty, empty.astype(np.float64), empty.astype(np.float64), 0.5)
    assert quality == qc.Quality(0.0, True, ("no lung found",), implausible=True)


def test_the_second_view_raises_local_contrast_and_keeps_the_shape() -> None:
    faint = np.tile(np.linspace(100, 116, 64).astype(np.uint8), (64, 1))  # 100 to 116
    view = qc.second_view(faint)
    assert view.shape == faint.shape and view.dtype == np.uint8
    assert (view.min(), view.max()) == (108, 131)  # 23 grey levels where there were 16
    assert (view[:, 0] == 108).all() and (view[:, -1] == 131).all()


def test_ranks_share_ties_and_spearman_is_exact() -> None:
    assert ranks([0.3, 0.1, 0.3, 0.2]).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_quality_control_counts_the_poor_masks_review_caught() -> None:
    def row(dice, score, qc_):
        return {"dice": dice, "qc_score": score, "qc": qc_}

    rows = [
        row(0.97, 0.9, OK),
        row(0.96, 0.8, OK),
        row(0.92, 0.3, REVIEW),  # poor, caught
        row(0.90, 0.6, OK),  # poor, missed
        row(0.95, 0.4, REVIEW),
        row(None, 0.7, OK),  # no truth: not counted
        row(None, None, None),  # failed
    ]
    figures = quality_control(rows)
    assert figures == {
        "scored": 5,
        "spearman_qc_score_dice": pytest.approx(0.7),
        "review": 2,
        "review_share": 0.4,
        "poor_dice_below": POOR_DICE,
        "poor": 2,
        "poor_in_review": 1,
        "poor_caught_share": 0.5,
    }
