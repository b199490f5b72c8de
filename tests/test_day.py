"""A user's day with lungseg (issue 27): each rough edge reproduced, then what replaced it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lungseg.cli import EXIT_IMAGES_FAILED, EXIT_OK, EXIT_USAGE, main
from lungseg.core.layout import MANIFEST_FILE
from lungseg.io.storage import StorageError, Store
from lungseg.model.modelfile import describe
from lungseg.runs.outputs import differences
from tests.conftest import SAMPLE_IDS, copy_sample, upload_sample

pytestmark = [
    pytest.mark.usefixtures("local_ray"),
    pytest.mark.timeout(900),
]  # two Ray Train runs, shared cores

REPO = Path(__file__).resolve().parents[1]
LOCAL = {**os.environ, "RAY_ADDRESS": "local"}
# A driver that reports which heavy modules it imported before its job ended.
IMPORTED = (
    "import sys; from lungseg.cli import main; status = main(sys.argv[1:]); "
    "print('imported:', sorted(m for m in ('ray', 'tensorflow') if m in sys.modules)); "
    "sys.exit(status)"
)


def _imported(*argv: str, env: dict[str, str] = LOCAL) -> subprocess.CompletedProcess:
    """``lungseg ARGV`` in a driver of its own that prints which heavy modules it imported."""
    command = [sys.executable, "-c", IMPORTED, *argv]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120, env=env)


# 3 and 8. ---------------------------------------------- a model trained here, and resumed


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A tiny run trained for 1 epoch through the CLI: (its data, the run folder, its argv)."""
    root = tmp_path_factory.mktemp("day")
    data = copy_sample(root / "data", SAMPLE_IDS[:6])
    argv = ["train", "--data", str(data), "--output", str(root / "run"), "--workers", "1",
            "--val-fraction", "0.34", "--batch-size", "2", "--size", "64", "--base-filters", "4",
            "--depth", "2", "--no-augment"]  # fmt: skip
    assert main([*argv, "--epochs", "1"]) == EXIT_OK
    return data, root / "run", argv


def test_8_a_resumed_training_says_where_it_went_on_and_counts_its_own_epochs(trained, capfd):
    _, run, argv = trained
    capfd.readouterr()
    assert main([*argv, "--epochs", "2"]) == EXIT_OK
    out = capfd.readouterr().out
    checkpoint = next(line for line in out.splitlines() if line.startswith("resume:"))
    assert checkpoint.startswith("resume: going on from the checkpoint of epoch 1 (checkpoints/")
    name = checkpoint.rsplit("/", 1)[1].rstrip(")")
    assert (run / "checkpoints" / name).is_dir()
    # Was "trained 2 epochs": this run trained the second alone.
    assert "trained epoch 2 of 2 (done) in " in out
    # One read of both splits: the line shows no rate made of Ray's start-up.
    assert "read: 6/6 images, 0 errors" in out.splitlines()
    manifest = json.loads((run / MANIFEST_FILE).read_text())
    assert (manifest["epochs"], manifest["exit_status"], manifest["failed_ids"]) == (2, 0, [])


def test_8_a_refused_training_names_the_differing_recipe_fields(trained, capfd):
    _, _, argv = trained
    capfd.readouterr()
    assert main([*argv, "--epochs", "2", "--batch-size", "4"]) == EXIT_USAGE
    err = capfd.readouterr().err
    assert "recipe.batch_size: 2 -> 4 (earlier -> now)" in err
    assert "{" not in err  # was: two whole recipe dicts


def test_8_differences_descend_into_nested_settings():
    before = {"data": "d", "recipe": {"batch_size": 4, "model": {"depth": 2, "size": 64}}}
    now = {"data": "d", "recipe": {"batch_size": 8, "model": {"depth": 3, "size": 64}}}
    assert differences(before, now) == ["recipe.batch_size: 4 -> 8", "recipe.model.depth: 2 -> 3"]
    assert differences({"a": {"b": 1}}, {"a": None}) == ["a: {'b': 1} -> None"]


def test_3_a_model_trained_here_without_a_calibration_is_said_so(trained, tmp_path, capfd):
    data, run, _ = trained
    model = describe((run / "model.keras").read_bytes())
    why = "the model drew fewer than 8 plausible lungs on its 3 training films"
    assert (model.calibration, model.calibration_missing) == (None, why)
    out = tmp_path / "seg"
    argv = ["--model", str(run / "model.keras"), "--input", str(data / "images"),
            "--masks", str(data / "masks"), "--output", str(out), "--batch-size", "2"]  # fmt: skip
    capfd.readouterr()
    assert main(["segment", *argv]) in (EXIT_OK, EXIT_IMAGES_FAILED)
    said = capfd.readouterr().out
    # Was: "has no quality-control calibration (not trained by this lungseg)".
    assert f"its calibration could not be measured ({why})" in said
    assert "not trained by" not in said
    settings = json.loads((out / MANIFEST_FILE).read_text())["settings"]
    assert settings["qc_calibration_borrowed"] == (
        f"the bundled model's: its calibration could not be measured ({why})"
    )
    # The report page says so too (it said nothing of it).
    assert main(["report", str(out)]) == EXIT_OK
    page = (out / "report.html").read_text()
    assert "<dt>quality-control calibration</dt>" in page
    assert f"could not be measured ({why})" in page


# 5, 6 and 7. ------------------------------------- a local job, one image of which is corrupt


def test_5_6_7_a_job_with_a_corrupt_image_names_it_and_leaves_a_status(tmp_path, model_path):
    root = copy_sample(tmp_path / "d", SAMPLE_IDS[:2], masks=False)
    (root / "images" / "corrupt.png").write_bytes(b"not a PNG")
    out = tmp_path / "o"
    done = subprocess.run(
        [
            sys.executable,
            "jobs/segment.py",
            "--model",
            model_path,
            "--input",
            str(root / "images"),
            "--output",
            str(out),
            "--batch-size",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env=LOCAL,
    )
    assert done.returncode == EXIT_IMAGES_FAILED, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    # 6: the first seconds say what is happening, in order.
    said = [line.split(" ")[0] for line in lines]
    assert said.index("checking") < said.index("catalog:") < said.index("starting")
    assert f"checking model {model_path}" in lines and "starting Ray" in lines
    # 7: the failed image named; no "mean Dice n/a" without ground truth; quality control
    # out of the 2 masks made, not the 3 images.
    assert "segmented 3 images (0 flagged, 1 failed: corrupt)" in lines
    review = pq.read_table(out / "segmentation.parquet").column("qc").to_pylist().count("review")
    assert f"quality control: {review} of 2 masks to review (qc column)" in lines
    assert "Dice" not in done.stdout
    # 5: what a pipeline reads whatever Ray's job status says.
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["state"] == "complete" and manifest["finished"]
    counts = {k: manifest[k] for k in ("exit_status", "images", "ok", "flagged", "failed")}
    assert counts == {"exit_status": 3, "images": 3, "ok": 2, "flagged": 0, "failed": 1}
    assert (manifest["resumed"], manifest["review"], manifest["failed_ids"]) == (
        0, review, ["corrupt"],
    )  # fmt: skip


def test_7_many_failed_images_name_a_few_and_say_where_the_rest_are():
    from lungseg.cli import _outcome

    assert _outcome(1, ["a", "b"], "table") == "1 flagged, 2 failed: a, b"
    many = [f"x{i}" for i in range(7)]
    assert _outcome(0, many, "table and lungseg.json") == (
        "0 flagged, 7 failed: x0, x1, x2, x3, x4, ...; every failed id is in the table and "
        "lungseg.json"
    )


def test_6_a_mistyped_input_is_one_line_before_ray_or_tensorflow(tmp_path):
    done = _imported("segment", "--input", str(tmp_path / "nonexistent"), "--output",
                     str(tmp_path / "x"))  # fmt: skip
    assert done.returncode == EXIT_USAGE
    assert done.stderr == (
        f"lungseg segment: error: images root not found: {tmp_path / 'nonexistent'}\n"
    )
    assert done.stdout == "imported: []\n"  # was: Ray started, then TensorFlow, then this
    assert not (tmp_path / "x").exists()


# 4. ----------------------------------------------------------------- S3 without credentials


def _without_credentials(home: Path) -> dict[str, str]:
    env = {k: v for k, v in LOCAL.items() if not k.startswith("AWS_")}
    return env | {
        "HOME": str(home),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-credentials"),
        "AWS_CONFIG_FILE": str(home / "no-config"),
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance here: do not wait for its service
    }


def test_4_an_s3_job_without_credentials_says_so_and_writes_nothing(s3, s3_endpoint, tmp_path):
    data = upload_sample(s3, "day-in", "x", SAMPLE_IDS[:1])
    s3.create_bucket(Bucket="day-out")
    argv = ["segment", "--input", f"{data}/images", "--output", "s3://day-out/r1"]
    done = _imported(*argv, "--s3-endpoint", s3_endpoint, env=_without_credentials(tmp_path))
    assert done.returncode == EXIT_USAGE, done.stderr
    # Was: "claimed by another lungseg job at the same moment", and a lock left behind.
    shared = tmp_path / "no-credentials"
    assert done.stderr == (
        "lungseg segment: error: s3://day-out/r1: no S3 credentials found, and writing needs "
        "them: lungseg looked where boto3 looks: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in "
        f"the environment, profile 'default' in {shared} (AWS_SHARED_CREDENTIALS_FILE) and "
        f"{tmp_path / 'no-config'} (AWS_CONFIG_FILE), AWS_WEB_IDENTITY_TOKEN_FILE, the "
        "container's credentials endpoint and instance metadata (off: AWS_EC2_METADATA_DISABLED)\n"
    )
    assert done.stdout == "imported: []\n"
    assert s3.list_objects_v2(Bucket="day-out").get("Contents", []) == []


def test_4_the_claim_checks_credentials_before_writing_a_lock(s3, s3_endpoint, tmp_path):
    s3.create_bucket(Bucket="day-lock")
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(_without_credentials(tmp_path))
        with pytest.raises(StorageError, match=r"s3://day-lock/r: no S3 credentials found"):
            Store(s3_endpoint).check_writable("s3://day-lock/r")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert s3.list_objects_v2(Bucket="day-lock").get("Contents", []) == []


# 1 and 2. ------------------------------------------- a resumed segment, then the README's report


def test_1_2_a_resumed_segment_counts_its_reviews_once_and_the_report_follows(
    tmp_path, monkeypatch, capfd
):
    """The README's order: segment into the default ``out/segment``, resume it, then
    ``lungseg report out/segment``. The resume once said ``32 of 16 masks to review`` (kept
    rows counted twice), and the report after the quick start exited 2. The module's Ray was
    started in another folder, as by ``ray start`` elsewhere: its workers once read and wrote
    the relative paths there, the masks away from their table."""
    copy_sample(tmp_path / "data", SAMPLE_IDS[:3])
    monkeypatch.chdir(tmp_path)
    assert main(["segment", "--input", "data"]) == EXIT_OK
    masks = sorted(p.name for p in (tmp_path / "out" / "segment" / "masks").iterdir())
    assert masks == [f"{case_id}.png" for case_id in SAMPLE_IDS[:3]]
    capfd.readouterr()
    assert main(["segment", "--input", "data", "--resume"]) == EXIT_OK
    said = capfd.readouterr().out
    assert "resume: 3 images done by an earlier run, 0 to segment" in said
    review = pq.read_table("out/segment/segmentation.parquet")["qc"].to_pylist().count("review")
    assert f"quality control: {review} of 3 masks to review (qc column)" in said
    assert main(["report", "out/segment"]) == EXIT_OK
    assert (tmp_path / "out" / "segment" / "report.html").stat().st_size > 0
