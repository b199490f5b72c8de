"""Every bad input and hostile file name through the real jobs: one row each, a specific error.

One folder holds them all, beside two good sample pairs; segment (through evaluate), clean and
the training data stage run over it on a real local Ray with a tiny model.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from lungseg.core import imaging, layout
from lungseg.core.config import CleanConfig, EvaluateConfig, ModelConfig, RecipeConfig, TrainConfig
from lungseg.core.errors import UserError
from lungseg.io import catalog
from lungseg.io.catalog import CatalogError, output_name
from lungseg.jobs.clean import run_cleaning
from lungseg.jobs.evaluate import run_evaluation
from lungseg.jobs.train import run_training
from lungseg.runs.runfolder import DATA_SCHEMA
from tests.conftest import SAMPLE_IDS, copy_sample, labelled_config
from tests.test_dicom import dicom_bytes

GOOD = SAMPLE_IDS[:2]
HOSTILE = ["Case", "case", "a:b c", "-lead", "back\\slash", "tab\there", "Röntgen", "x" * 130]
"""Ids that differ only in case, or hold characters unsafe in file names: all segmented."""
LIMIT = "larger than the limit of 100,000,000 pixels"


def _png(array: np.ndarray) -> bytes:
    return imaging.encode_image(array)


def _forged_png(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` (CRC correct), with a 1-pixel body."""
    data = bytearray(_png(np.zeros((1, 1), np.uint8)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _forged_jpeg(width: int, height: int) -> bytes:
    """A real 8x8 JPEG whose frame header (SOF0) claims ``width`` x ``height``."""
    data = bytearray(cv2.imencode(".jpg", np.full((8, 8), 90, np.uint8))[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _forged_dicom(width: int, height: int) -> bytes:
    """A DICOM file of 1 pixel whose Rows and Columns claim ``height`` x ``width``."""
    return dicom_bytes(np.zeros((1, 1), np.uint8), Rows=height, Columns=width)


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory) -> Path:
    """``images/`` + ``masks/``: 2 good pairs, every bad input, and the hostile names."""
    root = copy_sample(tmp_path_factory.mktemp("bad"), GOOD)
    images, masks = root / "images", root / "masks"
    xray = cv2.imread(str(images / f"{GOOD[0]}.png"), cv2.IMREAD_UNCHANGED)
    truth = cv2.imread(str(masks / f"{GOOD[0]}.png"), cv2.IMREAD_UNCHANGED)
    png = _png(xray)
    jpeg = cv2.imencode(".jpg", xray)[1].tobytes()
    corrupt = bytearray(png)
    corrupt[len(png) // 2 : len(png) // 2 + 64] = bytes(64)  # zeros over the middle of IDAT
    files = {
        "zero.png": b"",
        "text.png": b"Patient notes: not an image at all.\n",
        "stub.png": imaging.PNG_MAGIC + b" truncated",
        "corrupt.png": bytes(corrupt),
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "rgba.png": _png(cv2.cvtColor(xray, cv2.COLOR_GRAY2BGRA)),
        "deep16.png": _png(xray.astype(np.uint16) * 257),
        "jpeg.jpg": jpeg,
        "tiny.png": _png(np.full((1, 1), 128, np.uint8)),
        "huge.png": _forged_png(20000, 20000),
        "hugejpeg.jpg": _forged_jpeg(20000, 20000),
        "hugedicom.dcm": _forged_dicom(20000, 20000),
        "mismatch.png": _png(cv2.resize(xray, (200, 300))),
        "nomask.png": png,
        **{f"{name}.png": png for name in HOSTILE},
    }
    for name, data in files.items():
        (images / name).write_bytes(data)
        if name not in ("nomask.png", "mismatch.png"):
            (masks / f"{Path(name).stem}.png").write_bytes(
                _png(np.full((1, 1), 255, np.uint8)) if name == "tiny.png" else _png(truth)
            )
    (masks / "mismatch.png").write_bytes(_png(truth))  # 512x512 for a 200x300 image
    return root


def _expected(root: Path) -> dict[str, tuple[str, str | None]]:
    """``(status, error)`` of each id in the segment job's table."""

    def decode_error(name: str, why: str) -> tuple[str, str]:
        size = (root / "images" / name).stat().st_size
        return "error", f"ImageDecodeError: {root / 'images' / name}: {why.format(size=size)}"

    too_big = "image of 20000x20000 pixels is larger than the limit of 100,000,000 pixels"
    mismatch = f"mask 512x512 differs from image 200x300: {root / 'masks' / 'mismatch.png'}"
    return {
        **dict.fromkeys([*GOOD, "rgba", "deep16", "jpeg", *HOSTILE], ("ok", None)),
        "tiny": ("flagged", "no lung found"),  # a 1x1 film: its mask is no pair of lungs
        "zero": decode_error("zero.png", "empty file (0 bytes)"),
        "text": decode_error("text.png", "not a PNG, JPEG or DICOM image ({size} bytes)"),
        "stub": decode_error("stub.png", "PNG without a readable size header ({size} bytes)"),
        "corrupt": decode_error("corrupt.png", "corrupt or truncated PNG ({size} bytes)"),
        "truncated": decode_error("truncated.jpg", "corrupt or truncated JPEG ({size} bytes)"),
        "huge": decode_error("huge.png", too_big),
        "hugejpeg": decode_error("hugejpeg.jpg", too_big),
        "hugedicom": decode_error("hugedicom.dcm", too_big),
        "mismatch": ("error", f"ValueError: {mismatch}"),
        "nomask": ("flagged", layout.NO_TRUTH),
    }


def test_output_names_are_safe_stable_and_distinct():
    ids = [*GOOD, *HOSTILE, "A.b-c_1", "..", "1.2.840.10008.5"]
    hashed = catalog._folded(ids)  # the ids that differ from another only in case
    names = {i: output_name(i, hashed=i in hashed) for i in ids}
    # Literal hashes: the same names on every run, machine and version.
    assert names == {
        GOOD[0]: GOOD[0],
        GOOD[1]: GOOD[1],
        "A.b-c_1": "A.b-c_1",
        "1.2.840.10008.5": "1.2.840.10008.5",  # a DICOM UID is a safe name
        "Case": "Case~15f86e24ed25",  # Case and case differ only in case: both hashed
        "case": "case~bbfcd4160a1e",
        "a:b c": "a_b_c~3df2467efdc4",
        "-lead": "lead~54e05a0bef38",
        "back\\slash": "back_slash~1498e0b566ad",
        "tab\there": "tab_here~5b8765931ded",
        "Röntgen": "R_ntgen~2ffd24208725",
        "x" * 130: "x" * 64 + "~3afbb132863c",
        "..": "_~5ec1f7e700f3",
    }
    assert output_name("Case") == "Case"  # alone, a safe id is its own name
    for case_id, name in names.items():
        assert output_name(case_id, hashed="~" in name) == name


def test_non_utf8_file_name_is_named_not_a_crash(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"x")
    with open(bytes(tmp_path / "bad") + b"\xff.png", "wb"):
        pass
    with pytest.raises(CatalogError, match=r"not UTF-8: b'.*bad\\xff\.png'; rename it"):
        catalog.find_cases(str(tmp_path))


@pytest.mark.usefixtures("local_ray")
@pytest.mark.timeout(300)
def test_evaluate_gives_every_bad_input_one_specific_row(bad_root, model_path, tmp_path):
    out = tmp_path / "out"
    config = labelled_config(
        bad_root, out, EvaluateConfig, model=model_path, batch_size=4, overlays=True
    )
    summary = run_evaluation(config)
    rows = pq.read_table(out / layout.SEGMENT_TABLE).to_pylist()
    expected = _expected(bad_root)
    assert sorted(r["id"] for r in rows) == sorted(expected)  # one row per input, no duplicates
    assert {r["id"]: (r["status"], r["error"]) for r in rows} == expected
    ids = {case.id: case.name for case in catalog.find_cases(str(bad_root)).cases}
    for row in rows:
        written = row["status"] != "error"
        assert (row["mask"] is not None) == written == (row["overlay"] is not None)
        if written:
            assert row["mask"] == f"masks/{ids[row['id']]}.png"  # relative to the output root
            assert cv2.imread(str(out / row["mask"]), cv2.IMREAD_UNCHANGED).shape == (
                row["height"],
                row["width"],
            )
            assert (row["dice"] is None) == (row["id"] == "nomask")
    assert {p.name for p in (out / "masks").iterdir()} == {
        f"{ids[i]}.png" for i, (status, _) in expected.items() if status != "error"
    }
    tiny = next(r for r in rows if r["id"] == "tiny")
    assert (tiny["height"], tiny["width"]) == (1, 1)
    failed = sorted(i for i, (status, _) in expected.items() if status == "error")
    assert sorted(f["id"] for f in summary["failed"]) == failed
    assert summary["unscored"] == ["nomask"]
    assert not list(out.glob("*.parts")), "the journal is removed when the table is complete"


@pytest.mark.usefixtures("local_ray")
@pytest.mark.timeout(200)
def test_clean_gives_every_bad_input_one_specific_row(bad_root, tmp_path):
    result = run_cleaning(CleanConfig(input=str(bad_root), output=str(tmp_path), sheet=0))
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "cleaning.parquet").to_pylist()}
    expected = _expected(bad_root)
    expected["mismatch"] = expected["nomask"] = ("ok", None)  # clean reads no masks
    expected["tiny"] = ("flagged", "constant image (every pixel is 128): nothing to threshold")
    assert {i: (r["status"], r["error"]) for i, r in rows.items()} == expected
    assert (result.images, result.flagged, result.failed) == (len(expected), 1, 8)
    ids = {case.id: case.name for case in catalog.find_cases(str(bad_root)).cases}
    cleaned = {i for i, (status, _) in expected.items() if status == "ok"}
    assert {p.name for p in (tmp_path / "cleaned").iterdir()} == {f"{ids[i]}.png" for i in cleaned}


@pytest.mark.usefixtures("local_ray")
@pytest.mark.timeout(200)
def test_training_refuses_too_few_readable_pairs_naming_them(bad_root, tmp_path):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [GOOD[0], "zero", "huge"], "val": ["mismatch"]}))
    run = tmp_path / "run"
    config = TrainConfig(
        data=str(bad_root),
        output=str(run),
        workers=2,
        split=str(split),
        recipe=RecipeConfig(model=ModelConfig(size=64, base_filters=4, depth=2)),
    )
    expected = _expected(bad_root)
    with pytest.raises(UserError) as refused:
        run_training(config)
    message = str(refused.value)
    assert message.startswith(
        "too few readable image/mask pairs: 1 to train on (at least 2, one per worker) and 0 "
        "to validate on (at least 1 when the split has validation ids); 3 failed: "
    )
    for case_id in ("zero", "huge", "mismatch"):
        assert f"{case_id}: {expected[case_id][1]}" in message
    table = pq.read_table(run / "data.parquet")
    assert table.schema == DATA_SCHEMA
    rows = {r["id"]: (r["split"], r["status"], r["error"]) for r in table.to_pylist()}
    assert len(rows) == table.num_rows == len(expected)
    assert rows[GOOD[0]] == ("train", "ok", None)
    assert rows["zero"] == ("train", *expected["zero"])
    assert rows["mismatch"] == ("val", *expected["mismatch"])
    assert rows["nomask"] == (None, "flagged", "no lung mask: not trained on")
    assert rows[GOOD[1]] == (None, "flagged", "not in the --split file")
