"""Tests for lungseg.core.metrics: exact confusion counts, Dice and IoU on tiny masks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lungseg.core.metrics import Confusion, confusion

PRED = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0]], np.uint8)
TRUTH = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]], np.uint8)
# tp: (0,0), (1,1) = 2; fp: (0,1) = 1; fn: (1,2) = 1; the other 5 pixels are true negatives.


def test_confusion_exact_counts() -> None:
    c = confusion(PRED, TRUTH)
    assert c == Confusion(tp=2, fp=1, fn=1)
    assert all(type(v) is int for v in (c.tp, c.fp, c.fn))  # plain ints for the Parquet tables


def test_confusion_exact_dice_and_iou() -> None:
    c = confusion(PRED, TRUTH)
    assert c.dice == pytest.approx(4 / 6)  # 2*2 / (2*2 + 1 + 1)
    assert c.iou == pytest.approx(2 / 4)  # 2 / (2 + 1 + 1)


def test_swapping_prediction_and_truth_swaps_fp_and_fn() -> None:
    assert confusion(TRUTH, PRED) == Confusion(tp=2, fp=1, fn=1)  # fp = fn = 1 here
    pred = np.array([[1, 1, 1], [0, 0, 0], [0, 0, 0]], np.uint8)
    truth = np.array([[1, 0, 0], [0, 0, 0], [0, 0, 0]], np.uint8)
    assert confusion(pred, truth) == Confusion(tp=1, fp=2, fn=0)
    assert confusion(truth, pred) == Confusion(tp=1, fp=0, fn=2)


@pytest.mark.parametrize(
    ("tp", "fp", "fn", "dice", "iou"),
    [
        (2, 1, 1, 4 / 6, 2 / 4),  # 2*2/(4+1+1), 2/(2+1+1)
        (3, 2, 0, 6 / 8, 3 / 5),  # 2*3/(6+2+0), 3/(3+2+0)
        (1, 0, 3, 2 / 5, 1 / 4),  # 2*1/(2+0+3), 1/(1+0+3)
        (5, 0, 0, 1.0, 1.0),  # perfect
        (0, 0, 0, 1.0, 1.0),  # both empty: perfect agreement by convention
        (0, 0, 5, 0.0, 0.0),  # empty prediction, lung in truth
        (0, 3, 0, 0.0, 0.0),  # lung predicted where truth has none
        (0, 3, 4, 0.0, 0.0),  # disjoint
    ],
)
def test_dice_and_iou_from_counts(tp: int, fp: int, fn: int, dice: float, iou: float) -> None:
    c = Confusion(tp=tp, fp=fp, fn=fn)
    assert c.dice == pytest.approx(dice)
    assert c.iou == pytest.approx(iou)


def test_both_empty_masks_are_perfect() -> None:
    empty = np.zeros((3, 3), np.uint8)
    c = confusion(empty, empty)
    assert c == Confusion(0, 0, 0)
    assert c.dice == c.iou == 1.0


def test_empty_prediction_non_empty_truth_is_zero() -> None:
    c = confusion(np.zeros((3, 3), np.uint8), TRUTH)
    assert c == Confusion(tp=0, fp=0, fn=3)
    assert c.dice == c.iou == 0.0


def test_non_empty_prediction_empty_truth_is_zero() -> None:
    c = confusion(PRED, np.zeros((3, 3), np.uint8))
    assert c == Confusion(tp=0, fp=3, fn=0)
    assert c.dice == c.iou == 0.0


@pytest.mark.parametrize(
    ("pred_shape", "truth_shape"), [((3, 3), (3, 4)), ((3, 3), (9,)), ((2, 3), (3, 2))]
)
def test_shape_mismatch(pred_shape: tuple[int, ...], truth_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        confusion(np.zeros(pred_shape, np.uint8), np.zeros(truth_shape, np.uint8))


@pytest.mark.parametrize(
    ("pred", "truth"),
    [
        (PRED * 255, TRUTH * 255),  # 0/255 PNG-style masks
        (PRED * 255, TRUTH),  # mixed conventions
        (PRED.astype(bool), TRUTH.astype(bool)),
        (PRED.astype(np.uint16) * 65535, TRUTH.astype(np.uint16) * 65535),
        (PRED.astype(np.float32), TRUTH.astype(np.float64)),
    ],
    ids=["0-255", "mixed", "bool", "uint16", "float"],
)
def test_non_binary_values_are_treated_as_boolean(pred: np.ndarray, truth: np.ndarray) -> None:
    c = confusion(pred, truth)
    assert c == Confusion(tp=2, fp=1, fn=1)
    assert c.dice == pytest.approx(4 / 6)
    assert c.iou == pytest.approx(2 / 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_iou_relation_and_counts_on_random_masks(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pred = rng.random((8, 9)) > 0.5
    truth = rng.random((8, 9)) > 0.4
    c = confusion(pred, truth)
    tn = int(np.count_nonzero(~pred & ~truth))
    assert c.tp + c.fp + c.fn + tn == 8 * 9
    assert c.tp + c.fp == int(pred.sum())
    assert c.tp + c.fn == int(truth.sum())
    assert c.dice == pytest.approx(2 * c.iou / (1 + c.iou))  # Dice = 2 IoU / (1 + IoU)
    assert 0.0 <= c.iou <= c.dice <= 1.0


def test_confusion_is_frozen() -> None:
    c = Confusion(1, 2, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.tp = 5  # type: ignore[misc]
