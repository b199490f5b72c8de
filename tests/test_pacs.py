"""DICOM as hospitals send it: the compressed transfer syntaxes PACS archives use, and only
radiographs segmented.

Chest X-rays of the packaged sample are written here in each syntax (pydicom encodes RLE,
JPEG-LS and JPEG 2000; imagecodecs' libjpeg-turbo the JPEG Lossless and 12-bit JPEG Extended
frames, which pydicom cannot encode); pydicom's own bundled test files, from real vendors'
tools, are the images that nobody here wrote the reader for.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from lungseg.core import imaging
from lungseg.core.config import SegmentConfig
from lungseg.core.layout import ERROR, FLAGGED, OK
from lungseg.io import catalog
from lungseg.jobs.segment import run_segmentation
from lungseg.stages.preprocess import Preprocess, case_batch
from tests.conftest import SAMPLE_IDS
from tests.test_dicom import _twelve_bit, dicom_bytes, png_bytes, sample_picture

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
"""pydicom's bundled test files (they ship with pydicom: no download)."""


def libjpeg_dicom(stored: np.ndarray, syntax: UID, **header: object) -> bytes:
    """A DX DICOM of 12-bit ``stored`` values whose one frame libjpeg-turbo encoded:
    Process 14 with predictor 1 (SV1) or 7 (any lossless predictor), or 12-bit Extended."""
    options = {
        JPEGLosslessSV1: {"lossless": True, "predictor": 1},
        JPEGLossless: {"lossless": True, "predictor": 7},
        JPEGExtended12Bit: {"level": 95},
    }[syntax]
    frame = imagecodecs.jpeg8_encode(stored, bitspersample=12, **options)
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(stored, bits_stored=12, **header)))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


LOSSLESS = {
    "jpeg-lossless-sv1": lambda x: libjpeg_dicom(_twelve_bit(x), JPEGLosslessSV1),
    "jpeg-lossless": lambda x: libjpeg_dicom(_twelve_bit(x), JPEGLossless),
    "jpeg-ls": lambda x: dicom_bytes(_twelve_bit(x), bits_stored=12, syntax=JPEGLSLossless),
    "jpeg2000": lambda x: dicom_bytes(_twelve_bit(x), bits_stored=12, syntax=JPEG2000Lossless),
    "rle": lambda x: dicom_bytes(_twelve_bit(x), bits_stored=12, syntax=RLELossless),
}
"""Lossless syntaxes, 12 bits stored: they must load exactly like the 8-bit PNG."""
LOSSY = {"jpeg-extended-12": lambda x: libjpeg_dicom(_twelve_bit(x), JPEGExtended12Bit)}


def syntax_of(data: bytes) -> UID:
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID


# --- decoding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(LOSSLESS))
def test_lossless_syntaxes_load_exactly_like_the_png(variant: str) -> None:
    picture = sample_picture()
    data = LOSSLESS[variant](picture)
    assert syntax_of(data).is_compressed
    expected = imaging.load_image(png_bytes(picture), "x.png")
    np.testing.assert_array_equal(imaging.load_image(data, variant), expected)


def test_jpeg_lossless_files_carry_their_own_syntax() -> None:
    picture = sample_picture()
    assert syntax_of(LOSSLESS["jpeg-lossless-sv1"](picture)) == JPEGLosslessSV1
    assert syntax_of(LOSSLESS["jpeg-lossless"](picture)) == JPEGLossless
    assert syntax_of(LOSSY["jpeg-extended-12"](picture)) == JPEGExtended12Bit


def test_twelve_bit_jpeg_extended_decodes_within_its_loss() -> None:
    picture = sample_picture()
    out = imaging.load_image(LOSSY["jpeg-extended-12"](picture), "extended")
    expected = imaging.load_image(png_bytes(picture), "x.png")
    difference = np.abs(out.astype(int) - expected)
    assert difference.mean() < 1.0 and np.percentile(difference, 99) <= 3


def test_a_missing_plugin_is_named_with_the_extra() -> None:
    """Without the extra's decoders (pydicom alone), a JPEG-LS file's error row names what
    would read it. The plugins are hidden in a fresh interpreter, before pydicom imports."""
    data = LOSSLESS["jpeg-ls"](sample_picture())
    hidden = ("jpeg_ls", "libjpeg", "openjpeg", "rle", "pylibjpeg")
    script = (
        "import sys\n"
        f"for name in {hidden!r}: sys.modules[name] = None\n"
        "from lungseg.core import imaging\n"
        "try:\n"
        "    imaging.load_image(sys.stdin.buffer.read(), 'scan.dcm')\n"
        "except imaging.ImageDecodeError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], input=data, capture_output=True, check=True
    ).stdout.decode()
    assert out.startswith(f"scan.dcm: unsupported DICOM transfer syntax {JPEGLSLossless}")
    assert "it needs one of: " in out and "pyjpegls" in out


def test_a_jpeg_ls_frame_larger_than_its_header_is_refused_before_decoding() -> None:
    """A compressed frame's own header (JPEG-LS SOF55) is read before it inflates: a forged
    DICOM header of 8x8 pixels cannot make a 512x512 frame decode."""
    ds = pydicom.dcmread(io.BytesIO(LOSSLESS["jpeg-ls"](sample_picture())))
    ds.Rows = ds.Columns = 8
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    with pytest.raises(imaging.ImageDecodeError, match="its compressed frame is 512x512 pixels"):
        imaging.load_image(buffer.getvalue(), "forged.dcm")


def test_rle_bytes_that_look_like_a_jpeg_2000_header_are_pixels() -> None:
    """Only a JPEG or JPEG 2000 frame's start is read as a header: an RLE film whose high
    bytes run ff 4f ff 51 (SOC, SIZ) reads, where it was once refused as a forged size."""
    row = np.array([0xFF00, 0x4F00, 0xFF00, 0x5100, 0x0100, 0x0200, 0x0300, 0x0400] * 8)
    stored = np.tile(row.astype(np.uint16), (64, 1))
    data = dicom_bytes(stored, syntax=RLELossless)
    assert b"\xff\x4f\xff\x51\x01\x02\x03\x04" in data
    np.testing.assert_array_equal(imaging.decode(data, "rle.dcm"), stored)


# --- only radiographs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ({"Modality": "MR"}, "not a radiograph: modality MR"),
        ({"Modality": "CT"}, "not a radiograph: modality CT"),
        ({"Modality": "MG"}, "not a chest radiograph: modality MG"),
        (
            {"Modality": "OT", "ImagePositionPatient": [0, 0, 0]},
            "not a radiograph: modality OT with the ImagePositionPatient of a cross-sectional",
        ),
        (
            {"Modality": "OT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.4"},
            "not a radiograph: SOP class MR Image Storage",
        ),
    ],
    ids=["mr", "ct", "mammogram", "slice-geometry", "mr-sop-class"],
)
def test_non_radiographs_are_refused_by_name(header: dict, reason: str) -> None:
    with pytest.raises(imaging.ImageDecodeError, match=rf"^scan\.dcm: {reason}"):
        imaging.load_image(dicom_bytes(sample_picture(), **header), "scan.dcm")


def test_a_colour_secondary_capture_is_refused() -> None:
    colour = np.dstack([sample_picture()] * 3)
    data = dicom_bytes(colour, "RGB", Modality="OT", SOPClassUID=SecondaryCaptureImageStorage)
    with pytest.raises(imaging.ImageDecodeError, match=r"secondary capture in colour .*RGB"):
        imaging.load_image(data, "capture.dcm")


@pytest.mark.parametrize(
    "header",
    [
        {"Modality": "CR"},
        {"Modality": "DX", "ViewPosition": "AP"},
        {"Modality": "DX", "ViewPosition": "LLD"},  # decubitus: a frontal projection
        {"Modality": "OT", "SOPClassUID": SecondaryCaptureImageStorage},  # a digitised film
        {},  # no Modality, a DX SOP class
    ],
    ids=["cr", "dx-ap", "decubitus", "secondary-capture", "no-modality"],
)
def test_radiographs_and_grey_captures_load(header: dict) -> None:
    image, info = imaging.load_image_with_info(dicom_bytes(sample_picture(), **header))
    assert image.shape == (512, 512)
    assert info.view_position == header.get("ViewPosition", "")


def _view_code(meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "0", "SCT", meaning
    return item


@pytest.mark.parametrize(
    ("header", "view"),
    [
        ({"ViewPosition": "LL"}, "View Position LL"),
        ({"ViewPosition": "RL"}, "View Position RL"),
        ({"ViewPosition": "RLO"}, "View Position RLO"),
        ({"ViewCodeSequence": [_view_code("left lateral")]}, "view code 'left lateral'"),
    ],
    ids=["ll", "rl", "oblique", "view-code"],
)
def test_lateral_and_oblique_views_are_not_frontal(header: dict, view: str) -> None:
    data = dicom_bytes(sample_picture(), Modality="DX", **header)
    with pytest.raises(imaging.NotFrontalError, match=rf"not a frontal view \({view}\)") as info:
        imaging.load_image(data, "side.dcm")
    assert info.value.info.modality == "DX"
    assert info.value.info.view_position == header.get("ViewPosition", "")


def test_decubitus_view_code_is_frontal() -> None:
    code = [_view_code("left lateral decubitus")]
    image = imaging.load_image(dicom_bytes(sample_picture(), ViewCodeSequence=code))
    assert image.shape == (512, 512)


def test_pydicom_files_each_get_one_row_and_only_radiographs_are_read() -> None:
    """Every DICOM among pydicom's bundled files, preprocessed: one row each; read (``ok``)
    only where the header says radiograph or grey capture; every MR, CT, ultrasound, nuclear
    medicine, dose map and segmentation refused naming its modality; the lateral CR flagged."""
    files = sorted(p for p in PYDICOM_FILES.rglob("*") if p.is_file())
    dicoms = [p for p in files if imaging.is_dicom(p.read_bytes())]
    cases = [catalog.Case(str(p.relative_to(PYDICOM_FILES)), str(p)) for p in dicoms]
    out = Preprocess(size=64)(case_batch(cases))
    rows = {
        case_id: (status, error, modality)
        for case_id, status, error, modality in zip(
            out["id"], out["status"], out["error"], out["modality"], strict=True
        )
    }
    assert len(rows) == len(dicoms) > 150
    for case_id, (status, error, _) in rows.items():
        path = PYDICOM_FILES / case_id
        header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        modality = str(header.get("Modality") or "")
        if status == OK:
            assert modality in imaging.RADIOGRAPHS | imaging.CAPTURES, case_id
        elif modality in {"MR", "CT", "US", "NM", "SEG", "RTDOSE"} and "PixelData" in header:
            assert status == ERROR and f"not a radiograph: modality {modality}" in error, case_id
        else:
            assert status in (ERROR, FLAGGED) and error, case_id
    assert sorted(i for i, (status, *_) in rows.items() if status == OK) == [
        "JPEGLSNearLossless_08.dcm",  # secondary captures in grey, no Modality
        "JPEGLSNearLossless_16.dcm",
        "dicomdirtests/77654033/CR2/6247",  # CR, AP
        "dicomdirtests/77654033/CR3/6278",
        "image_dfl.dcm",  # OT, a secondary capture in grey
    ]
    assert rows[LATERAL] == (FLAGGED, f"{PYDICOM_FILES / LATERAL}: {NOT_FRONTAL_LL}", "CR")
    refused_mr = [error for _, error, _ in rows.values() if "radiograph: modality MR" in error]
    assert len(refused_mr) == 27  # with lung masks before, seven of them at full size


LATERAL = "dicomdirtests/77654033/CR1/6154"
"""pydicom's one lateral chest film (CR, View Position LL)."""
NOT_FRONTAL_LL = (
    "not a frontal view (View Position LL): the model segments frontal (PA or AP) chest "
    "radiographs; not segmented"
)


# --- the segment job end to end -----------------------------------------------------------------


@pytest.mark.usefixtures("local_ray")
@pytest.mark.timeout(420)
def test_segment_pacs_folder_end_to_end(tmp_path: Path, model_path: str) -> None:
    """One segment run over chest X-rays in every compressed syntax beside their PNG
    originals, a lateral and an AP view, and all of pydicom's bundled files: the lossless
    ones give the PNG's mask exactly, the lossy one nearly; one row per file; masks only for
    radiographs."""
    images = tmp_path / "images"
    shutil.copytree(PYDICOM_FILES, images / "pydicom")
    chest = images / "chest"
    chest.mkdir()
    case_id = SAMPLE_IDS[0]
    picture = sample_picture(case_id)
    (chest / f"{case_id}.png").write_bytes(png_bytes(picture))
    for variant, encode in {**LOSSLESS, **LOSSY}.items():
        (chest / f"{variant}.dcm").write_bytes(encode(picture))
    (chest / "ap.dcm").write_bytes(dicom_bytes(picture, Modality="DX", ViewPosition="AP"))
    (chest / "lateral.dcm").write_bytes(dicom_bytes(picture, Modality="DX", ViewPosition="LL"))
    found = catalog.find_cases(str(images))

    out = tmp_path / "out"
    result = run_segmentation(
        SegmentConfig(model=str(model_path), input=str(images), output=str(out), batch_size=4)
    )
    rows = {row["id"]: row for row in pq.read_table(result.table).to_pylist()}
    assert len(rows) == len(found.cases) == result.images

    def mask(row_id: str) -> np.ndarray:
        return cv2.imread(str(out / rows[row_id]["mask"]), cv2.IMREAD_UNCHANGED)

    png = mask(case_id)
    for variant in LOSSLESS:
        assert rows[variant]["status"] == OK, rows[variant]["error"]
        np.testing.assert_array_equal(mask(variant), png, err_msg=variant)
    lossy = mask("jpeg-extended-12") > 0
    dice = 2 * (lossy & (png > 0)).sum() / (lossy.sum() + (png > 0).sum())
    assert dice > 0.99
    assert (rows["ap"]["status"], rows["ap"]["view_position"]) == (OK, "AP")
    np.testing.assert_array_equal(mask("ap"), png)
    lateral = rows["lateral"]
    assert (lateral["status"], lateral["mask"], lateral["view_position"]) == (FLAGGED, None, "LL")
    assert lateral["error"].endswith(NOT_FRONTAL_LL)

    for row in rows.values():
        if row["source"].startswith(str(images / "pydicom")):
            modality = row["modality"] or ""
            if row["mask"] is not None:
                assert modality in imaging.RADIOGRAPHS | imaging.CAPTURES, row["id"]
            else:
                assert row["status"] in (ERROR, FLAGGED) and row["error"], row["id"]
    refused = [r for r in rows.values() if "not a radiograph: modality MR" in (r["error"] or "")]
    assert len(refused) >= 7 and all(r["mask"] is None for r in refused)
