"""DICOM and high-bit-depth input: DICOM files built here from the sample PNGs with pydicom.

Every variant below is an exact linear re-encoding of an 8-bit picture ``x`` (16 bits as
``257 x``, 12 bits stored as ``16 x``, MONOCHROME1 as ``4095 - 16 x``, a rescale of
``2 * 16 x - 1024``), so it must normalise to exactly the PNG's image, and the model must see
identical input.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG2MPML,
    UID,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    RLELossless,
)

from lungseg.core import imaging
from lungseg.core.config import SAMPLE, SegmentConfig
from lungseg.core.layout import NO_TRUTH, OK
from lungseg.io import catalog
from lungseg.jobs.segment import SCHEMA, run_segmentation
from lungseg.stages.preprocess import Preprocess, case_batch
from tests.conftest import SAMPLE_IDS


def dicom_bytes(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    syntax: UID = ExplicitVRLittleEndian,
    **header: object,
) -> bytes:
    """A DX DICOM file (preamble, file meta, dataset) holding ``pixels`` and ``header``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    if syntax != ExplicitVRLittleEndian:
        ds.compress(syntax)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", pixels)
    assert ok
    return buffer.tobytes()


def sample_picture(case_id: str = SAMPLE_IDS[0]) -> np.ndarray:
    """A sample X-ray as stored: 8-bit gray, 512x512."""
    return cv2.imread(str(Path(SAMPLE, "images", f"{case_id}.png")), cv2.IMREAD_UNCHANGED)


def _twelve_bit(x: np.ndarray) -> np.ndarray:
    return x.astype(np.uint16) * 16  # 0..4080: fits BitsStored 12


# Re-encodings of an 8-bit picture that must decode to the PNG's normalised image exactly.
VARIANTS: dict[str, Callable[[np.ndarray], bytes]] = {
    "png16": lambda x: png_bytes(x.astype(np.uint16) * 257),
    "dicom8": lambda x: dicom_bytes(x),
    "dicom12": lambda x: dicom_bytes(_twelve_bit(x), bits_stored=12),
    "dicom16": lambda x: dicom_bytes(x.astype(np.uint16) * 257),
    "monochrome1": lambda x: dicom_bytes(4095 - _twelve_bit(x), "MONOCHROME1", 12),
    # Stored 16 x, value 2 * 16 x - 1024: slope and intercept are exact binary fractions, so
    # float64 rescaling is exact and so is the stretch.
    "rescale": lambda x: dicom_bytes(
        _twelve_bit(x), bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024
    ),
    "rle": lambda x: dicom_bytes(_twelve_bit(x), bits_stored=12, syntax=RLELossless),
}


# --- decoding -----------------------------------------------------------------------------------


def test_dicom_is_recognised_by_its_preamble_not_its_name() -> None:
    picture = sample_picture()
    data = dicom_bytes(picture)
    assert imaging.is_dicom(data) and imaging.is_dicom(data[:132])
    assert not imaging.is_dicom(png_bytes(picture)) and not imaging.is_dicom(b"")
    np.testing.assert_array_equal(imaging.decode(data, "IM000001"), picture)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_load_exactly_like_the_8_bit_png(variant: str) -> None:
    for case_id in SAMPLE_IDS:
        picture = sample_picture(case_id)
        expected = imaging.load_image(png_bytes(picture), f"{case_id}.png")
        out = imaging.load_image(VARIANTS[variant](picture), case_id)
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, expected, err_msg=case_id)


def test_rescale_with_inexact_slope_is_within_one_grey_level() -> None:
    # 0.3 and -1000.7 are not binary fractions: x * 0.3 - 1000.7 carries a rounding error of a
    # few ulps, and a pixel whose exact stretch lands on a half grey level may round either
    # way. Exact is impossible to promise; one grey level is the bound.
    picture = sample_picture()
    data = dicom_bytes(
        _twelve_bit(picture), bits_stored=12, RescaleSlope="0.3", RescaleIntercept="-1000.7"
    )
    expected = imaging.normalise(picture)
    assert imaging.decode(data).dtype == np.float64
    assert np.abs(imaging.load_image(data).astype(int) - expected).max() <= 1


def test_window_centre_width_is_applied() -> None:
    # LINEAR windowing (PS3.3 C.11.2.1.2.1) with c = 2000, w = 2001 maps stored values at or
    # below c - 0.5 - (w - 1) / 2 = 999.5 to black, above c - 0.5 + (w - 1) / 2 = 2999.5 to
    # white and stretches linearly in between: normalised, that is the stretch of
    # clip(16 x, 999.5, 2999.5). Windowing divides by the width in float64, so as above a half
    # grey level may round either way: within one grey level.
    stored = _twelve_bit(sample_picture())
    data = dicom_bytes(stored, bits_stored=12, WindowCenter=2000, WindowWidth=2001)
    expected = imaging.normalise(np.clip(stored.astype(np.float64), 999.5, 2999.5))
    out = imaging.load_image(data)
    assert np.abs(out.astype(int) - expected).max() <= 1
    assert (out != imaging.normalise(stored)).mean() > 0.5  # the window changed the picture


@pytest.mark.filterwarnings("error")  # pydicom warns when a VOI LUT is indexed by floats
def test_voi_lut_sequence_is_applied_after_rescale() -> None:
    # A gamma-like VOI LUT over the 4096 rescaled values (stored 16 x + 0, slope 1): the
    # picture becomes lut[16 x], integers, so the stretch is exact.
    stored = _twelve_bit(sample_picture())
    lut = np.round(np.sqrt(np.arange(4096) / 4095) * 65535).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = lut.astype("<u2").tobytes()  # OW, little endian like the file
    data = dicom_bytes(
        stored, bits_stored=12, RescaleSlope=1, RescaleIntercept=0, VOILUTSequence=[item]
    )
    np.testing.assert_array_equal(imaging.load_image(data), imaging.normalise(lut[stored]))


@pytest.mark.parametrize("syntax", [MPEG2MPML], ids=["mpeg2-no-decoder"])
def test_unsupported_transfer_syntax_is_named(syntax: UID) -> None:
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros((4, 4), np.uint8))))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\xff\xd8 not decoded \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    with pytest.raises(imaging.ImageDecodeError) as caught:
        imaging.load_image(buffer.getvalue(), "scan.dcm")
    message = str(caught.value)
    assert message.startswith("scan.dcm: unsupported DICOM transfer syntax")
    assert str(syntax) in message and syntax.name in message


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (dicom_bytes(np.zeros((64, 64), np.uint16), bits_stored=12)[:2000], "could not be"),
        (b"\0" * 128 + b"DICM" + b"\x08\x00 garbage", "DICOM"),
    ],
    ids=["truncated", "garbage-after-magic"],
)
def test_corrupt_dicom_raises_a_decode_error_naming_the_file(data: bytes, reason: str) -> None:
    with pytest.raises(imaging.ImageDecodeError, match=rf"^broken\.dcm: .*{reason}"):
        imaging.load_image(data, "broken.dcm")


def test_missing_pydicom_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pydicom", None)  # makes `import pydicom` fail
    with pytest.raises(imaging.ImageDecodeError, match=r'pip install "lungseg\[dicom\]"'):
        imaging.load_image(dicom_bytes(np.zeros((4, 4), np.uint8)), "scan.dcm")


# --- header fields ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            {"Modality": "DX", "ViewPosition": "PA", "PixelSpacing": [0.175, 0.143]},
            imaging.ImageInfo("DX", "PA", 0.175, 0.143),
        ),
        (  # Pixel Spacing wins over Imager Pixel Spacing
            {"PixelSpacing": [0.2, 0.1], "ImagerPixelSpacing": [0.3, 0.3]},
            imaging.ImageInfo("", "", 0.2, 0.1),
        ),
        (
            {"Modality": "CR", "ImagerPixelSpacing": [0.15, 0.16]},
            imaging.ImageInfo("CR", "", 0.15, 0.16),
        ),
        ({"Modality": "DX", "PixelSpacing": [0.2]}, imaging.ImageInfo("DX")),  # one value: unknown
        ({}, imaging.ImageInfo()),
    ],
    ids=["pixel-spacing", "pixel-over-imager", "imager-spacing", "bad-spacing", "none"],
)
def test_header_fields(header: dict, expected: imaging.ImageInfo) -> None:
    image, info = imaging.load_image_with_info(dicom_bytes(np.eye(4, dtype=np.uint8), **header))
    assert image.shape == (4, 4)
    assert (info.modality, info.view_position) == (expected.modality, expected.view_position)
    np.testing.assert_array_equal(
        [info.spacing_row_mm, info.spacing_col_mm],
        [expected.spacing_row_mm, expected.spacing_col_mm],  # NaN equals NaN here
    )


def test_png_has_an_empty_header() -> None:
    _, info = imaging.load_image_with_info(png_bytes(sample_picture()))
    assert info.modality == info.view_position == ""
    assert np.isnan(info.spacing_row_mm) and np.isnan(info.spacing_col_mm)


# --- catalog and preprocessing ------------------------------------------------------------------


def test_catalog_finds_suffixless_dicom_but_not_dicomdir_or_other_files(tmp_path: Path) -> None:
    picture = np.eye(8, dtype=np.uint8)
    series = tmp_path / "DICOM" / "PAT1" / "SER1"
    series.mkdir(parents=True)
    (series / "IM000001").write_bytes(dicom_bytes(picture))
    (tmp_path / "scan.dcm").write_bytes(dicom_bytes(picture))
    (tmp_path / "DICOMDIR").write_bytes(dicom_bytes(picture))  # an index, never an image
    (tmp_path / "README").write_text("not an image")
    (tmp_path / "notes.txt").write_bytes(dicom_bytes(picture))  # a suffix that is not an image's
    found = catalog.find_cases(str(tmp_path))
    assert [(c.id, c.image) for c in found.cases] == [
        ("IM000001", str(series / "IM000001")),
        ("scan", str(tmp_path / "scan.dcm")),
    ]


def test_model_input_identical_for_png_16_bit_png_and_dicom(tmp_path: Path) -> None:
    """The issue's "16-bit segments like 8-bit": the model sees the same array for every
    encoding of an image, so its masks are identical (Dice 1.0), whatever the model."""
    cases = []
    for case_id in SAMPLE_IDS:
        picture = sample_picture(case_id)
        (tmp_path / f"{case_id}.png").write_bytes(png_bytes(picture))
        cases.append(catalog.Case(case_id, str(tmp_path / f"{case_id}.png")))
        for variant, encode in VARIANTS.items():
            path = tmp_path / f"{case_id}_{variant}"
            path.write_bytes(encode(picture))
            cases.append(catalog.Case(path.name, str(path)))
    preprocess = Preprocess(size=256)
    out = preprocess(case_batch(cases))
    assert set(out["status"]) == {OK}
    images = dict(zip(out["id"], out["image"], strict=True))
    for case_id in SAMPLE_IDS:
        for variant in VARIANTS:
            np.testing.assert_array_equal(images[f"{case_id}_{variant}"], images[case_id])


# --- the segment job end to end -----------------------------------------------------------------


@pytest.mark.usefixtures("local_ray")
@pytest.mark.timeout(300)
def test_segment_dicom_end_to_end(tmp_path: Path, model_path: str) -> None:
    picture = sample_picture()
    wide = cv2.resize(picture, (400, 300), interpolation=cv2.INTER_AREA)  # rows 300, cols 400
    truth = cv2.imread(str(Path(SAMPLE, "masks", f"{SAMPLE_IDS[0]}.png")), cv2.IMREAD_UNCHANGED)
    images, masks = tmp_path / "images", tmp_path / "masks"
    (images / "PAT1").mkdir(parents=True)
    masks.mkdir()
    files = {
        "square.dcm": dicom_bytes(
            picture, Modality="DX", ViewPosition="PA", PixelSpacing=[0.175, 0.143]
        ),
        "wide.png": png_bytes(wide),
        "wide16.png": png_bytes(wide.astype(np.uint16) * 257),
        "wide_mono1.dcm": dicom_bytes(
            4095 - _twelve_bit(wide),
            "MONOCHROME1",
            12,
            Modality="CR",
            ImagerPixelSpacing=[0.2, 0.1],
        ),
        "PAT1/IM000001": dicom_bytes(
            _twelve_bit(wide),
            bits_stored=12,
            RescaleSlope=2,
            RescaleIntercept=-1024,
            Modality="DX",
            ViewPosition="AP",
            PixelSpacing=[0.125, 0.25],
        ),
        "broken.dcm": b"\0" * 128 + b"DICM" + b"truncated",
    }
    for name, data in files.items():
        (images / name).write_bytes(data)
    (masks / "square.png").write_bytes(png_bytes(truth))

    out = tmp_path / "out"
    result = run_segmentation(
        SegmentConfig(
            model=model_path,
            input=str(images),
            masks=str(masks),
            output=str(out),
            batch_size=2,
        )
    )
    table = pq.read_table(result.table)
    assert table.schema == SCHEMA
    rows = {row["id"]: row for row in table.to_pylist()}
    assert table.num_rows == len(files) == len(rows)
    assert set(rows) == {"square", "wide", "wide16", "wide_mono1", "IM000001", "broken"}
    assert (result.images, result.flagged, result.failed) == (6, 4, 1)

    expected = {  # id: (rows, cols, modality, view, row spacing, col spacing)
        "square": (512, 512, "DX", "PA", 0.175, 0.143),
        "wide": (300, 400, None, None, None, None),
        "wide16": (300, 400, None, None, None, None),
        "wide_mono1": (300, 400, "CR", None, 0.2, 0.1),
        "IM000001": (300, 400, "DX", "AP", 0.125, 0.25),
    }
    written = {}
    for case_id, (height, width, modality, view, row_mm, col_mm) in expected.items():
        row = rows[case_id]
        # Only "square" has a mask among the masks given: the others are flagged, unscored.
        status = ("ok", None) if case_id == "square" else ("flagged", NO_TRUTH)
        assert (row["status"], row["error"]) == status
        mask = cv2.imread(str(out / row["mask"]), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (height, width) == (row["height"], row["width"])
        assert set(np.unique(mask)) <= {0, 255}
        got = (row["modality"], row["view_position"], row["spacing_row_mm"], row["spacing_col_mm"])
        assert got == (modality, view, row_mm, col_mm)
        if row_mm is None:
            assert row["lung_area_mm2"] is None
        else:
            assert row["lung_area_mm2"] == int((mask > 0).sum()) * (row_mm * col_mm)
            sides = row["right_lung_area_mm2"] + row["left_lung_area_mm2"]
            assert sides == pytest.approx(row["lung_area_mm2"])
        written[case_id] = mask
    assert rows["square"]["dice"] is not None and rows["IM000001"]["dice"] is None
    # Every encoding of the wide picture gave the model the same input: the same mask.
    for case_id in ("wide16", "wide_mono1", "IM000001"):
        np.testing.assert_array_equal(written[case_id], written["wide"], err_msg=case_id)
    broken = rows["broken"]
    assert broken["status"] == "error" and "ImageDecodeError" in broken["error"]
    assert broken["mask"] is None and broken["modality"] is None
    assert broken["lung_area_mm2"] is None
