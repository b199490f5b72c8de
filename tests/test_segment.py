"""Batch segmentation end to end on a real local Ray: masks at each image's size + Parquet."""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from lungseg.jobs.segment import NO_TRUTH, SCHEMA, run_segmentation
from tests.conftest import SAMPLE_IDS, copy_sample, labelled_config

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.timeout(300)]


def test_segment_folder_with_masks(tmp_path, model_path):
    root = copy_sample(tmp_path / "data", SAMPLE_IDS[:4])
    image = cv2.imread(str(root / "images" / f"{SAMPLE_IDS[0]}.png"), cv2.IMREAD_UNCHANGED)
    mask = cv2.imread(str(root / "masks" / f"{SAMPLE_IDS[0]}.png"), cv2.IMREAD_UNCHANGED)
    # A 16-bit, non-square image with its mask, one with no mask, and a broken file.
    wide16 = cv2.resize(image, (400, 300)).astype(np.uint16) * 257
    cv2.imwrite(str(root / "images" / "wide16.png"), wide16)
    cv2.imwrite(str(root / "masks" / "wide16.png"), cv2.resize(mask, (400, 300)))
    cv2.imwrite(str(root / "images" / "unlabelled.png"), cv2.resize(image, (256, 320)))
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")

    out = tmp_path / "out"
    result = run_segmentation(labelled_config(root, out, model=model_path, batch_size=2))
    table = pq.read_table(result.table)
    assert table.schema == SCHEMA
    rows = {row["id"]: row for row in table.to_pylist()}
    expected = {*SAMPLE_IDS[:4], "wide16", "unlabelled", "broken"}
    assert table.num_rows == len(expected) and set(rows) == expected
    assert (result.images, result.flagged, result.failed, result.resumed) == (7, 1, 1, 0)

    sizes = {case_id: (512, 512) for case_id in SAMPLE_IDS[:4]}
    sizes |= {"wide16": (300, 400), "unlabelled": (320, 256)}
    for case_id, (height, width) in sizes.items():
        row = rows[case_id]
        if case_id == "unlabelled":  # masks were given, but none for this image
            assert (row["status"], row["error"]) == ("flagged", NO_TRUTH)
        else:
            assert row["status"] == "ok" and row["error"] is None
        written = cv2.imread(str(out / row["mask"]), cv2.IMREAD_UNCHANGED)
        assert row["mask"] == f"masks/{case_id}.png"  # relative to the output root
        assert written.shape == (height, width) == (row["height"], row["width"])
        assert set(np.unique(written)) <= {0, 255}
        assert row["lung_fraction"] == pytest.approx((written > 0).mean())
        if case_id == "unlabelled":
            assert row["dice"] is None and row["iou"] is None and row["tp"] is None
        else:
            assert 0.0 <= row["iou"] <= row["dice"] <= 1.0
            assert row["tp"] + row["fp"] == (written > 0).sum()
    broken = rows["broken"]
    assert broken["status"] == "error" and "ImageDecodeError" in broken["error"]
    assert broken["mask"] is None and broken["dice"] is None
    assert sorted(p.stem for p in (out / "masks").iterdir()) == sorted(sizes)
