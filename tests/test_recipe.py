"""The training recipe: schedule, early stopping, the kept epoch, validation scores, and the
single-process trainer that shares them with the Ray Train loop."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lungseg import recipe
from lungseg.config import ModelConfig, RecipeConfig, TrainConfig
from lungseg.fit import fit, run_fit
from lungseg.metrics import confusion
from lungseg.model import load_model
from tests.conftest import SAMPLE_IDS


def test_cosine_learning_rate():
    settings = RecipeConfig(learning_rate=1e-3, epochs=10)
    assert recipe.learning_rate(settings, 0) == 1e-3
    assert recipe.learning_rate(settings, 5) == pytest.approx(0.5e-3)
    assert recipe.learning_rate(settings, 9) == pytest.approx(
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
    assert recipe.should_stop(_history(scores), patience) is stop


def test_no_validation_never_stops_and_keeps_the_last_epoch():
    history = [{"epoch": 1}, {"epoch": 2}]
    assert recipe.should_stop(history, 1) is False
    assert recipe.best_epoch(history) == 2


@pytest.mark.parametrize(
    ("scores", "best"),
    [([0.5, 0.7, 0.6], 2), ([0.5, 0.7, 0.7], 2), ([0.9], 1), ([0.1, 0.2, 0.3], 3)],
)
def test_best_epoch_is_the_highest_validation_dice_earliest_of_equals(scores, best):
    assert recipe.best_epoch(_history(scores)) == best


def test_validation_scores_the_post_processed_masks():
    """A speck of false positive far from the lungs is removed by post-processing (the two
    largest components are kept), so it costs the score nothing; a hole is filled."""
    truth = np.zeros((1, 32, 32), np.uint8)
    truth[0, 8:24, 4:12] = truth[0, 8:24, 20:28] = 1
    probability = truth.astype(np.float32) * 0.9
    probability[0, 14, 6] = 0.1  # a hole inside the left lung
    probability[0, 1, 30] = 0.9  # a speck
    dice, iou = recipe.score_validation(probability, truth)
    assert (dice, iou) == (1.0, 1.0)
    raw = confusion(probability[0] >= 0.5, truth[0])
    assert raw.dice < 1.0  # the raw mask would have scored lower


def test_image_scores_are_means_over_images():
    counts = np.array([[10, 0, 0], [0, 0, 0], [1, 1, 0]])  # perfect, both empty, 2/3
    dice, iou = recipe.image_scores(counts)
    assert dice == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert iou == pytest.approx((1 + 1 + 1 / 2) / 3)


def test_provenance_records_the_kept_epoch_and_the_weights():
    history = _history([0.5, 0.8, 0.7])
    record = recipe.provenance(
        RecipeConfig(), {"train": ["b", "a"], "val": ["c"]}, history, "ab" * 32, "test", "data"
    )
    assert record["selected_epoch"] == 2
    assert record["split"] == {"train": ["a", "b"], "val": ["c"]}
    assert record["model_sha256"] == "ab" * 32 and record["recipe"]["epochs"] == 40
    json.dumps(record)  # plain JSON


def _arrays(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic films: a bright rectangle per side on a noisy background; its mask."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (n, size, size), dtype=np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    for k in range(n):
        top = int(rng.integers(4, 10))
        masks[k, top : top + 16, 4:12] = masks[k, top : top + 16, 20:28] = 1
    images[masks == 1] += 150
    return images, masks


def test_fit_trains_keeps_the_epoch_best_epoch_picks_and_its_weights():
    settings = RecipeConfig(
        epochs=3, batch_size=4, patience=0, model=ModelConfig(size=32, base_filters=4, depth=2)
    )
    train, val = _arrays(8), _arrays(4, seed=1)
    seen: list[dict] = []
    result = fit(train, val, settings, on_epoch=seen.append)
    assert [row["epoch"] for row in result.history] == [1, 2, 3] and seen == result.history
    assert set(recipe.COLUMNS) == set(result.history[0])
    kept = recipe.best_epoch(result.history)
    model = load_model(result.model)
    probability = model.predict(val[0][..., None].astype(np.float32), verbose=0)[..., 0]
    # The kept model is the kept epoch's: its validation Dice is that epoch's row's.
    assert recipe.score_validation(probability, val[1])[0] == pytest.approx(
        result.history[kept - 1]["val_dice"], abs=1e-6
    )


def test_single_process_run_writes_the_run_folder(tmp_path):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": SAMPLE_IDS[4:8], "val": SAMPLE_IDS[:2]}))
    config = TrainConfig(
        output=str(tmp_path / "run"),
        split=str(split),
        single_process=True,
        recipe=RecipeConfig(epochs=2, batch_size=2, model=ModelConfig(64, 4, 2)),
    )
    result = run_fit(config)
    run = tmp_path / "run"
    for name in ("model.keras", "metrics.csv", "curves.png", "config.json", "provenance.json"):
        assert (run / name).stat().st_size > 0, name
    record = json.loads((run / "provenance.json").read_text())
    assert record["selected_epoch"] == result.best_epoch
    assert record["split"] == {"train": sorted(SAMPLE_IDS[4:8]), "val": sorted(SAMPLE_IDS[:2])}
    assert record["trainer"].startswith("single process")
    assert result.images == 16 and result.flagged == 10 and result.failed == 0
