"""Two Ray Train workers train the U-Net on the packaged sample, then a rerun resumes."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace

import pytest

from lungseg.core.config import SAMPLE, ModelConfig, RecipeConfig, TrainConfig
from lungseg.jobs.train import run_training
from lungseg.model import recipe
from lungseg.model.modelfile import describe
from tests.conftest import SAMPLE_IDS

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.timeout(420)]


def test_two_workers_train_then_resume(tmp_path):
    run = tmp_path / "run"
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": SAMPLE_IDS[4:], "val": SAMPLE_IDS[:4]}))
    config = TrainConfig(
        data=SAMPLE,
        output=str(run),
        workers=2,
        split=str(split),
        recipe=RecipeConfig(epochs=1, batch_size=8, model=ModelConfig(64, 8, 3)),
    )
    first = run_training(config)
    assert len(first.history) == 1
    row = first.history[0]
    assert all(math.isfinite(row[key]) for key in ("loss", "val_loss"))
    assert 0.0 <= row["dice"] <= 1.0 and 0.0 <= row["val_dice"] <= 1.0
    for name in ("model.keras", "metrics.csv", "config.json", "curves.png", "provenance.json"):
        assert (run / name).stat().st_size > 0, name
    assert list(run.glob("checkpoints/checkpoint_*/model.keras")), "no checkpoint written"
    assert json.loads((run / "config.json").read_text())["workers"] == 2

    resumed = run_training(replace(config, recipe=replace(config.recipe, epochs=2)))
    # The first epoch comes back from the checkpoint unchanged: resumed, not retrained.
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert resumed.history[0] == row
    with open(run / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]
    # The run records what made its model: the kept epoch by the recipe's rule, the weights.
    record = json.loads((run / "provenance.json").read_text())
    assert record["selected_epoch"] == recipe.best_epoch(resumed.history) == resumed.best_epoch
    assert record["model_sha256"] == describe((run / "model.keras").read_bytes()).sha256
    assert record["history"] == resumed.history
    assert record["qc_validation"] == resumed.quality  # None where the model has no calibration
