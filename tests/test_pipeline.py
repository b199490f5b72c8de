"""The preprocessing actor stage on a real local Ray, with real and broken files."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lungseg import catalog, pipeline
from lungseg.layout import ERROR, OK
from tests.conftest import SAMPLE_IDS, copy_sample

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.timeout(180)]


def test_budget_leaves_cpus_for_ray_data_tasks():
    budget = pipeline.CpuBudget.for_cluster(workers=2, actors=2)
    # 2 CPUs: half to the two workers, a third of the other half to each of two actors.
    assert budget == pipeline.CpuBudget(worker=0.5, actor=0.33)
    assert 2 * budget.worker + 2 * budget.actor < 2


def test_preprocess_sample_and_bad_files(tmp_path):
    root = copy_sample(tmp_path, SAMPLE_IDS[:3])
    (root / "images" / "broken.png").write_bytes(b"this is text, not a PNG")
    (root / "images" / "empty.png").write_bytes(b"")
    small = cv2.imread(str(root / "masks" / f"{SAMPLE_IDS[0]}.png"), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(root / "images" / "odd.png"), np.zeros((300, 200), np.uint8) + 7)
    cv2.imwrite(str(root / "masks" / "odd.png"), small)  # 512x512 mask for a 200x300 image
    found = catalog.find_cases(str(root))
    rows = {
        row["id"]: row
        for row in pipeline.preprocessed(found.cases, size=64, actors=2, actor_cpus=0.25)
        .materialize()
        .take_all()
    }
    assert sorted(rows) == sorted([*SAMPLE_IDS[:3], "broken", "empty", "odd"])
    for case_id in SAMPLE_IDS[:3]:
        row = rows[case_id]
        assert row["status"] == OK and row["error"] == ""
        assert row["image"].shape == (64, 64) and row["image"].dtype == np.uint8
        assert row["image"].min() == 0 and row["image"].max() > 200
        assert set(np.unique(row["mask"])) == {0, 1}
        assert (row["height"], row["width"]) == (512, 512)
        assert row["has_truth"]
    assert rows["broken"]["status"] == ERROR
    assert "ImageDecodeError" in rows["broken"]["error"] and "broken.png" in rows["broken"]["error"]
    assert "empty file" in rows["empty"]["error"]
    assert rows["odd"]["status"] == ERROR
    assert "mask 512x512 differs from image 200x300" in rows["odd"]["error"]
