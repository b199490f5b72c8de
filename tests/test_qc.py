"""Quality control without ground truth (lungseg.core.qc) and its figures in evaluate's summary:
tiny arrays, exact values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lungseg.core import qc
from lungseg.core.layout import OK, REVIEW
from lungseg.core.metrics import ranks, spearman
from lungseg.jobs.evaluate import POOR_DICE, quality_control


def lungs() -> np.ndarray:
    """Two 40 x 20 lungs on a 64 x 64 film: 39% of it, plausible to qc.implausible."""
    mask = np.zeros((64, 64), np.uint8)
    mask[10:50, 6:26] = mask[10:50, 38:58] = 1
    return mask


CALIBRATION = qc.Calibration(disagreement=0.02, uncertain=0.1, review_risk=2.3, films=10)
"""A model whose typical film disagrees with its second view by 2% and is 10% uncertain."""


def score(risk: float, cut: float = 2.3) -> float:
    return 1 / (1 + math.exp(risk - cut))


def test_a_confident_mask_that_both_views_agree_on_is_ok() -> None:
    mask = lungs()
    probability = mask.astype(np.float64)
    quality = qc.assess(mask, probability, probability, 0.5, CALIBRATION)
    assert quality == qc.Quality(pytest.approx(score(0.0)), False, ())
    assert quality.score == pytest.approx(0.908877, abs=1e-6)  # 1 / (1 + exp(-2.3))


def test_an_uncertain_border_is_sent_to_review_and_named() -> None:
    mask = lungs()
    probability = mask.astype(np.float64)
    probability[10:50, 26:29] = 0.4  # 120 uncertain pixels: 7.5% of the mask's 1,600
    probability[10:50, 3:6] = 0.3  # 120 more: 15% in all
    quality = qc.assess(mask, probability, mask.astype(np.float64), 0.5, CALIBRATION)
    assert quality.score == pytest.approx(score(1.5))  # 15% over the model's usual 10%
    assert not quality.review  # 1.5 times the usual uncertainty is not yet enough on its own
    probability[10:50, 29:35] = 0.6  # 30%: 3 times the usual
    quality = qc.assess(mask, probability, mask.astype(np.float64), 0.5, CALIBRATION)
    assert quality.score == pytest.approx(score(3.0))
    assert quality.score < 0.5
    assert quality.reasons == ("uncertain border: 30% of the lungs' area",)
    assert quality.review and not quality.implausible


def test_a_second_view_that_draws_other_lungs_sends_the_mask_to_review() -> None:
    mask = lungs()
    second = mask.astype(np.float64)
    second[40:50] = 0  # the second view's lungs end 10 rows higher: Dice 1,200 / 1,400
    quality = qc.assess(mask, mask.astype(np.float64), second, 0.5, CALIBRATION)
    dice = 2 * 1200 / (1600 + 1200)
    assert quality.score == pytest.approx(score(qc.DISAGREEMENT_WEIGHT * (1 - dice) / 0.02))
    assert quality.reasons == (f"the mask of a contrast-enhanced copy differs (Dice {dice:.3f})",)
    assert quality.review


def test_an_implausible_mask_scores_0_with_implausibles_reasons() -> None:
    empty = np.zeros((64, 64), np.uint8)
    quality = qc.assess(empty, empty.astype(np.float64), empty.astype(np.float64), 0.5, CALIBRATION)
    assert quality == qc.Quality(0.0, True, ("no lung found",), implausible=True)


def test_the_same_mask_is_judged_in_the_units_of_its_model() -> None:
    mask = lungs()
    probability = mask.astype(np.float64)
    probability[10:50, 26:29] = probability[10:50, 3:6] = 0.4  # 15% of the mask uncertain
    sharp = qc.Calibration(disagreement=0.02, uncertain=0.05, review_risk=2.3, films=10)
    assert qc.assess(mask, probability, probability, 0.5, CALIBRATION).score == pytest.approx(
        score(1.5)
    )
    assert qc.assess(mask, probability, probability, 0.5, sharp).score == pytest.approx(score(3))


def test_calibration_is_the_median_over_the_plausible_masks() -> None:
    films, seconds = [], []
    for rows, uncertain in ((0, 0), (4, 40), (10, 80)):  # second views 0, 4, 10 rows shorter
        probability = lungs().astype(np.float64)
        probability[10:50, 26 : 26 + uncertain // 40] = 0.4
        second = lungs().astype(np.float64)
        second[50 - rows : 50] = 0
        films.append(probability)
        seconds.append(second)
    films.append(np.zeros((64, 64)))  # no lung: not a film to learn the usual from
    seconds.append(np.zeros((64, 64)))
    calibration = qc.calibrate(np.stack(films), np.stack(seconds), 0.5)
    # Dice of 1,600 pixels with 1,440: 2 x 1,440 / 3,040; 40 uncertain pixels of 1,600
    disagreement = 1 - 2 * 1440 / 3040
    assert calibration.disagreement == pytest.approx(disagreement)
    assert (calibration.uncertain, calibration.films) == (0.025, 3)
    # In those units the films' risks are 0, 1.5 (0.5 + 1) and the highest; the cut is their
    # 86.5% quantile (13.5% above it): 0.73 of the way from 1.5 to the highest.
    highest = 0.5 * (1 - 2 * 1200 / 2800) / disagreement + 2
    assert qc.REVIEW_SHARE == 0.135
    assert calibration.review_risk == pytest.approx(1.5 + 0.73 * (highest - 1.5))
    assert qc.calibrate(np.zeros((1, 64, 64)), np.zeros((1, 64, 64)), 0.5) is None
    sure = lungs().astype(np.float64)[None]  # no disagreement, no doubt: no unit to measure in
    assert qc.calibrate(sure, sure, 0.5) is None


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
