"""The thin jobs/*.py entry points and the lungseg console script share one parser."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lungseg.cli import build_parser

REPO = Path(__file__).resolve().parents[1]


def _help(*command: str) -> str:
    done = subprocess.run(
        [*command, "--help"], capture_output=True, text=True, check=True, cwd=REPO
    )
    return done.stdout


@pytest.mark.parametrize("job", ["train", "segment", "evaluate", "export", "clean"])
def test_job_help_is_the_cli_help(job):
    job_help = _help(sys.executable, f"jobs/{job}.py")
    assert job_help == _help(sys.executable, "-m", "lungseg.cli", job)
    subparser = build_parser()._subparsers._group_actions[0].choices[job]
    for action in subparser._actions:
        assert action.help, f"{job} {action.option_strings} has no help text"
        for flag in action.option_strings:
            assert flag in job_help


@pytest.mark.timeout(300)
def test_segment_job_runs_on_bundled_sample(tmp_path, model_path):
    done = subprocess.run(
        [sys.executable, "jobs/segment.py", "--model", model_path, "--output", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=280,
        env={**os.environ, "RAY_ADDRESS": "local"},  # its own Ray, not a cluster found running
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "segmented 16 images (0 flagged, 0 failed)" in done.stdout
    assert pq.read_table(tmp_path / "o" / "segmentation.parquet").num_rows == 16


def test_clean_defaults_to_the_packaged_sample():
    from lungseg.cli import _config
    from lungseg.config import SAMPLE, CleanConfig

    config = _config(build_parser().parse_args(["clean"]))
    assert config == CleanConfig(input=f"{SAMPLE}/images")


@pytest.mark.timeout(200)
def test_clean_job_exits_1_when_an_image_fails(tmp_path):
    from tests.conftest import SAMPLE_IDS, copy_sample

    root = copy_sample(tmp_path / "data", SAMPLE_IDS[:2], masks=False)
    (root / "images" / "broken.png").write_bytes(b"not a PNG")
    done = subprocess.run(
        [sys.executable, "jobs/clean.py", "--input", str(root), "--output", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=180,
        env={**os.environ, "RAY_ADDRESS": "local"},  # its own Ray, not a cluster found running
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "cleaned 3 images (0 flagged, 1 failed)" in done.stdout
    assert pq.read_table(tmp_path / "o" / "cleaning.parquet").num_rows == 3


@pytest.mark.parametrize("job", ["segment", "train", "clean", "report", "export"])
def test_s3_endpoint_with_credentials_is_refused_without_echoing_them(job, capsys):
    argv = [job, "--s3-endpoint", "http://AKIAKEY:top-secret@minio:9000"]
    if job == "export":
        argv += ["--output", "out"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert "must not hold credentials" in err
    assert "top-secret" not in err and "AKIAKEY" not in err
