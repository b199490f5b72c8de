"""The training recipe's pure parts: learning-rate schedule and early stopping."""

from __future__ import annotations

import pytest

from lungseg.model import cosine_learning_rate
from lungseg.train import should_stop


def test_cosine_learning_rate():
    assert cosine_learning_rate(1e-3, 0, 10) == 1e-3
    assert cosine_learning_rate(1e-3, 5, 10) == pytest.approx(0.5e-3)
    assert cosine_learning_rate(1e-3, 9, 10) == pytest.approx(
        1e-3 * 0.5 * (1 + (-0.9510565162951535))
    )


def _history(scores):
    return [{"epoch": i + 1, "val_dice": s} for i, s in enumerate(scores)]


@pytest.mark.parametrize(
    ("scores", "patience", "stop"),
    [
        ([0.5, 0.6, 0.6, 0.6], 2, True),  # best at epoch 2, two epochs without a better one
        ([0.5, 0.6, 0.6], 2, False),
        ([0.5, 0.6, 0.7], 1, False),
        ([0.9, 0.8, 0.7], 2, True),
        ([0.9, 0.8, 0.7], 0, False),  # patience 0: never stop
        ([], 3, False),
    ],
)
def test_early_stopping(scores, patience, stop):
    assert should_stop(_history(scores), patience) is stop


def test_no_validation_never_stops():
    assert should_stop([{"epoch": 1}, {"epoch": 2}], 1) is False
