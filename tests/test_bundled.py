"""The bundled pretrained model, the evaluate job's summary and the SavedModel export."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from lungseg.core import qc
from lungseg.core.config import (
    BUNDLED_MODEL,
    BUNDLED_PROVENANCE,
    BUNDLED_SPLIT,
    SAMPLE,
    EvaluateConfig,
    ExportConfig,
    RecipeConfig,
    SegmentConfig,
)
from lungseg.jobs.evaluate import run_evaluation
from lungseg.model import recipe
from lungseg.model.modelfile import describe
from tests.conftest import SAMPLE_IDS, labelled_config

# Measured on 2026-11-27: mean Dice 0.9713, lowest 0.8780 (MCUCXR_0126_1) on the 16 sample
# X-rays, all held out from the bundled model's training. The floors leave room for float
# differences between CPUs, not for a worse model.
MEAN_DICE_FLOOR = 0.965
MIN_DICE_FLOOR = 0.87


def test_bundled_files_ship_inside_the_package():
    assert Path(BUNDLED_MODEL).is_file() and Path(BUNDLED_MODEL).stat().st_size < 10_000_000
    split = json.loads(Path(BUNDLED_SPLIT).read_text())
    assert not set(split["train"]) & set(split["val"])
    assert len(split["train"]) + len(split["val"]) == 604
    assert set(SAMPLE_IDS) <= set(split["val"]), "the sample must be held out"


def test_the_provenance_beside_the_bundled_weights_is_theirs():
    record = json.loads(Path(BUNDLED_PROVENANCE).read_text())
    model = describe(Path(BUNDLED_MODEL).read_bytes())
    assert record["model_sha256"] == model.sha256
    # The calibration inside the file is the one recorded, measured on the 472 training films.
    assert model.calibration is not None and model.calibration.films == 472
    assert qc.Calibration(**record["qc_calibration"]) == model.calibration
    split = json.loads(Path(BUNDLED_SPLIT).read_text())
    assert record["split"] == {"train": sorted(split["train"]), "val": sorted(split["val"])}
    assert RecipeConfig(**{**record["recipe"], "model": RecipeConfig().model}).epochs == 150
    # The epoch was chosen by the rule that every trainer now shares.
    rule = recipe.provenance(RecipeConfig(), {}, [], model, "", "")["selection"]
    assert record["selection"] == rule
    assert 1 <= record["selected_epoch"] <= record["recipe"]["epochs"]


@pytest.mark.usefixtures("local_ray")
@pytest.mark.timeout(300)
def test_bundled_model_segments_the_sample_and_summary_matches_parquet(tmp_path):
    output = tmp_path / "eval"
    config = labelled_config(SAMPLE, output, EvaluateConfig)
    assert config.model == BUNDLED_MODEL
    summary = run_evaluation(config)

    rows = pq.read_table(output / "segmentation.parquet").to_pylist()
    assert json.loads((output / "summary.json").read_text()) == summary
    dice = [r["dice"] for r in rows]
    iou = [r["iou"] for r in rows]
    assert len(rows) == 16 and all(r["status"] == "ok" for r in rows)
    overall = summary["overall"]
    assert overall["images"] == overall["scored"] == 16
    assert overall["dice"] == {
        "mean": statistics.mean(dice),
        "median": statistics.median(dice),
        "min": min(dice),
    }
    assert overall["iou"]["mean"] == statistics.mean(iou)
    assert list(summary["datasets"]) == ["MCUCXR"] and summary["datasets"]["MCUCXR"] == overall
    worst = sorted(rows, key=lambda r: (r["dice"], r["id"]))[:10]
    assert [w["id"] for w in summary["worst"]] == [r["id"] for r in worst]
    assert summary["failed"] == [] and summary["unscored"] == []
    assert overall["dice"]["mean"] >= MEAN_DICE_FLOOR, overall
    assert overall["dice"]["min"] >= MIN_DICE_FLOOR, summary["worst"][:3]

    # Quality control: a score and a verdict per image, the reasons of those sent to review,
    # and the summary's figures counted from the rows.
    review = [r for r in rows if r["qc"] == "review"]
    assert all(0 <= r["qc_score"] <= 1 and r["qc"] in ("ok", "review") for r in rows)
    assert all(0 <= r["qc_dice"] <= 1 for r in rows)  # every mask of the sample is plausible
    assert all((r["qc"] == "review") == (r["qc_score"] < 0.5) and r["qc_reason"] for r in review)
    assert all(r["qc_reason"] is None for r in rows if r["qc"] == "ok")
    figures = overall["quality_control"]
    assert figures["scored"] == 16 and figures["review"] == len(review)
    assert figures["poor"] == sum(d < 0.93 for d in dice)
    mae = statistics.mean(abs(r["qc_dice"] - r["dice"]) for r in rows)
    assert figures["qc_dice_mae"] == pytest.approx(mae)
    assert [r["id"] for r in summary["review"]] == [
        r["id"] for r in sorted(review, key=lambda r: (r["qc_dice"], r["id"]))
    ]

    for row in rows:  # the patient's right lung (1) on the image's left, each a real share
        labels = cv2.imread(str(output / row["labels"]), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(output / row["mask"]), cv2.IMREAD_UNCHANGED)
        assert labels.shape == mask.shape == (row["height"], row["width"])
        assert ((labels > 0) == (mask > 0)).all() and set(np.unique(labels)) == {0, 1, 2}
        columns = np.nonzero(labels)[1], labels[labels > 0]
        assert columns[0][columns[1] == 1].mean() < columns[0][columns[1] == 2].mean()
        right, left = row["right_lung_fraction"], row["left_lung_fraction"]
        assert right + left == pytest.approx(row["lung_fraction"])
        assert right == (labels == 1).mean() and 0.3 < right / (right + left) < 0.7, row["id"]
        assert row["right_lung_area_mm2"] is None  # PNGs carry no pixel spacing


@pytest.mark.usefixtures("local_ray")
@pytest.mark.timeout(300)
def test_bfloat16_segments_the_sample_like_float32(tmp_path):
    # bfloat16 keeps 8 bits of mantissa: probabilities move in the second or third decimal, so
    # a few boundary pixels flip; the scores must stay those of the model.
    config = labelled_config(SAMPLE, tmp_path / "bf16", EvaluateConfig, precision="bfloat16")
    summary = run_evaluation(config)
    assert summary["overall"]["scored"] == 16 and summary["failed"] == []
    assert summary["overall"]["dice"]["mean"] >= MEAN_DICE_FLOOR, summary["overall"]
    assert summary["overall"]["dice"]["min"] >= MIN_DICE_FLOOR, summary["worst"][:3]


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        SegmentConfig(precision="int8")


@pytest.mark.usefixtures("local_ray")
@pytest.mark.timeout(300)
def test_evaluate_only_the_split_subset(tmp_path):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": SAMPLE_IDS[2:], "val": SAMPLE_IDS[:2]}))
    config = labelled_config(SAMPLE, tmp_path / "eval", EvaluateConfig, split=str(split))
    summary = run_evaluation(config)
    rows = pq.read_table(tmp_path / "eval" / "segmentation.parquet").to_pylist()
    assert sorted(r["id"] for r in rows) == SAMPLE_IDS[:2]
    assert summary["overall"]["images"] == 2


@pytest.mark.timeout(300)
def test_savedmodel_export_serves_like_the_keras_model(tmp_path):
    import tensorflow as tf

    from lungseg.jobs.export import export_saved_model
    from lungseg.model.unet import load_model

    export_saved_model(ExportConfig(output=str(tmp_path / "saved")))
    served = tf.saved_model.load(str(tmp_path / "saved"))
    batch = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 1)).astype("float32")
    expected = load_model(Path(BUNDLED_MODEL).read_bytes())(batch, training=False)
    np.testing.assert_allclose(served.serve(batch).numpy(), np.asarray(expected), atol=1e-5)
