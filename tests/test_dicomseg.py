"""``--dicom-seg``: a DICOM Segmentation (SEG) of each DICOM image, read back with highdicom and
with plain pydicom, locally and in a bucket, kept by a resumed run only while it is intact."""

from __future__ import annotations

import io
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.uid import SegmentationStorage

from lungseg import __version__
from lungseg.core import dicomseg, imaging
from lungseg.core.config import SegmentConfig
from lungseg.core.layout import NO_DICOM_SEG, SEGMENT
from lungseg.io import storage
from lungseg.io.storage import Store
from lungseg.jobs.segment import run_segmentation
from lungseg.model import modelfile
from lungseg.runs import table
from tests.conftest import SAMPLE_IDS
from tests.test_dicom import _twelve_bit, dicom_bytes, png_bytes, sample_picture

REPO = Path(__file__).resolve().parents[1]

# The endpoint first: Ray, started after it, gives its workers the endpoint's keys.
pytestmark = [pytest.mark.usefixtures("s3_endpoint", "local_ray"), pytest.mark.timeout(420)]


def _patient(n: int) -> dict[str, object]:
    """The header of a film of patient ``n``, in a study and series of its own."""
    return {
        "Modality": "DX",
        "PatientID": f"PAT{n}",
        "PatientName": f"Doe^Jane{n}",
        "PatientBirthDate": "19700101",
        "PatientSex": "F",
        "AccessionNumber": f"ACC{n}",
        "StudyID": f"S{n}",
        "StudyDate": "20260101",
        "StudyTime": "101010",
        "StudyInstanceUID": pydicom.uid.generate_uid(),
        "SeriesInstanceUID": pydicom.uid.generate_uid(),
        "SeriesNumber": 1,
    }


def _films() -> dict[str, bytes]:
    """8-bit MONOCHROME2, 12-bit MONOCHROME1 of another size, 16-bit, a PNG, and a DICOM
    without the study and series UIDs a SEG must reference."""
    wide = cv2.resize(sample_picture(SAMPLE_IDS[1]), (400, 300), interpolation=cv2.INTER_AREA)
    return {
        "mono2.dcm": dicom_bytes(sample_picture(SAMPLE_IDS[0]), **_patient(1)),
        "mono1.dcm": dicom_bytes(4095 - _twelve_bit(wide), "MONOCHROME1", 12, **_patient(2)),
        "sixteen.dcm": dicom_bytes(
            sample_picture(SAMPLE_IDS[2]).astype(np.uint16) * 257, **_patient(3)
        ),
        "plain.png": png_bytes(sample_picture(SAMPLE_IDS[3])),
        "anonymous.dcm": dicom_bytes(sample_picture(SAMPLE_IDS[4]), Modality="DX"),
    }


DICOM_IDS = ("mono2", "mono1", "sixteen")


def _check_seg(seg: bytes, film: bytes, labels: np.ndarray, sha256: str) -> pydicom.Dataset:
    """Assert that ``seg`` is the SEG of ``film`` holding ``labels``; its dataset."""
    source = pydicom.dcmread(io.BytesIO(film))
    # highdicom: segment 1 is label 1 (the patient's right lung), segment 2 label 2.
    read = hd.seg.segread(io.BytesIO(seg))
    assert read.number_of_segments == 2
    pixels = read.get_pixels_by_source_instance(
        [source.SOPInstanceUID], combine_segments=True, skip_overlap_checks=True
    )
    np.testing.assert_array_equal(pixels[0], labels)
    # Plain pydicom: each frame is one segment's bits at the film's own rows and columns.
    ds = pydicom.dcmread(io.BytesIO(seg))
    assert (ds.SOPClassUID, ds.Modality, ds.SegmentationType) == (
        SegmentationStorage,
        "SEG",
        "BINARY",
    )
    assert (ds.Rows, ds.Columns) == labels.shape == (source.Rows, source.Columns)
    frames = ds.pixel_array.reshape(-1, *labels.shape)
    numbers = [
        int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for f in ds.PerFrameFunctionalGroupsSequence
    ]
    assert len(frames) == len(numbers) == 2  # both lungs found in these films
    for frame, number in zip(frames, numbers, strict=True):
        np.testing.assert_array_equal(frame, (labels == number).astype(np.uint8))
    segments = {
        int(s.SegmentNumber): (
            s.SegmentLabel,
            s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
            s.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator,
            s.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
            s.SegmentAlgorithmType,
        )
        for s in ds.SegmentSequence
    }
    assert segments == {
        1: ("Right lung", "3341006", "SCT", "91723000", "AUTOMATIC"),
        2: ("Left lung", "44029006", "SCT", "91723000", "AUTOMATIC"),
    }
    algorithm = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("lungseg", __version__)
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    assert f"model_sha256={sha256}" in algorithm.AlgorithmParameters
    # Patient and study copied, the film referenced, a new series and instance.
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "AccessionNumber", "StudyID", "StudyDate"):  # fmt: skip
        assert ds[keyword].value == source[keyword].value, keyword
    reference = ds.ReferencedSeriesSequence[0]
    assert reference.SeriesInstanceUID == source.SeriesInstanceUID
    assert reference.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == (
        source.SOPInstanceUID
    )
    for frame in ds.PerFrameFunctionalGroupsSequence:
        derived = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert derived.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.SOPInstanceUID not in (source.SOPInstanceUID, source.SeriesInstanceUID)
    assert (ds.Manufacturer, ds.SeriesNumber, ds.SoftwareVersions) == (
        "lungseg",
        dicomseg.SERIES_NUMBER,
        __version__,
    )
    return ds


def test_segment_writes_a_seg_of_each_dicom_film_and_resume_checks_it(
    tmp_path: Path, model_path: str
) -> None:
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    films = _films()
    for name, data in films.items():
        (images / name).write_bytes(data)
    config = SegmentConfig(
        model=model_path, input=str(images), output=str(out), batch_size=2, dicom_seg=True
    )
    result = run_segmentation(config)
    assert (result.images, result.failed, result.dicom_segs, result.not_dicom) == (5, 0, 3, 1)
    rows = {r["id"]: r for r in pq.read_table(result.table).to_pylist()}
    sha256 = modelfile.describe(Path(model_path).read_bytes()).sha256
    uids = set()
    for case_id in DICOM_IDS:
        row = rows[case_id]
        assert row["dicom_seg"] == f"dicom-seg/{case_id}.dcm"
        seg = (out / row["dicom_seg"]).read_bytes()
        assert row["dicom_seg_fingerprint"] == storage.fingerprint(seg)
        labels = cv2.imread(str(out / row["labels"]), cv2.IMREAD_UNCHANGED)
        assert labels.shape == (row["height"], row["width"])
        ds = _check_seg(seg, films[f"{case_id}.dcm"], labels, sha256)
        uids |= {ds.SOPInstanceUID, ds.SeriesInstanceUID}
    assert len(uids) == 2 * len(DICOM_IDS), "every SEG in a new series, with a new instance"
    assert rows["mono1"]["height"] == 300 and rows["mono1"]["width"] == 400
    assert rows["plain"]["dicom_seg"] is None and rows["plain"]["dicom_seg_fingerprint"] is None
    anonymous = rows["anonymous"]
    assert anonymous["status"] == "flagged" and anonymous["dicom_seg"] is None
    assert anonymous["error"] == (
        f"{NO_DICOM_SEG}: the DICOM header has no StudyInstanceUID, SeriesInstanceUID to reference"
    )
    assert (out / anonymous["mask"]).is_file()  # the PNGs stand
    assert sorted(p.name for p in (out / "dicom-seg").iterdir()) == [
        "mono1.dcm",
        "mono2.dcm",
        "sixteen.dcm",
    ]
    # In the ledger, as every file of a row.
    ledger = table.written_files(result.table, SEGMENT.row_files, Store())
    for case_id in DICOM_IDS:
        assert ledger[f"dicom-seg/{case_id}.dcm"] == rows[case_id]["dicom_seg_fingerprint"]

    # A resumed run keeps every row while the SEGs are intact; one cut short is made again.
    kept = run_segmentation(replace(config, resume=True))
    assert (kept.resumed, kept.dicom_segs, kept.not_dicom) == (5, 3, 1)
    cut = out / "dicom-seg" / "mono1.dcm"
    cut.write_bytes(cut.read_bytes()[:-10])
    again = run_segmentation(replace(config, resume=True))
    assert (again.resumed, again.dicom_segs) == (4, 3)
    row = {r["id"]: r for r in pq.read_table(again.table).to_pylist()}["mono1"]
    assert row["dicom_seg_fingerprint"] == storage.fingerprint(cut.read_bytes())
    labels = cv2.imread(str(out / row["labels"]), cv2.IMREAD_UNCHANGED)
    _check_seg(cut.read_bytes(), films["mono1.dcm"], labels, sha256)


def test_segs_go_to_a_bucket(s3, s3_endpoint: str, model_path: str) -> None:
    s3.create_bucket(Bucket="pacs")
    films = {k: v for k, v in _films().items() if k in ("mono2.dcm", "plain.png")}
    for name, data in films.items():
        s3.put_object(Bucket="pacs", Key=f"in/{name}", Body=data)
    s3.upload_file(model_path, "pacs", "model.keras")
    result = run_segmentation(
        SegmentConfig(
            model="s3://pacs/model.keras",
            input="s3://pacs/in",
            output="s3://pacs/out",
            batch_size=2,
            dicom_seg=True,
            s3_endpoint=s3_endpoint,
        )
    )
    assert (result.images, result.failed, result.dicom_segs, result.not_dicom) == (2, 0, 1, 1)
    store = Store(s3_endpoint)
    fs, path = store.resolve(result.table)
    rows = {r["id"]: r for r in pq.read_table(path, filesystem=fs).to_pylist()}
    assert rows["plain"]["dicom_seg"] is None
    seg = s3.get_object(Bucket="pacs", Key="out/dicom-seg/mono2.dcm")["Body"].read()
    assert rows["mono2"]["dicom_seg_fingerprint"] == storage.fingerprint(seg)
    labels = s3.get_object(Bucket="pacs", Key=f"out/{rows['mono2']['labels']}")["Body"].read()
    sha256 = modelfile.describe(Path(model_path).read_bytes()).sha256
    _check_seg(seg, films["mono2.dcm"], imaging.decode(labels), sha256)


def test_dicom_header_keeps_no_pixels_nor_overlays() -> None:
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(sample_picture(), PatientID="P1")))
    ds.add_new(0x60000010, "US", 512)  # an overlay plane's rows, and its bitmap
    ds.add_new(0x60003000, "OW", bytes(512 * 512 // 8))
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    image, _, header = imaging.load_image_with_header(buffer.getvalue(), "film.dcm")
    np.testing.assert_array_equal(image, imaging.load_image(buffer.getvalue()))
    kept = pydicom.dcmread(io.BytesIO(header))
    assert "PixelData" not in kept and not [e for e in kept if e.tag.group == 0x6000]
    assert (kept.PatientID, kept.SOPInstanceUID, kept.Rows) == ("P1", ds.SOPInstanceUID, 512)
    assert len(header) < 1000 < 512 * 512
    assert imaging.load_image_with_header(png_bytes(sample_picture()))[2] == b""


def test_labels_of_another_size_are_refused() -> None:
    _, _, header = imaging.load_image_with_header(dicom_bytes(sample_picture(), **_patient(1)))
    with pytest.raises(ValueError, match=r"^labels 256x256 differ from the image 512x512$"):
        dicomseg.segmentation(
            header, np.zeros((256, 256), np.uint8), dicomseg.Algorithm("0" * 64, 256, 0.5)
        )


@pytest.mark.timeout(120)
def test_without_highdicom_dicom_seg_is_one_line_and_status_2(tmp_path: Path) -> None:
    # highdicom made unimportable in a real lungseg process: refused before any work.
    block = "import sys; sys.modules['highdicom'] = None; from lungseg.cli import main; "
    out = tmp_path / "out"
    argv = ["segment", "--dicom-seg", "--output", str(out)]
    done = subprocess.run(
        [sys.executable, "-c", f"{block}sys.exit(main(sys.argv[1:]))", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=110,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [f"lungseg segment: error: {dicomseg.MISSING}"]
    assert not out.exists()
