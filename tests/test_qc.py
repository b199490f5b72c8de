"""Quality control without ground truth (lungseg.core.qc) and its figures in evaluate's summary:
tiny arrays, exact values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lungseg.core import imaging, qc
from lungseg.core.layout import OK, REVIEW
from lungseg.core.metrics import auroc, ranks, spearman


def lungs() -> np.ndarray:
    """Two 40 x 20 lungs on a 64 x 64 film: 39% of it, plausible to qc.implausible."""
    mask = np.zeros((64, 64), np.uint8)
    mask[10:50, 6:26] = mask[10:50, 38:58] = 1
    return mask


def film() -> np.ndarray:
    """The X-ray under :func:`lungs`: black lungs, a diaphragm 40 grey levels bright from row 50,
    just under their lowest row (49)."""
    image = np.zeros((64, 64), np.uint8)
    image[50:] = 40
    return image


CALIBRATION = qc.Calibration(
    mean=(0.3, 0.05, 0.02, 37.5),
    scale=(0.05, 0.01, 0.01, 5.0),
    weights=(0.0, -0.005, -0.004, 0.01),
    intercept=0.97,
    error=0.01,
    review_dice=0.95,
    films=10,
)
"""A model whose typical training mask is 5% unsure with 2% of its area in probability left
outside and ends on a diaphragm like :func:`film`'s, predicted Dice 0.97; masks predicted under
0.95 go to review."""


def score(dice: float) -> float:
    return 1 / (1 + math.exp(-(dice - 0.95) / 0.01))


def test_features_are_the_lung_share_unsure_share_probability_outside_and_border() -> None:
    mask = lungs()
    probability = mask.astype(np.float64)
    probability[10:50, 6:10] = 0.8  # 160 of the mask's 1,600 pixels under 0.9
    probability[50:52, 6:26] = 0.5  # 40 pixels of 0.5 below the mask: 20 over 1,600
    probability[0:2, 0:10] = 0.05  # not above 0.05: not counted
    measured = qc.features(mask, probability, film())
    assert measured.tolist() == pytest.approx([1600 / 4096, 0.1, 0.0125, 37.5])


def test_the_lower_border_is_the_contrast_just_under_the_weaker_lung() -> None:
    # Smoothed 3 x 3 (rows weighed 1/4, 1/2, 1/4), row 50 is 30 and rows 51-53 are 40: the four
    # rows below the lungs average 37.5, the four above (45-48) 0.
    assert qc.BORDER_BAND == 4
    assert qc.lower_border(film(), lungs()) == 37.5
    # A diaphragm under the left lung only (columns 32 on): the right lung's middle columns
    # (10-21 of 6-25) end on black, so the pair scores 0.
    image = film()
    image[50:, :32] = 0
    assert qc.lower_border(image, lungs()) == 0.0
    # Lungs that stop 8 rows short of the diaphragm end on black too.
    short = lungs()
    short[42:50] = 0
    assert qc.lower_border(film(), short) == 0.0
    # Brighter above than below: negative.
    assert qc.lower_border(40 - film(), lungs()) == -37.5
    # A lung down to the image's last rows has no band below it to read.
    low = lungs()
    low[50:62, 6:26] = 1
    assert qc.lower_border(film(), low) == 0.0


def test_a_confident_mask_is_ok_with_its_predicted_dice() -> None:
    mask = lungs()
    quality = qc.assess(mask, mask.astype(np.float64), film(), CALIBRATION)
    # unsure 0 adds 0.005 x 5 = 0.025, outside 0 adds 0.004 x 2 = 0.008: 1.003, kept to 1
    assert quality == qc.Quality(1.0, pytest.approx(score(1.0)), False, ())
    assert quality.score == pytest.approx(0.993307, abs=1e-6)  # 1 / (1 + exp(-5))


def test_an_unsure_mask_is_sent_to_review_and_named() -> None:
    mask = lungs()
    probability = mask.astype(np.float64)
    probability[10:50, 6:18] = 0.7  # 480 of 1,600 pixels: 30% unsure, 25 points over the usual
    quality = qc.assess(mask, probability, film(), CALIBRATION)
    assert quality.dice == pytest.approx(0.97 - 0.125 + 0.008)
    assert quality.score == pytest.approx(score(0.853))
    assert quality.reasons == (
        "predicted Dice 0.853, under the model's cut 0.950",
        "the model was unsure of 30% of the mask",
    )
    assert quality.review and not quality.implausible


def test_probability_left_outside_the_mask_lowers_the_predicted_dice() -> None:
    mask = lungs()
    probability = mask.astype(np.float64)
    probability[50:60, 6:58] = 0.5  # 520 pixels of 0.5 below the lungs: 260 / 1,600
    quality = qc.assess(mask, probability, film(), CALIBRATION)
    assert quality.dice == pytest.approx(0.97 + 0.025 - 0.004 * (0.1625 - 0.02) / 0.01)
    assert quality.reasons == (
        "predicted Dice 0.938, under the model's cut 0.950",
        "probability outside the mask: 16% of its area",
    )


def test_a_mask_that_does_not_end_on_a_diaphragm_is_sent_to_review_and_named() -> None:
    mask = lungs()
    quality = qc.assess(mask, mask.astype(np.float64), np.zeros((64, 64), np.uint8), CALIBRATION)
    # 1.003 as a confident mask on film(), less 0.01 x 37.5 / 5 = 0.075 for a border of 0
    assert quality.dice == pytest.approx(0.928)
    assert quality.reasons == (
        "predicted Dice 0.928, under the model's cut 0.950",
        "little contrast at its lower border (0 grey levels): it may stop short of the diaphragm",
    )


def test_an_implausible_mask_has_no_predicted_dice_and_scores_0() -> None:
    empty = np.zeros((64, 64), np.uint8)
    quality = qc.assess(empty, empty.astype(np.float64), film(), CALIBRATION)
    assert quality == qc.Quality(None, 0.0, True, ("no lung found",), implausible=True)


def test_calibration_fits_the_dice_of_its_training_masks() -> None:
    films, truths, dice = [], [], []
    for rows in range(10):  # the model's lungs end 0 to 9 rows short of the truth's
        probability = lungs().astype(np.float64)
        probability[50 - rows : 50] = 0
        probability[50 - rows : 50][lungs()[50 - rows : 50] > 0] = 0.3  # seen, not kept
        films.append(probability)
        truths.append(lungs())
        dice.append(2 * (1600 - 40 * rows) / (3200 - 40 * rows))
    films.append(np.zeros((64, 64)))  # no lung drawn: not a mask to learn from
    truths.append(lungs())
    films.append(lungs().astype(np.float64))  # no lung in the truth: nothing to score
    truths.append(np.zeros((64, 64), np.uint8))
    images = np.zeros((len(films), 64, 64), np.uint8)  # black: every lower border reads 0
    calibration = qc.calibrate(images, np.stack(films), np.stack(truths), 0.5)
    assert calibration.films == 10
    assert calibration.weights[3] == 0.0  # a measure that never varies adds nothing
    assert calibration.intercept == pytest.approx(np.mean(dice))
    predicted = [
        calibration.dice(qc.features(imaging.postprocess(p, 0.5), p, images[0])) for p in films[:10]
    ]
    assert np.abs(np.array(predicted) - dice).max() < 0.005  # nearly linear in the rows cut
    assert calibration.error < 0.005
    # The cut is the fitted values' 14% quantile: 0.26 of the way from the second lowest
    # (8 rows short) to the third (7 rows)
    assert qc.REVIEW_SHARE == 0.14
    low = sorted(predicted)
    assert calibration.review_dice == pytest.approx(low[1] + 0.26 * (low[2] - low[1]))
    assert low[1:3] == [predicted[8], predicted[7]]
    few = qc.calibrate(images[:7], np.stack(films[:7]), np.stack(truths[:7]), 0.5)
    assert few is None  # 7 plausible masks: fewer than MIN_FILMS
    assert qc.MIN_FILMS == 8


def test_review_lists_the_lowest_predicted_dice_first_the_implausible_before_all() -> None:
    rows = [
        {"id": "b", "qc_dice": 0.91},
        {"id": "a", "qc_dice": 0.91},
        {"id": "c", "qc_dice": None},
        {"id": "d", "qc_dice": 0.85},
    ]
    assert [r["id"] for r in sorted(rows, key=qc.review_order)] == ["c", "d", "a", "b"]


def test_ranks_share_ties_and_spearman_is_exact() -> None:
    assert ranks([0.3, 0.1, 0.3, 0.2]).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_auroc_is_the_share_of_pairs_ranked_right_ties_half() -> None:
    assert auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.8, 0.9, 0.2], [True, True, False, False]) == 0.25  # 1 of 4 pairs
    assert auroc([0.5, 0.5, 0.5], [True, False, False]) == 0.5  # all tied
    assert auroc([0.9, 0.5, 0.5], [False, True, False]) == 0.25  # a tie and a loss
    assert auroc([0.1, 0.2], [True, True]) is None and auroc([], []) is None


def test_quality_control_counts_the_poor_masks_review_caught() -> None:
    def row(dice, score, qc_, predicted=0.95):
        return {"dice": dice, "qc_dice": predicted, "qc_score": score, "qc": qc_}

    rows = [
        row(0.97, 0.9, OK),  # predicted 0.02 low
        row(0.96, 0.8, OK),  # 0.01
        row(0.92, 0.3, REVIEW, 0.93),  # poor, caught; 0.01
        row(0.90, 0.6, OK),  # poor, missed; 0.05
        row(0.95, 0.0, REVIEW, None),  # implausible: no predicted Dice
        row(None, 0.7, OK),  # no truth: not counted
        row(None, None, None, None),  # failed
    ]
    figures = qc.agreement(rows)
    assert figures == {
        "scored": 5,
        "qc_dice_mae": pytest.approx(0.09 / 4),
        "spearman_qc_score_dice": pytest.approx(0.6),  # rank differences 0, 0, 0, 2, -2
        # poor 0.92 (score 0.3) and 0.90 (0.6) against 0.97 (0.9), 0.96 (0.8), 0.95 (0.0): each
        # scores under the first two and over the implausible mask, 4 of the 6 pairs right
        "auroc_poor": pytest.approx(4 / 6),
        "review": 2,
        "review_share": 0.4,
        "poor_dice_below": qc.POOR_DICE,
        "poor": 2,
        "poor_in_review": 1,
        "poor_caught_share": 0.5,
    }
