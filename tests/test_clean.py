"""OpenCV cleaning: exact expectations on synthetic arrays, then end to end on a real local Ray."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from lungseg.core.config import CleanConfig
from lungseg.jobs.clean import (
    SCHEMA,
    CleanParams,
    FlaggedImage,
    border_ring,
    clean_image,
    morphology,
    otsu,
    run_cleaning,
    should_invert,
)
from tests.conftest import SAMPLE_IDS, copy_sample

RAW = CleanParams(size=64, blur_kernel=1, open_kernel=0, close_kernel=0)  # Otsu alone


def _disc(levels: tuple[int, int], size: int = 256, radius: int = 60) -> np.ndarray:
    image = np.full((size, size), levels[0], np.uint8)
    cv2.circle(image, (size // 2, size // 2), radius, levels[1], -1)
    return image


def test_disc_and_inverse_disc_give_the_same_mask():
    drawn = _disc((0, 1))
    bright = clean_image(_disc((30, 220)))  # default params: blur 5, opening and closing 5
    dark = clean_image(_disc((220, 30)))
    assert (bright.inverted, dark.inverted) == (False, True)  # dark: the whole border ring is fg
    np.testing.assert_array_equal(bright.mask, dark.mask)
    # Blur and Otsu can move the edge only within the disc's 1-pixel boundary band (outer ring
    # of its dilation plus inner ring of its erosion), never elsewhere ...
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    band = cv2.dilate(drawn, cross) != cv2.erode(drawn, cross)
    assert not ((bright.mask != drawn) & ~band).any()
    # ... and the pixels gained and lost there nearly cancel: within 0.5% of the 11289 drawn
    # pixels (measured: 4 fewer), against a band of about 2 * 2 * pi * 60 = 754 pixels.
    assert abs(int(bright.mask.sum()) - int(drawn.sum())) <= 0.005 * drawn.sum()
    assert bright.foreground_fraction == bright.mask.sum() / bright.mask.size
    # The cleaned image is the (normalised) image inside the mask and 0 outside.
    np.testing.assert_array_equal(bright.cleaned, np.where(bright.mask == 1, drawn * 255, 0))


def test_otsu_on_a_two_level_image_cuts_at_the_lower_level():
    image = np.full((64, 64), 50, np.uint8)
    image[:, 32:] = 200
    # Every cut in [50, 200) separates the two levels equally well; OpenCV keeps the first
    # maximum of the between-class variance, 50, and foreground is strictly above it.
    threshold, mask = otsu(image)
    assert threshold == 50.0
    np.testing.assert_array_equal(mask, (image == 200).astype(np.uint8))
    # The same through clean_image (one 0 and one 255 pixel keep the stretch an identity).
    image[0, 0], image[-1, -1] = 0, 255
    result = clean_image(image, RAW)
    assert (result.threshold, result.inverted) == (50.0, False)
    np.testing.assert_array_equal(result.mask, (image >= 200).astype(np.uint8))


@pytest.mark.parametrize(
    ("value", "dtype", "reason"),
    [
        (0, np.uint8, "all-black image (every pixel is 0)"),
        (255, np.uint8, "all-white image (every pixel is 255)"),
        (65535, np.uint16, "all-white image (every pixel is 65535)"),
        (7, np.uint8, "constant image (every pixel is 7)"),
    ],
)
def test_constant_images_are_flagged(value, dtype, reason):
    with pytest.raises(FlaggedImage, match=reason.replace("(", r"\(").replace(")", r"\)")):
        clean_image(np.full((40, 30), value, dtype))


def test_sixteen_bit_and_float_images_give_the_eight_bit_result():
    image = _disc((30, 220))
    eight = clean_image(image)
    for other in (image.astype(np.uint16) * 257, image / 1000):  # float: e.g. a DICOM rescale
        result = clean_image(other)
        np.testing.assert_array_equal(eight.mask, result.mask)
        assert eight.threshold == result.threshold
    with pytest.raises(FlaggedImage, match=r"constant image \(every pixel is 0.25\)"):
        clean_image(np.full((8, 8), 0.25))


@pytest.mark.parametrize("clahe", [False, True])
def test_clahe_off_and_on_both_find_the_disc(clahe):
    # A bright disc on a background brightening left to right, with noise.
    x = np.arange(256)[None, :] * 0.3
    noise = np.random.default_rng(0).normal(0, 8, (256, 256))
    image = np.clip(40 + x + 140 * _disc((0, 1)) + noise, 0, 255).astype(np.uint8)
    result = clean_image(image, CleanParams(clahe=clahe, clahe_clip=2.0, clahe_tile=8))
    disc = _disc((0, 1)).astype(bool)
    iou = (result.mask.astype(bool) & disc).sum() / (result.mask.astype(bool) | disc).sum()
    assert iou > 0.99 and not result.inverted
    assert result.cleaned.shape == (256, 256) and result.cleaned.dtype == np.uint8
    assert not result.cleaned[result.mask == 0].any()


def test_opening_removes_a_one_pixel_speck():
    image = _disc((30, 220), size=64, radius=15)
    image[5, 5] = 220  # an isolated bright pixel, far from the disc
    kept = clean_image(image, RAW)
    assert kept.mask[5, 5] == 1
    opened = clean_image(image, CleanParams(size=64, blur_kernel=1, open_kernel=3, close_kernel=0))
    assert opened.mask[5, 5] == 0
    np.testing.assert_array_equal(opened.mask, _disc((0, 1), size=64, radius=15))
    speck = np.zeros((9, 9), np.uint8)
    speck[4, 4] = 1
    assert not morphology(speck, 3, 0).any()
    assert morphology(speck, 0, 0)[4, 4] == 1  # 0 skips the step


def test_border_rule_counts_the_one_pixel_ring():
    mask = np.zeros((5, 6), np.uint8)
    assert border_ring(mask).size == 2 * 5 + 2 * 6 - 4
    mask[0, :] = mask[-1, :] = 1  # 12 of the 18 ring pixels
    assert should_invert(mask, "border")
    mask[-1, :] = 0  # 6 of 18
    assert not should_invert(mask, "border")
    mask[:, 0] = 1  # 6 + 4 = 10 of 18: more than half
    assert should_invert(mask, "border")
    assert not should_invert(mask, "never") and should_invert(np.zeros((4, 4)), "always")
    with pytest.raises(ValueError, match="odd"):
        CleanParams(blur_kernel=4)
    with pytest.raises(ValueError, match="invert"):
        CleanParams(invert="sometimes")


@pytest.mark.usefixtures("local_ray")
@pytest.mark.timeout(240)
def test_clean_sample_with_bad_files_end_to_end(tmp_path):
    root = copy_sample(tmp_path / "data", SAMPLE_IDS, masks=True)  # masks/ must be ignored
    images = root / "images"
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (images / "empty.png").write_bytes(b"")
    cv2.imwrite(str(images / "white.png"), np.full((300, 200), 255, np.uint8))
    cv2.imwrite(str(images / "black.png"), np.zeros((100, 100), np.uint8))

    out = tmp_path / "out"
    result = run_cleaning(CleanConfig(input=str(root), output=str(out), batch_size=4))
    table = pq.read_table(out / "cleaning.parquet")
    assert table.schema == SCHEMA
    rows = {row["id"]: row for row in table.to_pylist()}
    assert table.num_rows == len(rows) == len(SAMPLE_IDS) + 4
    assert set(rows) == {*SAMPLE_IDS, "broken", "empty", "white", "black"}
    assert (result.images, result.flagged, result.failed) == (20, 2, 2)

    for case_id in SAMPLE_IDS:
        row = rows[case_id]
        assert row["status"] == "ok" and row["error"] is None
        assert (row["height"], row["width"]) == (512, 512)
        assert row["cleaned"] == f"cleaned/{case_id}.png"  # relative to the output root
        assert row["mask"] == f"masks/{case_id}.png"
        cleaned = cv2.imread(str(out / row["cleaned"]), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(out / row["mask"]), cv2.IMREAD_UNCHANGED)
        assert cleaned.shape == mask.shape == (256, 256) and cleaned.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 255}
        assert not cleaned[mask == 0].any()
        assert row["foreground_fraction"] == (mask > 0).mean()
        assert 0 < row["otsu_threshold"] < 255 and row["inverted"] is not None
    for case_id, status, reason in [
        ("broken", "error", "ImageDecodeError"),
        ("empty", "error", "empty file (0 bytes)"),
        ("white", "flagged", "all-white image (every pixel is 255)"),
        ("black", "flagged", "all-black image (every pixel is 0)"),
    ]:
        row = rows[case_id]
        assert row["status"] == status and reason in row["error"], row
        assert row["cleaned"] is None and row["mask"] is None and row["otsu_threshold"] is None
    assert (rows["white"]["height"], rows["white"]["width"]) == (300, 200)
    assert sorted(p.stem for p in (out / "cleaned").iterdir()) == SAMPLE_IDS
    assert sorted(p.stem for p in (out / "masks").iterdir()) == SAMPLE_IDS

    # The first 8 ids, 4 input/cleaned pairs per row: 2 x (24 + 256) + 8 by 4 x 512 + 3 x 8.
    assert Path(result.sheet) == out / "contact_sheet.png"
    sheet = cv2.imread(result.sheet, cv2.IMREAD_UNCHANGED)
    assert sheet.shape == (568, 2072)
    first = cv2.imread(str(out / rows[SAMPLE_IDS[0]]["cleaned"]), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(sheet[24:280, 256:512], first)


def test_write_table_gives_every_lost_case_an_error_row(tmp_path):
    import pyarrow as pa

    from lungseg.core.layout import LOST
    from lungseg.io.catalog import Case
    from lungseg.io.storage import DEFAULT_STORE
    from lungseg.runs.table import write_table

    cases = [Case("a", "/in/a.png"), Case("b", "/in/b.png")]
    came_out = dict.fromkeys(SCHEMA.names) | {"id": "a", "source": "/in/a.png", "status": "ok"}
    seen = []
    statuses = write_table(
        [pa.Table.from_pylist([came_out], SCHEMA)],
        str(tmp_path / "t.parquet"),
        SCHEMA,
        cases,
        DEFAULT_STORE,
        on_table=lambda table: seen.extend(table["id"].to_pylist()),
    )
    assert statuses == {"ok": 1, "error": 1} and sorted(seen) == ["a", "b"]
    rows = pq.read_table(tmp_path / "t.parquet").to_pylist()
    assert rows[1] == dict.fromkeys(SCHEMA.names) | {
        "id": "b",
        "source": "/in/b.png",
        "status": "error",
        "error": LOST,
    }
