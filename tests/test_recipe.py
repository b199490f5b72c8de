"""The training recipe: schedule, early stopping, the kept epoch, validation scores, and the
single-process trainer that shares them with the Ray Train loop."""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import pytest

from lungseg.core import imaging, qc
from lungseg.core.config import BUNDLED_MODEL, SAMPLE, ModelConfig, RecipeConfig, TrainConfig
from lungseg.core.errors import UserError
from lungseg.core.metrics import confusion
from lungseg.io.catalog import find_cases
from lungseg.io.storage import DEFAULT_STORE
from lungseg.jobs.fit import epoch_batches, fit, load_arrays, run_fit, train_epoch
from lungseg.model import recipe
from lungseg.model.modelfile import NOTES, ModelFile, describe, with_calibration
from lungseg.model.unet import (
    bce_dice_loss,
    build_unet,
    dice_per_image,
    iou_per_image,
    load_model,
    to_bytes,
)
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
    calibration = qc.Calibration(
        (0.3, 0.05, 0.02, 40),
        (0.05, 0.01, 0.01, 12),
        (0, -0.005, -0.004, 0.002),
        0.97,
        0.01,
        0.95,
        5,
    )
    model = ModelFile("ab" * 32, 256, calibration)
    split = {"train": ["b", "a"], "val": ["c"]}
    record = recipe.provenance(RecipeConfig(), split, history, model, "test", "data")
    assert record["selected_epoch"] == 2
    assert record["split"] == {"train": ["a", "b"], "val": ["c"]}
    assert record["model_sha256"] == "ab" * 32 and record["recipe"]["epochs"] == 40
    assert qc.Calibration(**json.loads(json.dumps(record))["qc_calibration"]) == calibration


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


def test_an_epoch_s_batches_hold_every_image_once_in_the_epoch_s_own_order():
    images, masks = _arrays(10)
    settings = RecipeConfig(batch_size=4, augment=False)
    batches = list(epoch_batches(images, masks, settings, 0))
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    x = np.concatenate([x for x, _ in batches])[..., 0]
    y = np.concatenate([y for _, y in batches])[..., 0]
    order = [int(np.flatnonzero((images == film).all(axis=(1, 2)))[0]) for film in x]
    assert sorted(order) == list(range(10)) and order != list(range(10))
    assert x.dtype == np.float32 and np.array_equal(y, masks[order])
    again = np.concatenate([b for b, _ in epoch_batches(images, masks, settings, 0)])
    later = np.concatenate([b for b, _ in epoch_batches(images, masks, settings, 1)])
    assert np.array_equal(again, np.concatenate([b for b, _ in batches]))
    assert not np.array_equal(later, again)


def test_an_epoch_reports_the_means_model_fit_reports_for_the_same_batches():
    images, masks = (a[..., None].astype(np.float32) for a in _arrays(10))

    def model():
        keras.utils.set_random_seed(0)
        network = build_unet(size=32, base_filters=4, depth=2)
        network.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=bce_dice_loss,
            metrics=[dice_per_image, iou_per_image],
        )
        return network

    fitted = model().fit(images, masks, batch_size=4, shuffle=False, verbose=0).history
    batches = [(images[i : i + 4], masks[i : i + 4]) for i in range(0, 10, 4)]
    means = train_epoch(model(), batches)
    assert means == pytest.approx({name: values[-1] for name, values in fitted.items()}, rel=1e-5)


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


def test_single_process_run_writes_the_run_folder(tmp_path, caplog):
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
    # Two epochs on four films draw no lungs: no calibration to measure, said in the log.
    assert record["qc_calibration"] is None
    assert describe((run / "model.keras").read_bytes()).calibration is None
    assert "has no quality-control calibration" in caplog.text
    assert record["qc_validation"] is None and result.quality is None  # nothing to check with
    assert "could not be checked" not in caplog.text  # the missing calibration says it all
    assert result.images == 16 and result.flagged == 10 and result.failed == 0


def test_the_quality_check_measures_a_model_s_quality_control_on_its_validation_images():
    bundled = Path(BUNDLED_MODEL).read_bytes()
    images, masks, _ = load_arrays(
        find_cases(SAMPLE, store=DEFAULT_STORE).cases, 256, DEFAULT_STORE
    )
    found = recipe.quality_check(bundled, images, masks)
    # The sample is held out from the bundled model's training, as a validation split is.
    assert found["scored"] == 16 and found["poor_dice_below"] == qc.POOR_DICE
    assert 0 < found["qc_dice_mae"] < 0.03 and found["spearman_qc_score_dice"] > 0
    assert found["review"] < 8
    # The same figures from the masks and calibration by hand, at the model's size.
    calibration = describe(bundled).calibration
    probability = load_model(bundled).predict(images[..., None].astype(np.float32), verbose=0)
    rows = []
    for image, p, truth in zip(images, probability[..., 0], masks, strict=True):
        p = np.round(p * 255) / 255  # the uint8 steps segment sees
        mask = imaging.postprocess(p, 0.5)
        quality = qc.assess(mask, p, image, calibration)
        rows.append({"dice": confusion(mask, truth).dice, "qc_dice": quality.dice})
    assert found["poor"] == sum(r["dice"] < qc.POOR_DICE for r in rows)
    mae = np.mean([abs(r["qc_dice"] - r["dice"]) for r in rows])
    assert found["qc_dice_mae"] == pytest.approx(mae, abs=1e-3)
    # Nothing to check: a model without a calibration, or no lung in any validation mask.
    assert recipe.quality_check(to_bytes(load_model(bundled)), images, masks) is None
    assert recipe.quality_check(bundled, images, np.zeros_like(masks)) is None
    assert recipe.quality_check(bundled, images[:0], masks[:0]) is None


def test_a_trained_model_carries_its_quality_control_calibration_in_its_file():
    bundled = Path(BUNDLED_MODEL).read_bytes()
    bare = to_bytes(load_model(bundled))  # saved by Keras alone: no notes of lungseg's
    assert describe(bare).calibration is None
    images, masks, _ = load_arrays(
        find_cases(SAMPLE, store=DEFAULT_STORE).cases, 256, DEFAULT_STORE
    )
    calibrated = recipe.calibrated(bare, images, masks)
    assert recipe.calibrated(bare, images, masks) == calibrated  # the same bytes for the same model
    # A trainer's last step loads the model once for both steps and gives what they give apart.
    halves = (images[:8], masks[:8]), (images[8:], masks[8:])
    done, quality = recipe.finished(bare, *halves)
    assert done == recipe.calibrated(bare, *halves[0])
    assert quality is not None and quality == recipe.quality_check(done, *halves[1])
    found = describe(calibrated).calibration
    assert found is not None and found.films == len(images) == 16  # every mask plausible
    # The sample's 16 films are like the bundled model's training films: its calibration on
    # the 472 of them predicts about the same Dice from about the same features.
    own = describe(bundled).calibration
    assert abs(found.intercept - own.intercept) < 0.02
    assert abs(found.review_dice - own.review_dice) < 0.03
    assert np.allclose(found.mean, own.mean, rtol=0.5)
    # Less sure, more left outside, a lower border with less contrast: a lower Dice.
    assert all(w < 0 for w in own.weights[:3]) and own.weights[3] > 0
    films = images[:2, ..., None].astype(np.float32)
    np.testing.assert_array_equal(
        load_model(calibrated).predict(films, verbose=0), load_model(bare).predict(films, verbose=0)
    )
    other = replace(found, intercept=0.9, films=3)
    replaced = with_calibration(calibrated, other)
    assert describe(replaced).calibration == other
    with zipfile.ZipFile(io.BytesIO(replaced)) as archive:
        assert archive.namelist().count(NOTES) == 1
        assert qc.Calibration(**json.loads(archive.read(NOTES))["qc"]) == other


def test_a_model_calibrated_for_an_earlier_quality_control_is_said_to_have_none():
    bare = to_bytes(load_model(Path(BUNDLED_MODEL).read_bytes()))
    old = {"disagreement": 0.015, "uncertain": 0.11, "review_risk": 2.3, "films": 472}
    found = describe(_with_notes(bare, {"qc": old}))
    assert found.calibration is None
    assert found.calibration_missing.startswith("its calibration is for the two-view")
    three = {"mean": [0.26, 0.05, 0.02], "scale": [0.06, 0.01, 0.007], "weights": [0, 0, 0]}
    three |= {"intercept": 0.97, "error": 0.008, "review_dice": 0.966, "films": 472}
    found = describe(_with_notes(bare, {"qc": three}))
    assert found.calibration is None
    assert found.calibration_missing.startswith("its calibration weighs the 3 measures of an")
    with pytest.raises(UserError, match="no valid quality-control calibration"):
        describe(_with_notes(bare, {"qc": {"mean": [0.3], "films": 2}}))


def _with_notes(data: bytes, notes: dict) -> bytes:
    """``data`` (a ``.keras`` file without lungseg's notes) with ``notes`` as them."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w") as target:
        for entry in source.infolist():
            target.writestr(entry, source.read(entry))
        target.writestr(NOTES, json.dumps(notes))
    return out.getvalue()
