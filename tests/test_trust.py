"""Outputs a careful user can trust: each numbered case of the trust issue, reproduced, then the
behaviour that replaced it (never overwrite their data, never mix runs, refuse hostile files)."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit

from lungseg.cli import EXIT_USAGE
from lungseg.core import imaging, qc
from lungseg.core.config import (
    AUTO,
    BUNDLED_MODEL,
    CleanConfig,
    ModelConfig,
    RecipeConfig,
    SegmentConfig,
    TrainConfig,
)
from lungseg.core.errors import UserError
from lungseg.core.layout import CLEAN, LOCK_FILE, MANIFEST_FILE, SEGMENT
from lungseg.io import catalog
from lungseg.io.storage import DEFAULT_STORE
from lungseg.jobs.clean import run_cleaning
from lungseg.jobs.fit import run_fit
from lungseg.jobs.segment import run_segmentation
from lungseg.runs import outputs
from lungseg.stages.pipeline import resolve_precision
from tests.conftest import SAMPLE_IDS, copy_sample, labelled_config
from tests.test_dicom import dicom_bytes, sample_picture

REPO = Path(__file__).resolve().parents[1]


# 1. ---------------------------------------------------------- outputs overlapping the inputs


def test_1_an_output_over_the_inputs_is_refused_before_any_write(tmp_path):
    data = copy_sample(tmp_path / "D", SAMPLE_IDS[:2])
    before = {p: p.read_bytes() for p in data.rglob("*.png")}
    for config, named in [
        (labelled_config(data, data), "--input"),  # segment -o D over D/images + D/masks
        (labelled_config(data, data / "images" / "out"), "--input"),  # inside the input
        (labelled_config(data, data / "masks"), "--masks"),  # onto the expert masks
    ]:
        with pytest.raises(UserError, match=rf"overlaps {named} .*never writes where it"):
            run_segmentation(config)
    with pytest.raises(UserError, match=r"--output .* overlaps --input"):
        run_cleaning(CleanConfig(input=str(data), output=str(data)))
    with pytest.raises(UserError, match=r"overlaps --data"):
        run_fit(TrainConfig(data=str(data), output=str(data / "run"), single_process=True))
    assert {p: p.read_bytes() for p in data.rglob("*.png")} == before  # the expert masks
    assert not list(data.rglob(MANIFEST_FILE)) and not list(data.rglob(LOCK_FILE))


def test_1_the_overlap_check_sees_through_links_and_spares_siblings(tmp_path):
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "data", tmp_path / "link")
    with pytest.raises(UserError, match="overlaps"):
        outputs.check_apart(
            DEFAULT_STORE, str(tmp_path / "link" / "o"), {"--input": str(tmp_path / "data")}
        )
    outputs.check_apart(
        DEFAULT_STORE, str(tmp_path / "data-out"), {"--input": str(tmp_path / "data")}
    )
    outputs.check_apart(DEFAULT_STORE, "s3://b/data-out", {"--input": "s3://b/data"})
    with pytest.raises(UserError, match="overlaps"):
        outputs.check_apart(DEFAULT_STORE, "s3://b/data", {"--input": "s3://b/data/images"})


# 2, 5. --------------------------------------------- manifests, --resume and --overwrite

AUTO_PRECISION = resolve_precision(AUTO, use_gpu=False)


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory, local_ray, model_path) -> tuple[Path, SegmentConfig]:
    """A finished segment run of 4 sample images, with overlays, in its own output root."""
    root = copy_sample(tmp_path_factory.mktemp("data"), SAMPLE_IDS[:4])
    out = tmp_path_factory.mktemp("runs") / "out"
    config = labelled_config(root, out, model=model_path, batch_size=2, overlays=True)
    run_segmentation(config)
    return out, config


def test_2_the_manifest_says_what_made_the_output(earlier_run, model_path):
    out, config = earlier_run
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    settings = manifest["settings"]
    assert manifest["job"] == "segment" and manifest["state"] == "complete"
    assert manifest["lungseg"] and manifest["images"] == 4
    from lungseg.model.modelfile import describe

    assert settings["model_sha256"] == describe(Path(model_path).read_bytes()).sha256
    assert settings["model_input_size"] == 256
    # A model file that Keras saved alone has no calibration: the bundled model's scores it.
    bundled = describe(Path(BUNDLED_MODEL).read_bytes()).calibration
    assert qc.Calibration(**settings["qc_calibration"]) == bundled
    # The default, auto, is recorded as what it became on this machine.
    assert (settings["threshold"], settings["precision"]) == (0.5, AUTO_PRECISION)
    assert settings["masks"] == config.masks and settings["input"] == config.input
    assert not (out / LOCK_FILE).exists(), "the lock goes with the job"


def test_2_a_model_without_a_calibration_is_scored_in_the_bundled_ones_units(model_path, caplog):
    from lungseg.jobs.segment import calibration
    from lungseg.model.modelfile import describe

    bundled = describe(Path(BUNDLED_MODEL).read_bytes())
    assert bundled.calibration is not None
    assert calibration(bundled, BUNDLED_MODEL) == (bundled.calibration, None)
    assert not caplog.text
    none = "it has none (not trained by a lungseg trainer)"
    assert calibration(describe(Path(model_path).read_bytes()), model_path) == (
        bundled.calibration,
        f"the bundled model's: {none}",
    )
    assert f"{model_path}: {none}: qc_score uses the bundled model's" in caplog.text


def test_2_a_dry_run_says_what_would_run_and_writes_nothing(earlier_run, tmp_path, caplog):
    out, config = earlier_run
    caplog.set_level("INFO", logger="lungseg")
    result = run_segmentation(replace(config, output=str(tmp_path / "dry"), dry_run=True))
    assert (result.planned, result.images) == (4, 0)
    assert not (tmp_path / "dry").exists()
    assert "dry run: would segment 4 of the catalog's 4 images" in caplog.text
    assert "which holds no earlier run" in caplog.text
    assert "files per image: masks/, labels/, overlays/;" in caplog.text
    assert f"device: cpu, precision {AUTO_PRECISION}, batch 2" in caplog.text
    caplog.clear()
    run_segmentation(replace(config, output=str(tmp_path / "dry"), batch_size=None, dry_run=True))
    assert f"precision {AUTO_PRECISION}, batch 4" in caplog.text  # the default, made concrete
    caplog.clear()
    before = sorted(p.name for p in out.iterdir())
    run_segmentation(replace(config, dry_run=True))  # into the earlier run's root
    assert "holds an earlier run (segment, complete): refused without --resume" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == before


def test_2_with_qc_off_masks_come_without_quality_control(earlier_run, tmp_path, caplog):
    out, config = earlier_run
    result = run_segmentation(replace(config, output=str(tmp_path / "off"), qc="off"))
    assert (result.images, result.flagged, result.failed, result.review) == (4, 0, 0, 0)
    rows = pq.read_table(result.table).to_pylist()
    assert all(r["status"] == "ok" and r["mask"] for r in rows)
    assert all(r[k] is None for r in rows for k in ("qc_dice", "qc_score", "qc", "qc_reason"))
    settings = json.loads((tmp_path / "off" / MANIFEST_FILE).read_text())["settings"]
    assert (settings["qc"], settings["qc_calibration"]) == ("off", None)
    assert "qc_score uses the bundled" not in caplog.text  # no calibration borrowed: none used
    on = pq.read_table(out / "segmentation.parquet").to_pylist()
    masks = {r["id"]: r["mask_fingerprint"] for r in on}
    assert {r["id"]: r["mask_fingerprint"] for r in rows} == masks  # the same masks


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"threshold": 0.6}, "threshold: 0.5 -> 0.6"),
        ({"precision": "float16"}, f"precision: '{AUTO_PRECISION}' -> 'float16'"),
        ({"model": BUNDLED_MODEL}, "model_sha256"),
        ({"masks": None}, "masks: "),
    ],
)
def test_2_resume_with_other_settings_is_refused_naming_them(earlier_run, change, named):
    out, config = earlier_run
    table = (out / "segmentation.parquet").read_bytes()
    with pytest.raises(UserError, match="holds a run with other settings") as refused:
        run_segmentation(replace(config, resume=True, **change))
    assert named in str(refused.value)
    assert (out / "segmentation.parquet").read_bytes() == table  # untouched


def test_2_resume_redoes_the_rows_of_a_run_from_before_quality_control(earlier_run, tmp_path):
    """Its table lacks the QC columns: read as unreadable, every image is segmented again."""
    out, config = earlier_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    table = pq.read_table(copy / "segmentation.parquet")
    pq.write_table(
        table.drop_columns(["qc_dice", "qc_score", "qc", "qc_reason"]),
        copy / "segmentation.parquet",
    )
    result = run_segmentation(replace(config, output=str(copy), resume=True))
    assert (result.images, result.resumed) == (4, 0)
    rows = pq.read_table(copy / "segmentation.parquet").to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(SAMPLE_IDS[:4])
    assert all(r["qc"] in ("ok", "review") and r["qc_score"] is not None for r in rows)


def test_2_a_fresh_run_into_an_earlier_one_is_refused(earlier_run):
    _, config = earlier_run
    with pytest.raises(UserError, match=r"holds the outputs of an earlier run .*--overwrite"):
        run_segmentation(config)


def test_5_overwrite_removes_the_earlier_outputs_first(earlier_run, tmp_path):
    out, config = earlier_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    fewer = copy_sample(tmp_path / "fewer", SAMPLE_IDS[4:6])
    result = run_segmentation(
        replace(labelled_config(fewer, copy), model=config.model, batch_size=2, overwrite=True)
    )
    assert result.images == 2
    rows = pq.read_table(copy / "segmentation.parquet").to_pylist()
    masks = sorted(p.stem for p in (copy / "masks").iterdir())
    assert masks == sorted(r["id"] for r in rows) == SAMPLE_IDS[4:6]  # no mask of the old run
    assert not (copy / "overlays").exists(), "the earlier run's overlays went with it"
    assert json.loads((copy / MANIFEST_FILE).read_text())["settings"]["input"] == str(
        fewer / "images"
    )


def test_5_a_root_of_files_lungseg_did_not_make_is_never_written(tmp_path, model_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("a user's file")
    config = labelled_config(copy_sample(tmp_path / "d", SAMPLE_IDS[:1]), out, model=model_path)
    for option in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(UserError, match=r"holds files that lungseg did not make .*notes\.txt"):
            run_segmentation(replace(config, **option))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# 3. ------------------------------------------------------------------ training run folders


def test_3_training_into_a_run_of_other_data_or_shape_is_refused(tmp_path):
    data = copy_sample(tmp_path / "d", SAMPLE_IDS[:6])
    small = RecipeConfig(epochs=1, batch_size=2, model=ModelConfig(64, 4, 2))
    config = TrainConfig(
        data=str(data), output=str(tmp_path / "run"), val_fraction=0.34, recipe=small,
        single_process=True,
    )  # fmt: skip
    first = run_fit(config)
    model = (tmp_path / "run" / "model.keras").read_bytes()
    other_shape = replace(config, recipe=replace(small, model=ModelConfig(64, 8, 2)))
    with pytest.raises(UserError, match=r"other settings.*recipe.*base_filters"):
        run_fit(other_shape)
    fewer = copy_sample(tmp_path / "d2", SAMPLE_IDS[:5])
    with pytest.raises(UserError, match=r"other settings.*data: .*split_sha256"):
        run_fit(replace(config, data=str(fewer)))
    assert (tmp_path / "run" / "model.keras").read_bytes() == model
    # The same run goes on (more epochs); --overwrite starts another.
    assert len(run_fit(replace(config, recipe=replace(small, epochs=2))).history) == 2
    again = run_fit(replace(other_shape, overwrite=True))
    assert len(again.history) == 1 and first.run == again.run
    manifest = json.loads((tmp_path / "run" / MANIFEST_FILE).read_text())
    assert manifest["settings"]["recipe"]["model"]["base_filters"] == 8


# 4. ------------------------------------------------------------------- one job per root


def test_4_a_second_job_on_a_held_root_is_refused_clearly(tmp_path):
    root = str(tmp_path / "out")
    held = {"resume": False, "overwrite": False}
    with (
        outputs.claimed(DEFAULT_STORE, root, SEGMENT, "segment", {}, **held),
        pytest.raises(UserError, match=r"in use by another lungseg job \(segment, pid"),
        outputs.claimed(DEFAULT_STORE, root, SEGMENT, "segment", {}, **held),
    ):
        pass
    assert not (tmp_path / "out" / LOCK_FILE).exists()


def test_4_a_crashed_jobs_lock_lapses(tmp_path, caplog):
    root = tmp_path / "out"
    root.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = {"job": "segment", "host": socket.gethostname(), "pid": dead.pid, "renewed": time.time()}
    (root / LOCK_FILE).write_text(json.dumps(lock))
    with outputs.claimed(
        DEFAULT_STORE, str(root), CLEAN, "clean", {}, resume=False, overwrite=False
    ):
        pass
    assert "taking over" in caplog.text
    # A job on another machine that has not renewed its lock for the lease is gone too.
    lock |= {"host": "elsewhere", "renewed": time.time() - outputs.LEASE_SECONDS - 1}
    (root / LOCK_FILE).write_text(json.dumps(lock))
    with outputs.claimed(
        DEFAULT_STORE, str(root), CLEAN, "clean", {}, resume=True, overwrite=False
    ):
        pass
    lock |= {"renewed": time.time()}
    (root / LOCK_FILE).write_text(json.dumps(lock))
    with (
        pytest.raises(UserError, match="in use by another lungseg job"),
        outputs.claimed(DEFAULT_STORE, str(root), CLEAN, "clean", {}, resume=True, overwrite=False),
    ):
        pass


# 6. ---------------------------------------------------------------------- EXIF orientation


def _with_orientation(jpeg: bytes, orientation: int) -> bytes:
    """``jpeg`` with an APP1 EXIF segment holding only the Orientation tag."""
    entry = struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + entry + b"\x00" * 4
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


@pytest.mark.parametrize(("orientation", "turn"), [(6, -1), (8, 1), (3, 2), (1, 0)])
def test_6_a_jpeg_is_turned_as_its_exif_orientation_says(orientation, turn):
    film = sample_picture()[:, 64:]  # not square: a turn changes the shape
    stored = cv2.imencode(".jpg", np.ascontiguousarray(np.rot90(film, -turn)))[1].tobytes()
    plain = imaging.decode(stored)
    shown = imaging.decode(_with_orientation(stored, orientation))
    np.testing.assert_array_equal(shown, np.rot90(plain, turn))  # upright, as viewers show it
    assert shown.shape == film.shape


# 7. ------------------------------------------------------------------------------- bombs


def _deflated(pixels: np.ndarray, **elements: tuple[int, str, bytes]) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(pixels)))
    for tag, vr, value in elements.values():
        ds.add_new(tag, vr, value)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("tag", "why"),
    [
        (0x00091010, "without Rows and Columns in its first 16 MiB"),  # before the header
        (0x7FE10010, "inflates beyond the"),  # after the pixel data
    ],
)
def test_7_a_deflate_bomb_is_refused_before_it_inflates(tag, why):
    bomb = _deflated(np.zeros((64, 64), np.uint16), bomb=(tag, "OB", bytes(200 << 20)))
    assert len(bomb) < 400_000  # 200 MiB of zeros deflate to a few hundred KB
    tracemalloc.start()
    try:
        with pytest.raises(imaging.ImageDecodeError, match=why):
            imaging.decode(bomb, "bomb.dcm")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB allocated while refusing it"


def test_7_a_deflated_dicom_still_decodes():
    picture = sample_picture()
    np.testing.assert_array_equal(imaging.decode(_deflated(picture)), picture)


def test_7_an_embedded_jpeg_larger_than_the_header_is_refused_undecoded():
    big = cv2.imencode(".jpg", np.zeros((3000, 3000), np.uint8))[1].tobytes()
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros((64, 64), np.uint8))))
    ds.PixelData = encapsulate([big])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PhotometricInterpretation = "MONOCHROME2"
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    with pytest.raises(imaging.ImageDecodeError, match=r"frame is 3000x3000 .* header says 64x64"):
        imaging.decode(buffer.getvalue(), "lie.dcm")


def test_7_a_jpeg_of_too_many_scans_is_refused_at_once():
    progressive = cv2.imencode(".jpg", sample_picture(), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[
        1
    ].tobytes()
    last = progressive.rindex(b"\xff\xda")
    scan = progressive[last:-2]  # the last refinement scan, up to the end-of-image marker
    bomb = progressive[:-2] + scan * 2000 + b"\xff\xd9"
    started = time.perf_counter()
    with pytest.raises(imaging.ImageDecodeError, match=r"JPEG with \d+ scans, more than the limit"):
        imaging.decode(bomb, "scans.jpg")
    assert time.perf_counter() - started < 1.0


# 8. ---------------------------------------------------------------------------- symlinks


@pytest.mark.timeout(30)
def test_8_links_into_loops_or_out_of_the_root_are_skipped_and_named(tmp_path, caplog):
    root = copy_sample(tmp_path / "d", SAMPLE_IDS[:2])
    outside = copy_sample(tmp_path / "elsewhere", SAMPLE_IDS[2:3])
    for name in ("loop1", "loop2"):
        os.symlink(".", root / "images" / name)
    os.symlink(outside / "images", root / "images" / "away")
    os.symlink(outside / "images" / f"{SAMPLE_IDS[2]}.png", root / "images" / "away.png")
    found = catalog.find_cases(str(root))
    assert [c.id for c in found.cases] == SAMPLE_IDS[:2]
    for name, why in [
        ("loop1", "a link to a folder already walked"),
        ("loop2", "a link to a folder already walked"),
        ("away", "a link out of the images root"),
        ("away.png", "a link out of the images root"),
    ]:
        assert f"skipped {root / 'images' / name}: {why}" in caplog.text


def test_8_a_link_inside_the_root_is_followed(tmp_path):
    root = copy_sample(tmp_path / "d", SAMPLE_IDS[:1])
    (root / "more").mkdir()
    shutil.copy(root / "images" / f"{SAMPLE_IDS[0]}.png", root / "more" / "other.png")
    os.symlink(root / "more", root / "images" / "linked")
    assert {c.id for c in catalog.find_cases(str(root)).cases} == {SAMPLE_IDS[0], "other"}


# 9. ------------------------------------------------------------ failures reported as ok


def test_9_implausible_masks_are_named():
    mask = np.zeros((64, 64), np.uint8)
    assert qc.implausible(mask) == ["no lung found"]
    mask[10:50, 6:26] = mask[10:50, 38:58] = 1  # two lungs of 800 pixels: 39% of the film
    assert qc.implausible(mask) == []
    one = mask.copy()
    one[:, 32:] = 0
    assert qc.implausible(one) == ["one lung found: the other is missing"]
    tiny = mask.copy()
    tiny[10:50, 38:58] = 0
    tiny[20:24, 40:44] = 1
    assert qc.implausible(tiny) == ["one lung is 2% of the size of the other"]
    huge = np.ones((64, 64), np.uint8)
    huge[:, 31:33] = 0
    assert qc.implausible(huge) == ["lungs cover 96.9% of the image, not 4%-60%"]


@pytest.mark.usefixtures("local_ray")
@pytest.mark.timeout(300)
def test_9_films_without_plausible_lungs_are_flagged_not_ok(tmp_path):
    images = copy_sample(tmp_path / "d", SAMPLE_IDS[:1], masks=False) / "images"
    cv2.imwrite(str(images / "black.png"), np.zeros((512, 512), np.uint8))
    saturated = sample_picture().astype(np.uint16) * 4  # a 10-bit film in a 16-bit PNG
    saturated[0, 0] = 65535  # one saturated pixel: the stretch flattens the rest to black
    cv2.imwrite(str(images / "saturated.png"), saturated)
    result = run_segmentation(SegmentConfig(input=str(images), output=str(tmp_path / "o")))
    rows = {r["id"]: r for r in pq.read_table(result.table).to_pylist()}
    assert rows[SAMPLE_IDS[0]]["status"] == "ok"
    for case_id in ("black", "saturated"):
        assert rows[case_id]["status"] == "flagged"
        assert rows[case_id]["error"].startswith(("no lung found", "one lung", "lungs cover"))
    assert result.flagged == 2


def test_9_presentation_lut_shape_inverse_is_honoured():
    stored = sample_picture()
    inverse = imaging.decode(dicom_bytes(stored, PresentationLUTShape="INVERSE"))
    monochrome1 = imaging.decode(dicom_bytes(stored, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(inverse, monochrome1)  # both: low values are white
    plain = imaging.normalise(imaging.decode(dicom_bytes(stored)))
    assert np.corrcoef(imaging.normalise(inverse).ravel(), plain.ravel())[0, 1] < -0.99


# 10. --------------------------------------------------------------- endpoints and names


def test_10_control_characters_are_escaped_in_what_is_printed(tmp_path):
    name = str(tmp_path / "no\x1b[2Jsuch")
    done = subprocess.run(
        [sys.executable, "-m", "lungseg", "clean", "--input", name],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == EXIT_USAGE
    assert "\x1b" not in done.stderr + done.stdout
    assert "no\\x1b[2Jsuch" in done.stderr
