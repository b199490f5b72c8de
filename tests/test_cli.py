"""The console script: one parser for lungseg and jobs/*.py, defaults from the config
dataclasses, a user's mistake in one line with exit status 2, documented exit statuses."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lungseg.cli import (
    EXIT_IMAGES_FAILED,
    EXIT_USAGE,
    _config,
    _quality_line,
    build_parser,
    main,
)
from lungseg.console import ConsoleProgress
from lungseg.core.config import (
    BenchmarkConfig,
    CleanConfig,
    EvaluateConfig,
    ExportConfig,
    ModelConfig,
    ReportConfig,
    ResourceConfig,
    SegmentConfig,
    TrainConfig,
)
from tests.conftest import SAMPLE_IDS, copy_sample

REPO = Path(__file__).resolve().parents[1]
LOCAL = {**os.environ, "RAY_ADDRESS": "local"}  # its own Ray, not a cluster found running


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


@pytest.mark.parametrize(
    ("job", "default"),
    [
        (["train"], TrainConfig()),
        (["segment"], SegmentConfig()),
        (["evaluate"], EvaluateConfig()),
        (["export", "--output", "x"], ExportConfig(output="x")),
        (["clean"], CleanConfig()),
        (["report"], ReportConfig()),
        (["benchmark"], BenchmarkConfig()),
    ],
)
def test_cli_defaults_are_the_config_dataclasses_defaults(job, default):
    assert _config(build_parser().parse_args(job)) == default


def test_every_config_field_is_an_option_and_reaches_the_config():
    """The CLI is built from the configs: a value given for each option comes back in its
    field, nested ones too."""
    config = _config(
        build_parser().parse_args(
            ["train", "--no-augment", "--size", "128", "--depth", "3", "--device", "gpu",
             "--epochs", "3", "--actor-cpus", "0.5", "--split", "s.json", "--single-process"]
        )
    )  # fmt: skip
    assert not config.recipe.augment and config.recipe.epochs == 3 and config.single_process
    assert config.recipe.model == ModelConfig(128, 16, 3) and config.split == "s.json"
    assert config.resources == ResourceConfig(actor_cpus=0.5, device="gpu")
    bench = _config(build_parser().parse_args(["benchmark", "--stages", "memory,training",
                                               "--memory-images", "5,10"]))  # fmt: skip
    assert (bench.stages, bench.memory_images) == (("memory", "training"), (5, 10))
    assert _config(build_parser().parse_args(["report", "out/x", "--run", "r"])) == ReportConfig(
        output="out/x", run="r"
    )
    evaluate = _config(build_parser().parse_args(["evaluate", "--split", "s", "--subset", "t"]))
    assert (evaluate.split, evaluate.subset, evaluate.output) == ("s", "t", "out/evaluate")


def test_help_says_each_default_once_and_no_default_for_a_flag():
    text = _help(sys.executable, "-m", "lungseg", "train")
    assert "(default: True)" not in text and "(default: False)" not in text
    segment = _help(sys.executable, "-m", "lungseg", "segment")
    options = segment[segment.index("options:") :]
    model = options[options.index("--model MODEL") : options.index("--input INPUT")]
    assert model.count("default") == 1


def _run(*argv: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lungseg", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env=LOCAL,
    )


def _one_line_error(done: subprocess.CompletedProcess, job: str, *expected: str) -> None:
    """Exit status 2 and, on stderr, the one line ``lungseg <job>: error: ...``."""
    assert done.returncode == EXIT_USAGE, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"lungseg {job}: error: ")
    for text in expected:
        assert text in lines[0]
    assert "Traceback" not in done.stderr + done.stdout


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["segment", "--input", "no/such/folder"], ["images root not found: no/such/folder"]),
        (["clean", "--input", "no/such/folder"], ["images root not found: no/such/folder"]),
        (["train", "--data", "no/such/folder"], ["images root not found: no/such/folder"]),
        (["train", "--epochs", "0"], ["--epochs must be at least 1, got 0"]),
        (["train", "--batch-size", "3"], ["--batch-size 3 must split evenly among the 2 workers"]),
        (["segment", "--threshold", "1.5"], ["--threshold must be in (0, 1), got 1.5"]),
        (["segment", "--model", "no/such.keras"], ["no/such.keras"]),
        (["clean", "--blur-kernel", "4"], ["--blur-kernel must be odd"]),
        (["segment", "--no-such-option"], ["unrecognized arguments: --no-such-option"]),
        (["train", "--epochs", "many"], ["argument --epochs: invalid int value: 'many'"]),
        (["report", "no/such/output"], ["no/such/output holds no lungseg output"]),
        (["evaluate", "--split", "no/such/split.json"], ["no/such/split.json"]),
    ],
)
def test_a_user_mistake_is_one_line_and_status_2(argv, expected):
    _one_line_error(_run(*argv), argv[0], *expected)
    assert not (REPO / "no").exists(), "a refused job made a folder"


@pytest.mark.timeout(120)
def test_an_unknown_bucket_is_one_line_and_status_2(s3_endpoint):
    done = subprocess.run(
        [sys.executable, "-m", "lungseg", "segment", "--input", "s3://no-such-bucket/x"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=110,
        env={**LOCAL, "AWS_ENDPOINT_URL": s3_endpoint},
    )
    _one_line_error(done, "segment", "s3://no-such-bucket/x: the bucket does not exist")


@pytest.mark.parametrize("job", ["segment", "train", "clean", "report", "export"])
@pytest.mark.parametrize(
    "endpoint", ["http://AKIAKEY:top-secret@minio:9000", "AKIAKEY:top-secret@minio:9000"]
)
def test_s3_endpoint_with_credentials_is_refused_without_echoing_them(job, endpoint, capsys):
    argv = [job, "--s3-endpoint", endpoint]
    if job == "export":
        argv += ["--output", "out"]
    assert main(argv) == EXIT_USAGE
    captured = capsys.readouterr()
    assert "must not hold credentials" in captured.err
    assert "top-secret" not in captured.err + captured.out
    assert "AKIAKEY" not in captured.err + captured.out


@pytest.mark.parametrize("endpoint", ["minio:9000", "ftp://minio:9000", "http://"])
def test_s3_endpoint_must_be_an_http_url(endpoint, capsys):
    assert main(["segment", "--s3-endpoint", endpoint]) == EXIT_USAGE
    assert "must be an http:// or https:// URL" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_segment_job_runs_on_bundled_sample_and_says_little(tmp_path, model_path):
    done = subprocess.run(
        [sys.executable, "jobs/segment.py", "--model", model_path, "--output", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=280,
        env=LOCAL,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "segmented 16 images (0 flagged, 0 failed)" in done.stdout
    assert pq.read_table(tmp_path / "o" / "segmentation.parquet").num_rows == 16
    # Not a terminal: progress as plain lines, no carriage returns; Ray and TensorFlow quiet.
    output = done.stdout + done.stderr
    assert "\r" not in output
    assert "segment: 16/16 images" in done.stdout
    lines = output.strip().splitlines()
    assert len(lines) <= 16, output
    for chatter in ("Starting execution", "absl::InitializeLog", "cuInit", "Ray instance"):
        assert chatter not in output


@pytest.mark.timeout(200)
def test_clean_job_exits_3_when_an_image_fails(tmp_path):
    root = copy_sample(tmp_path / "data", SAMPLE_IDS[:2], masks=False)
    (root / "images" / "broken.png").write_bytes(b"not a PNG")
    done = subprocess.run(
        [sys.executable, "jobs/clean.py", "--input", str(root), "--output", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=180,
        env=LOCAL,
    )
    assert done.returncode == EXIT_IMAGES_FAILED, done.stderr[-3000:]
    assert "cleaned 3 images (0 flagged, 1 failed: broken)" in done.stdout
    assert pq.read_table(tmp_path / "o" / "cleaning.parquet").num_rows == 3


def test_quiet_and_verbose_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["segment", "-q", "-v"])
    assert exited.value.code == EXIT_USAGE
    assert "not allowed with argument" in capsys.readouterr().err


def test_progress_lines_show_a_rate_only_over_a_second_of_work():
    progress = ConsoleProgress(io.StringIO(), every=1e9)
    progress.start("segment", 30)
    progress.advance(10)  # the first batch: rates count from here
    progress.advance(10, failed=1)
    assert progress.line(progress.first + 0.5) == "segment: 20/30 images, 1 error"
    assert progress.line(progress.first + 2.0) == (
        "segment: 20/30 images, 5.0 images/s, 2 s left, 1 error"
    )
    progress.advance(5, failed=1)
    assert progress.line(progress.first + 0.5) == "segment: 25/30 images, 2 errors"
    assert progress.stream.getvalue().splitlines()[0].startswith("segment: 10/30 images")


def test_a_job_leaves_no_empty_log_behind_and_keeps_one_with_output(tmp_path, monkeypatch):
    """Native output goes to /tmp/lungseg/<job>-<time>-<pid>.log; an empty one went on piling up
    there, one per job."""
    import tempfile

    from lungseg import console

    env = {**LOCAL, "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "lungseg", "report", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == EXIT_USAGE, done.stderr
    assert list((tmp_path / "lungseg").iterdir()) == []
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with console.native_output_aside(console.NORMAL, "segment") as quiet:
        pass
    with console.native_output_aside(console.NORMAL, "train") as noisy:
        os.write(2, b"failed call to cuInit\n")
    assert not os.path.exists(quiet)
    assert Path(noisy).read_bytes() == b"failed call to cuInit\n"


def test_a_local_ray_stops_with_its_job_every_process_of_it():
    """The Ray a job starts goes with it, its autoscaler monitor too, killed before the GCS
    stops (its SIGTERM handler reported to a stopped GCS until Ray killed it a second later)."""
    script = (
        "import ray\n"
        "from lungseg import console\n"
        "with console.Session(console.NORMAL, 'segment') as session:\n"
        "    session.start_ray()\n"
        "    node = ray._private.worker._global_node\n"
        "    print(*(p.process.pid for ps in node.all_processes.values() for p in ps))\n"
        "    print('monitor' in node.all_processes)\n"
        "print(ray.is_initialized())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=LOCAL, timeout=120
    )
    assert done.returncode == 0, done.stderr
    pids, had_monitor, running = done.stdout.splitlines()[-3:]
    assert (had_monitor, running) == ("True", "False")
    assert len(pids.split()) >= 4  # the GCS, the raylet, the monitor, the dashboard's head...
    assert [pid for pid in pids.split() if Path(f"/proc/{pid}").exists()] == []
    assert "autoscaler" not in done.stderr.lower()


def test_quality_control_s_figures_read_as_one_line():
    figures = {"scored": 132, "review": 19, "review_share": 19 / 132, "qc_dice_mae": 0.0107}
    figures |= {"spearman_qc_score_dice": 0.6661, "poor_dice_below": 0.93, "poor": 7}
    figures |= {"poor_in_review": 2, "auroc_poor": 0.8101}
    assert _quality_line("quality control", figures) == (
        "quality control: 19 of 132 to review (14.4%), Spearman(qc_score, Dice) 0.666, qc_dice "
        "off by 0.011 on average, masks below Dice 0.93 in review: 2 of 7 (AUROC 0.810)"
    )
    figures |= {"poor": 0, "poor_in_review": 0, "auroc_poor": None}
    assert _quality_line("on 4", figures).endswith("in review: none")
