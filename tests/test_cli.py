"""The thin jobs/*.py entry points and the lungseg console script share one parser."""

from __future__ import annotations

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


@pytest.mark.parametrize("job", ["train", "segment"])
def test_job_help_is_the_cli_help(job):
    job_help = _help(sys.executable, f"jobs/{job}.py")
    assert job_help == _help(sys.executable, "-m", "lungseg.cli", job)
    subparser = build_parser()._subparsers._group_actions[0].choices[job]
    for action in subparser._actions:
        assert action.help, f"{job} {action.option_strings} has no help text"
        for flag in action.option_strings:
            assert flag in job_help


@pytest.mark.timeout(300)
def test_segment_job_runs_on_bundled_sample(tmp_path):
    from lungseg.model import build_unet

    model = tmp_path / "model.keras"
    build_unet(size=64, base_filters=4, depth=2).save(model)
    done = subprocess.run(
        [sys.executable, "jobs/segment.py", "--model", str(model), "--output", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "segmented 16 images (0 failed)" in done.stdout
    assert pq.read_table(tmp_path / "o" / "segmentation.parquet").num_rows == 16
