"""A ledger of every file a run wrote: each numbered case of the ledger issue, reproduced as a
careful user met it, then the behaviour that replaced it. Real Ray, real models, real files, a
real S3 endpoint, real concurrent processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import cv2
import keras
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lungseg.core.config import (
    BUNDLED_MODEL,
    ConfigError,
    ExportConfig,
    ModelConfig,
    RecipeConfig,
    ResourceConfig,
    SegmentConfig,
    TrainConfig,
)
from lungseg.core.errors import UserError
from lungseg.core.layout import LEDGER_DIR, LOCK_FILE, MANIFEST_FILE, SEGMENT
from lungseg.io import storage
from lungseg.io.storage import DEFAULT_STORE, Store
from lungseg.jobs.export import export_saved_model
from lungseg.jobs.fit import run_fit
from lungseg.jobs.segment import EMPTY_TRUTH, run_segmentation
from lungseg.model.modelfile import describe
from lungseg.model.unet import build_unet, check_segmenter
from lungseg.runs import outputs
from tests.conftest import SAMPLE_IDS, copy_sample, labelled_config, upload_sample
from tests.test_dicom import dicom_bytes, sample_picture

REPO = Path(__file__).resolve().parents[1]
TINY = RecipeConfig(epochs=1, batch_size=2, model=ModelConfig(64, 4, 2))

pytestmark = pytest.mark.timeout(600)


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _rows(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in pq.read_table(out / "segmentation.parquet").to_pylist()}


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A finished single-process training run (a tiny recipe) with the user's own notes."""
    data = copy_sample(tmp_path_factory.mktemp("data"), SAMPLE_IDS[:4])
    run = tmp_path_factory.mktemp("runs") / "run"
    run_fit(TrainConfig(data=str(data), output=str(run), val_fraction=0.25, recipe=TINY))
    (run / "NOTES.md").write_text("my notes on this run")
    return run


@pytest.fixture(scope="module")
def segmented(tmp_path_factory, local_ray, model_path) -> tuple[Path, SegmentConfig]:
    """A finished segment run of 4 sample images, to copy and change."""
    root = copy_sample(tmp_path_factory.mktemp("data"), SAMPLE_IDS[:4])
    out = tmp_path_factory.mktemp("runs") / "out"
    config = labelled_config(root, out, model=model_path, batch_size=2)
    run_segmentation(config)
    return out, config


def _copy(segmented, tmp_path) -> tuple[Path, SegmentConfig]:
    """The segmented run's output root copied: a run of its own to change."""
    out, config = segmented
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    return copy, replace(config, output=str(copy))


# 1. ------------------------------------------- a training run folder is not a segment output


@pytest.mark.usefixtures("local_ray")
def test_1_segment_into_a_training_run_folder_is_refused_and_it_stays_whole(run_folder):
    """Reproduction: ``segment --model RUN/model.keras --output RUN --overwrite`` deleted the
    whole run folder (its notes too), then crashed reading the model it had removed."""
    before = _tree(run_folder)
    model = str(run_folder / "model.keras")
    with pytest.raises(UserError, match=r"overlaps --model .*model\.keras"):
        run_segmentation(SegmentConfig(model=model, output=str(run_folder), overwrite=True))
    with pytest.raises(UserError, match=r"holds a training run folder .*not a segment output"):
        run_segmentation(SegmentConfig(output=str(run_folder), overwrite=True))
    assert _tree(run_folder) == before


def test_1_train_overwrite_keeps_the_users_files_and_refuses_its_own_split_file(
    run_folder, tmp_path
):
    """Reproduction: ``train --overwrite`` deleted a user's file in the run folder and the
    ``--split`` file it had just read (the manifest said a run folder makes ``*``)."""
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    data = json.loads((run / "config.json").read_text())["data"]
    config = TrainConfig(data=data, output=str(run), val_fraction=0.25, recipe=TINY)
    split = run / "split.json"
    ids = sorted(p.stem for p in Path(data, "images").glob("*.png"))
    split.write_text(json.dumps({"train": ids[:3], "val": ids[3:]}))
    with pytest.raises(UserError, match=r"overlaps --split .*split\.json"):
        run_fit(replace(config, split=str(split), overwrite=True))
    assert split.exists()
    split.unlink()
    model = (run / "model.keras").read_bytes()
    seeded = replace(config, recipe=replace(TINY, seed=1), overwrite=True)
    run_fit(seeded)
    assert (run / "NOTES.md").read_text() == "my notes on this run"
    assert (run / "model.keras").read_bytes() != model, "the run was replaced"
    manifest = json.loads((run / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {
        "model.keras", "metrics.csv", "curves.png", "provenance.json", "config.json",
        "data.parquet",
    }  # fmt: skip
    assert manifest["files"]["model.keras"] == storage.fingerprint(
        (run / "model.keras").read_bytes()
    )
    assert sorted(p.name for p in run.iterdir()) == sorted([*manifest["files"], "NOTES.md",
                                                            MANIFEST_FILE])  # fmt: skip


def test_1_overwrite_removes_exactly_the_ledger_and_never_a_file_in_its_places(segmented, tmp_path):
    out, config = _copy(segmented, tmp_path)
    (out / "NOTES.md").write_text("mine")
    (out / "masks" / "corrected-by-hand.png").write_bytes(b"a user's mask")
    with pytest.raises(UserError, match=r"no lungseg run wrote .*masks/corrected-by-hand\.png"):
        run_segmentation(replace(config, overwrite=True))
    with pytest.raises(UserError, match=r"masks/corrected-by-hand\.png"):
        run_segmentation(replace(config, resume=True))
    (out / "masks" / "corrected-by-hand.png").unlink()
    fewer = copy_sample(tmp_path / "fewer", SAMPLE_IDS[5:7])
    run_segmentation(replace(labelled_config(fewer, out), model=config.model, batch_size=2,
                             overwrite=True))  # fmt: skip
    assert (out / "NOTES.md").read_text() == "mine"
    assert sorted(p.stem for p in (out / "masks").iterdir()) == SAMPLE_IDS[5:7]
    assert not (out / LEDGER_DIR).exists() and not (out / LOCK_FILE).exists()


# 2. ----------------------------------------------------------- S3 keys with dot segments


@pytest.mark.usefixtures("local_ray")
@pytest.mark.parametrize("output", ["s3://dots/ds/./", "s3://dots/zz/../ds", "s3://dots/ds//x"])
def test_2_an_s3_output_spelled_with_dots_is_refused_before_any_write(s3, s3_endpoint, output):
    """Reproduction: pyarrow's client collapses ``.`` and ``..`` when it writes, so these
    passed the overlap check and the expert masks in ``ds/masks/`` were overwritten."""
    data = upload_sample(s3, "dots", "ds", SAMPLE_IDS[:2])
    before = {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket="dots")["Contents"]}
    config = labelled_config(data, output, s3_endpoint=s3_endpoint)
    with pytest.raises(storage.StorageError, match=r"without '\.', '\.\.' or empty parts"):
        run_segmentation(config)
    after = {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket="dots")["Contents"]}
    assert after == before


def test_a_jobs_relative_paths_are_its_drivers_wherever_they_are_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = Store.for_job()  # on the driver; a Ray worker unpickles it in another folder
    monkeypatch.chdir(tmp_path.parent)
    assert store.resolve("out/x.png")[1] == str(tmp_path / "out" / "x.png")
    assert store.resolve("./a/../b.png")[1] == str(tmp_path / "b.png")
    assert store.resolve("/elsewhere/c.png")[1] == "/elsewhere/c.png"
    assert store.resolve(f"file://{tmp_path}/d.png")[1] == str(tmp_path / "d.png")
    assert Store().resolve("e.png")[1] == str(tmp_path.parent / "e.png")  # no job: this process's


def test_2_every_s3_uri_a_job_reads_or_writes_is_checked_alike():
    store = Store("http://127.0.0.1:1")
    assert store.resolve("s3://b/ds/")[1] == "b/ds"
    assert store.resolve("s3://b")[1] == "b"
    for uri in ("s3://b/./ds", "s3://b/ds/..", "s3:///ds", "s3://b//ds"):
        with pytest.raises(storage.StorageError, match="plainly"):
            store.resolve(uri)
    with pytest.raises(storage.StorageError):  # --model, --input... go through resolve too
        outputs.check_apart(store, "s3://b/out", {"--model": "s3://b/m/../m.keras"})


# 3. ------------------------------------------------------------- resume keyed by content


def test_3_resume_redoes_a_replaced_film_a_cut_mask_and_scores_a_new_ground_truth(
    tmp_path, local_ray, model_path
):
    """Reproduction: ``--resume`` kept a film replaced under the same name with its old mask
    and Dice as ``ok``, kept a mask PNG truncated to 10 bytes as ``ok``, and left a row
    ``flagged: no ground-truth mask found`` after the mask was added."""
    data = copy_sample(tmp_path / "data", SAMPLE_IDS[:4])
    out = tmp_path / "out"
    config = labelled_config(data, out, model=model_path, batch_size=2)
    run_segmentation(config)
    replaced, cut, late = SAMPLE_IDS[0], SAMPLE_IDS[1], SAMPLE_IDS[2]
    shutil.copy(REPO / "lungseg/sample/images" / f"{SAMPLE_IDS[9]}.png",
                data / "images" / f"{replaced}.png")  # fmt: skip
    with open(out / "masks" / f"{cut}.png", "r+b") as f:
        f.truncate(10)
    # The late mask: the run first had none for it, then the user adds it.
    os.rename(data / "masks" / f"{late}.png", tmp_path / "late.png")
    first = replace(config, output=str(tmp_path / "again"))
    run_segmentation(first)
    assert _rows(tmp_path / "again")[late]["error"].startswith("no ground-truth mask found")
    os.rename(tmp_path / "late.png", data / "masks" / f"{late}.png")
    os.utime(data / "images" / f"{SAMPLE_IDS[3]}.png")  # touched, the same bytes: kept

    result = run_segmentation(replace(first, resume=True))
    rows = _rows(tmp_path / "again")
    assert result.resumed == 3  # only the one whose mask came is done again
    assert rows[late]["status"] == "ok" and rows[late]["dice"] > 0.9

    result = run_segmentation(replace(config, resume=True))
    assert result.resumed == 2  # the replaced film and the cut mask are done again
    rows = _rows(out)
    fresh = tmp_path / "fresh"
    run_segmentation(replace(config, output=str(fresh)))
    for case_id, row in _rows(fresh).items():
        for column in ("dice", "status", "source_fingerprint", "mask_fingerprint"):
            assert rows[case_id][column] == row[column], (case_id, column)
        assert (out / row["mask"]).read_bytes() == (fresh / row["mask"]).read_bytes()
    assert cv2.imread(str(out / "masks" / f"{cut}.png")) is not None


# 4. -------------------------------------------------------------------- an atomic claim


def _claimer(root: str, endpoint: str | None, trials: int, barrier, results) -> None:
    """One of several processes that claim the same new root, ``trials`` times, at once."""
    store = Store(endpoint)
    for trial in range(trials):
        barrier.wait()
        try:
            with outputs.claimed(store, f"{root}/t{trial}", SEGMENT, "segment", {},
                                 resume=False, overwrite=False):  # fmt: skip
                results.put((trial, "won"))
                barrier.wait()  # every other process has tried while this one holds it
        except UserError as exc:
            results.put((trial, str(exc)))
            barrier.wait()


def _contest(root: str, endpoint: str | None, processes: int, trials: int) -> dict[int, list]:
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(target=_claimer, args=(root, endpoint, trials, barrier, results))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    outcomes: dict[int, list] = {}
    for _ in range(processes * trials):
        trial, outcome = results.get(timeout=120)
        outcomes.setdefault(trial, []).append(outcome)
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    return outcomes


@pytest.mark.parametrize("where", ["local", "s3"])
def test_4_of_jobs_claiming_a_new_root_at_once_exactly_one_wins(where, tmp_path, request):
    """Reproduction: two jobs claiming a new root at the same moment both won in 3 of 40
    trials (the lock was read, written, then read back). Now the lock is created atomically:
    a hard link locally, a conditional write (``If-None-Match: *``) on S3."""
    if where == "s3":
        s3, endpoint = request.getfixturevalue("s3"), request.getfixturevalue("s3_endpoint")
        s3.create_bucket(Bucket="claims")
        root, trials = "s3://claims/race", 20
    else:
        root, endpoint, trials = str(tmp_path), None, 40
    outcomes = _contest(root, endpoint, 4, trials)
    for trial, results in sorted(outcomes.items()):
        assert results.count("won") == 1, (trial, results)
        for lost in results:
            assert (
                lost == "won"
                or "in use by another lungseg job" in lost
                or ("claimed by another lungseg job at the same moment" in lost)
            )


def test_4_a_lapsed_lock_is_taken_over_by_one_job(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    lock = {"job": "segment", "host": "elsewhere", "pid": 1, "token": "old", "renewed": 0}
    (root / LOCK_FILE).write_text(json.dumps(lock))
    held = {"resume": False, "overwrite": False}
    with outputs.claimed(DEFAULT_STORE, str(root), SEGMENT, "segment", {}, **held):
        assert json.loads((root / LOCK_FILE).read_text())["token"] != "old"
        assert not list(root.glob(f"{LOCK_FILE}.takeover-*"))
    assert not (root / LOCK_FILE).exists()


@pytest.mark.parametrize("planned", [12, 1500])  # a few stale keys looked up; many: listed
def test_4_a_finishing_run_removes_what_it_planned_and_no_row_names_and_nothing_else(
    tmp_path, planned
):
    """A run killed half way wrote files that its rows never name; the run that finishes
    removes those, keeps what its rows name, and leaves the user's files alone."""
    root = tmp_path / "out"
    root.mkdir()
    keys = [f"masks/x{i:05d}.png" for i in range(planned)]
    held = {"resume": False, "overwrite": False}
    with outputs.claimed(DEFAULT_STORE, str(root), SEGMENT, "segment", {}, **held) as claim:
        claim.plan(keys)
        (root / "masks").mkdir()
        for key in keys[::2]:  # the attempt wrote half of what it planned
            (root / key).write_bytes(b"png")
        named = keys[::4]  # and its rows name half of those
        pq.write_table(pa.table({"mask": named}), root / SEGMENT.table)
        claim.record(SEGMENT.table)
        (root / "notes.txt").write_text("the user's")
        claim.finish()
    left = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert left == {*named, SEGMENT.table, MANIFEST_FILE, "notes.txt"}
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    assert manifest["state"] == "complete" and SEGMENT.table in manifest["files"]


# 5. ------------------------------------------------------------- ground truth as stored


@pytest.mark.usefixtures("local_ray")
def test_5_ground_truth_in_any_encoding_scores_alike_and_an_empty_one_is_flagged(
    tmp_path, model_path
):
    """Reproduction: ground truth stored as 0/1, as lungseg's own 0/1/2 labels, as 16-bit
    0/255 or in colour read as an empty mask: Dice 0.0000, status ok, exit 0."""
    film = REPO / "lungseg/sample/images" / f"{SAMPLE_IDS[0]}.png"
    truth = cv2.imread(str(REPO / "lungseg/sample/masks" / f"{SAMPLE_IDS[0]}.png"), 0) > 0
    labels = truth.astype(np.uint8)
    labels[:, 256:] *= 2
    colour = np.zeros((*truth.shape, 3), np.uint8)
    colour[truth] = (40, 200, 90)
    encodings = {
        "as-0-255": truth.astype(np.uint8) * 255,
        "as-0-1": truth.astype(np.uint8),
        "as-labels": labels,
        "as-16-bit": truth.astype(np.uint16) * 255,
        "as-colour": colour,
        "empty": np.zeros(truth.shape, np.uint8),
    }
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    for name, mask in encodings.items():
        shutil.copy(film, tmp_path / "images" / f"{name}.png")
        cv2.imwrite(str(tmp_path / "masks" / f"{name}.png"), mask)
    run_segmentation(labelled_config(tmp_path, tmp_path / "out", model=model_path))
    rows = _rows(tmp_path / "out")
    assert rows["as-0-255"]["dice"] > 0.9
    for name in ("as-0-1", "as-labels", "as-16-bit", "as-colour"):
        assert rows[name]["dice"] == rows["as-0-255"]["dice"], name
        assert rows[name]["status"] == "ok"
    assert rows["empty"]["status"] == "flagged" and rows["empty"]["error"] == EMPTY_TRUTH
    assert rows["empty"]["dice"] is None and rows["empty"]["tp"] is None


# 6. ------------------------------------------------------------------ checks come first


def _broken_model(tmp_path: Path) -> Path:
    """The bundled model's file with its weights replaced by junk: its config reads, Keras
    cannot load it."""
    path = tmp_path / "broken.keras"
    with zipfile.ZipFile(BUNDLED_MODEL) as source, zipfile.ZipFile(path, "w") as target:
        for entry in source.infolist():
            data = source.read(entry)
            target.writestr(entry, b"junk" if entry.filename.endswith(".h5") else data)
    return path


def test_6_a_model_keras_cannot_load_is_refused_in_one_line_before_any_write(tmp_path):
    """Reproduction: it passed the check and died in the actor with 300 lines of traceback.
    (Ray starts while the model is checked: the verdict comes before the output is claimed.)"""
    broken = _broken_model(tmp_path)
    assert describe(broken.read_bytes()).size == 256  # what the old check looked at
    done = subprocess.run(
        [sys.executable, "-m", "lungseg", "segment", "--model", str(broken),
         "--output", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, "RAY_ADDRESS": "local"},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    error = done.stderr.strip().splitlines()
    assert len(error) == 1 and "Keras cannot load it" in error[0], done.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("local_ray")
def test_6_resources_that_cannot_fit_are_refused_before_the_claim(tmp_path):
    """Reproduction: ``--actor-cpus 5`` on 2 CPUs hung with no output; ``--actor-cpus inf``
    crashed after the claim and left the root ``running``."""
    with pytest.raises(ConfigError, match="--actor-cpus must be a number > 0, got inf"):
        ResourceConfig(actor_cpus=float("inf"))
    out = tmp_path / "out"
    for resources, why in [
        (ResourceConfig(actor_cpus=5), r"asks for 5 CPUs per task, more than the largest node"),
        (ResourceConfig(preprocess_actors=6), r"the pools need .* more than this Ray cluster"),
    ]:
        with pytest.raises(UserError, match=why):
            run_segmentation(SegmentConfig(output=str(out), resources=resources))
        assert not out.exists()


# 7. ---------------------------------------------------------- export into a folder in use


def test_7_export_never_replaces_another_models_savedmodel_unasked(tmp_path):
    """Reproduction: ``export --output DIR`` silently replaced another model's
    ``saved_model.pb`` in DIR."""
    first, second = tmp_path / "a.keras", tmp_path / "b.keras"
    build_unet(64, 4, 2).save(first)
    build_unet(64, 2, 2).save(second)
    out = tmp_path / "served"
    export_saved_model(ExportConfig(output=str(out), model=str(first)))
    exported = (out / "saved_model.pb").read_bytes()
    with pytest.raises(UserError, match="holds the outputs of an earlier run"):
        export_saved_model(ExportConfig(output=str(out), model=str(second)))
    assert (out / "saved_model.pb").read_bytes() == exported
    export_saved_model(ExportConfig(output=str(out), model=str(second), overwrite=True))
    assert (out / "saved_model.pb").read_bytes() != exported
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["settings"]["model_sha256"] == describe(second.read_bytes()).sha256
    assert "saved_model.pb" in manifest["files"]
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "saved_model.pb").write_bytes(b"someone's model")
    with pytest.raises(UserError, match="holds files that lungseg did not make"):
        export_saved_model(ExportConfig(output=str(theirs), model=str(first), overwrite=True))
    with pytest.raises(UserError, match="overlaps --model"):
        export_saved_model(ExportConfig(output=str(tmp_path), model=str(first)))


# 8. --------------------------------------------------------------- a PACS export's names


@pytest.mark.usefixtures("local_ray")
def test_8_a_pacs_export_with_repeated_names_segments_every_film(tmp_path, model_path):
    """Reproduction: ``DICOM/PAT1/SER1/IM000001`` and ``DICOM/PAT2/SER1/IM000001`` were refused
    ("image ids must be unique"); a FIFO named ``x.png`` was skipped without a word."""
    for patient in ("PAT1", "PAT2"):
        path = tmp_path / "in" / "DICOM" / patient / "SER1" / "IM000001"
        path.parent.mkdir(parents=True)
        path.write_bytes(dicom_bytes(sample_picture(), Modality="DX"))
    os.mkfifo(tmp_path / "in" / "x.png")
    config = SegmentConfig(model=model_path, input=str(tmp_path / "in"),
                           output=str(tmp_path / "out"))  # fmt: skip
    result = run_segmentation(config)
    rows = _rows(tmp_path / "out")
    assert sorted(rows) == ["DICOM/PAT1/SER1/IM000001", "DICOM/PAT2/SER1/IM000001"]
    assert result.images == 2 and all(r["status"] == "ok" for r in rows.values())
    masks = {r["mask"] for r in rows.values()}
    assert len(masks) == 2 and all((tmp_path / "out" / m).is_file() for m in masks)


# 9. ------------------------------------------------------- models segment cannot use


def _model(inputs, outputs) -> keras.Model:
    return keras.Model(inputs, outputs)


def test_9_models_of_two_channels_logits_or_no_fixed_size_are_refused_in_one_line(tmp_path):
    """Reproduction: a model of two output channels, or of logits, was accepted (channel 0
    taken, logits wrapped around in uint8, exit 0); a ``(None, None, 1)`` input crashed."""
    x = keras.Input((32, 32, 1))
    two = _model(x, keras.layers.Conv2D(2, 1, activation="sigmoid")(x))
    with pytest.raises(UserError, match=r"one \(batch, 32, 32, 1\) map .* gives \[\(None, 32"):
        check_segmenter(two, 32, "two.keras")
    logits = _model(x, keras.layers.Conv2D(1, 1)(x))
    with pytest.raises(UserError, match=r"activation is 'linear', not a sigmoid"):
        check_segmenter(logits, 32, "logits.keras")
    hidden = _model(x, keras.layers.Lambda(lambda t: t * 3.0)(x))  # no activation to read
    with pytest.raises(UserError, match=r"values from 0 to 765: .* not logits"):
        check_segmenter(hidden, 32, "scaled.keras")
    check_segmenter(_model(x, keras.layers.Conv2D(1, 1, activation="sigmoid")(x)), 32)
    free = keras.Input((None, None, 1))
    path = tmp_path / "free.keras"
    _model(free, keras.layers.Conv2D(1, 1, activation="sigmoid")(free)).save(path)
    with pytest.raises(UserError, match=r"no fixed size \(None, None, 1\)"):
        describe(path.read_bytes(), "free.keras")


@pytest.mark.usefixtures("local_ray")
def test_9_a_logits_model_is_refused_before_any_write(tmp_path):
    x = keras.Input((64, 64, 1))
    path = tmp_path / "logits.keras"
    _model(x, keras.layers.Conv2D(1, 1)(x)).save(path)
    with pytest.raises(UserError, match="not a sigmoid"):
        run_segmentation(SegmentConfig(model=str(path), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_the_ledger_files_of_a_run_are_those_on_disk(segmented):
    """The ledger of a finished run names every file under its root but lungseg's own."""
    out, _ = segmented
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    known = outputs.ledger(DEFAULT_STORE, str(out), manifest, SEGMENT)
    on_disk = {k for k in _tree(out) if k != MANIFEST_FILE}
    assert on_disk == {k for k in known.files}
    for key, fingerprint in known.files.items():
        assert storage.fingerprint((out / key).read_bytes()) == fingerprint, key
