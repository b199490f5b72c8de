"""Two Ray Train workers train the U-Net on the packaged sample, then a rerun resumes."""

from __future__ import annotations

import csv
import json
import math

import pytest

from lungseg.config import SAMPLE, ModelConfig, TrainConfig
from lungseg.train import run_training
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
        epochs=1,
        batch_size=4,
        split=str(split),
        model=ModelConfig(size=64, base_filters=8, depth=3),
    )
    first = run_training(config)
    assert len(first.history) == 1
    row = first.history[0]
    assert all(math.isfinite(row[key]) for key in ("loss", "val_loss"))
    assert 0.0 <= row["dice"] <= 1.0 and 0.0 <= row["val_dice"] <= 1.0
    for name in ("model.keras", "metrics.csv", "config.json", "curves.png"):
        assert (run / name).stat().st_size > 0, name
    assert list(run.glob("checkpoint_*/model.keras")), "no checkpoint written"
    assert json.loads((run / "config.json").read_text())["workers"] == 2

    resumed = run_training(TrainConfig(**{**config.__dict__, "epochs": 2}))
    # The first epoch comes back from the checkpoint unchanged: resumed, not retrained.
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert resumed.history[0] == row
    with open(run / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]
