"""Faults injected into real Ray jobs: a segmenting actor and a train worker die mid-run, a
driver is killed and its job resumed, a batch fails for good, Ray repeats a batch.

The module's Ray carries the test hooks of :func:`lungseg.stages.pipeline.inject_fault` in every
worker's environment: the first segmenting actor to start its second batch exits, and train
worker rank 1 exits after the training steps of epoch 2; each only once (a marker file in the
fault folder records that it happened).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from lungseg.core.config import ModelConfig, RecipeConfig, TrainConfig
from lungseg.core.layout import LOST, SEGMENT_TABLE
from lungseg.io.catalog import Case
from lungseg.io.storage import DEFAULT_STORE
from lungseg.jobs.segment import SCHEMA, run_segmentation
from lungseg.jobs.train import run_training
from lungseg.runs.table import JOURNAL_SUFFIX, write_table
from lungseg.stages import pipeline
from tests.conftest import SAMPLE_IDS, copy_sample, labelled_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> Path:
    """A local Ray whose workers get the fault hooks; yields the folder of fault markers."""
    folder = tmp_path_factory.mktemp("faults")
    hooks = {
        pipeline.FAULT_DIR: str(folder),
        "LUNGSEG_FAULT_SEGMENTER": "1",
        "LUNGSEG_FAULT_TRAIN_RANK1": "2",
        # Ray Train takes in a report when it polls the workers (every 2 s by default): poll
        # often, so that epoch 1's checkpoint is in before rank 1 dies a short epoch later.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    }
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": hooks},
    )
    yield folder
    ray.shutdown()


def _rows(table: Path) -> list[dict]:
    return sorted(pq.read_table(table).to_pylist(), key=lambda row: row["id"])


@pytest.mark.timeout(240)
def test_segmenting_actor_killed_mid_run_gives_complete_duplicate_free_table(
    faults, model_path, tmp_path
):
    root = copy_sample(tmp_path / "data", SAMPLE_IDS[:6])
    out = tmp_path / "out"
    result = run_segmentation(labelled_config(root, out, model=model_path, batch_size=2))
    assert (faults / "segmenter").exists(), "the segmenting actor did not die"
    rows = _rows(out / SEGMENT_TABLE)
    assert [row["id"] for row in rows] == SAMPLE_IDS[:6]
    assert all(row["status"] == "ok" and 0 <= row["dice"] <= 1 for row in rows)
    assert (result.images, result.flagged, result.failed) == (6, 0, 0)
    assert sorted(p.stem for p in (out / "masks").iterdir()) == SAMPLE_IDS[:6]


@pytest.mark.timeout(420)
def test_train_worker_killed_mid_epoch_finishes_from_the_checkpoint(faults, tmp_path):
    data = copy_sample(tmp_path / "data", SAMPLE_IDS[:6])
    (data / "images" / "broken.png").write_bytes(b"not a PNG")
    (data / "masks" / "broken.png").write_bytes(b"not a PNG")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [*SAMPLE_IDS[:4], "broken"], "val": SAMPLE_IDS[4:6]}))
    run = tmp_path / "run"
    result = run_training(
        TrainConfig(
            data=str(data),
            output=str(run),
            workers=2,
            split=str(split),
            recipe=RecipeConfig(
                epochs=2, batch_size=2, model=ModelConfig(size=64, base_filters=4, depth=2)
            ),
        )
    )
    died = (faults / "train_rank1").stat().st_mtime
    assert [row["epoch"] for row in result.history] == [1, 2]
    # The kept checkpoint of epoch 1 is from before the death: the restarted workers went on
    # from it (a run started over would have replaced it by a new epoch 1 and epoch 2).
    states = {
        len(json.loads(state.read_text())["history"]): state.stat().st_mtime
        for state in run.glob("checkpoints/checkpoint_*/state.json")
    }
    assert sorted(states) == [1, 2] and states[1] < died < states[2]
    assert (result.images, result.flagged, result.failed) == (7, 0, 1)
    data_rows = {r["id"]: r for r in pq.read_table(run / "data.parquet").to_pylist()}
    assert data_rows["broken"]["status"] == "error" and data_rows["broken"]["split"] == "train"


def _segment_job(*args: str) -> subprocess.Popen:
    """``python jobs/segment.py ARGS`` in its own process group, with its own local Ray."""
    return subprocess.Popen(
        [sys.executable, "jobs/segment.py", *args],
        cwd=REPO,
        env={**os.environ, "RAY_ADDRESS": "local"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.timeout(300)
def test_killed_driver_then_resume_gives_the_uninterrupted_table(faults, model_path, tmp_path):
    root = copy_sample(tmp_path / "data", SAMPLE_IDS)  # 16 images in 8 batches
    out = tmp_path / "out"
    config = labelled_config(root, out, model=model_path, batch_size=2, overlays=True)
    whole = run_segmentation(config)
    assert (whole.images, whole.failed) == (16, 0)
    uninterrupted = _rows(out / SEGMENT_TABLE)
    shutil.rmtree(out)

    args = [f"--model={model_path}", f"--input={root / 'images'}", f"--masks={root / 'masks'}"]
    job = subprocess.Popen(
        [
            sys.executable,
            "jobs/segment.py",
            *args,
            f"--output={out}",
            "--batch-size=2",
            "--overlays",
        ],
        cwd=REPO,
        env={**os.environ, "RAY_ADDRESS": "local"},  # its own local Ray
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group: the driver and the Ray it starts
    )
    journal = out / f"{SEGMENT_TABLE}{JOURNAL_SUFFIX}"
    while not list(journal.glob("part-*.parquet")) and job.poll() is None:
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and its local Ray, as a lost head node
    stdout, _ = job.communicate(timeout=60)
    assert job.returncode == -signal.SIGKILL, stdout[-3000:]
    assert not (out / SEGMENT_TABLE).exists() and list((out / "masks").iterdir())

    resumed = run_segmentation(replace(config, resume=True))  # what --resume asks for
    assert 1 <= resumed.resumed < 16 and (resumed.images, resumed.failed) == (16, 0)
    assert _rows(out / SEGMENT_TABLE) == uninterrupted
    assert not journal.exists()

    (out / "masks" / f"{SAMPLE_IDS[3]}.png").unlink()  # a row without its mask is done again
    again = run_segmentation(replace(config, resume=True))
    assert (again.resumed, again.images, again.failed) == (15, 16, 0)
    assert _rows(out / SEGMENT_TABLE) == uninterrupted


def test_resume_flag_reaches_the_config():
    from lungseg.cli import _config, build_parser

    for job in ("segment", "evaluate"):
        assert _config(build_parser().parse_args([job, "--resume"])).resume
        assert not _config(build_parser().parse_args([job])).resume


def test_write_table_keeps_the_first_row_of_a_repeated_id(faults, tmp_path):
    schema = SCHEMA
    cases = [Case("a", "/in/a.png"), Case("b", "/in/b.png")]
    first = dict.fromkeys(schema.names) | {"id": "a", "source": "/in/a.png", "status": "ok"}
    again = first | {"mask": "/out/masks/a.png"}
    other = first | {"id": "b", "source": "/in/b.png"}
    rows = ray.data.from_items([first, again, other, again], override_num_blocks=1)
    statuses = write_table(
        pipeline.row_batches(rows), str(tmp_path / "t.parquet"), schema, cases, DEFAULT_STORE
    )
    assert statuses == {"ok": 2}
    assert pq.read_table(tmp_path / "t.parquet").to_pylist() == [first, other]


def test_a_batch_that_fails_for_good_gives_its_cases_error_rows(faults, tmp_path):
    import pyarrow as pa

    schema = pa.schema([(name, pa.string()) for name in ("id", "source", "status", "error")])
    cases = [Case(i, f"/in/{i}.png") for i in "abc"]

    def fail_on_b(batch: dict) -> dict:
        if "b" in list(batch["id"]):
            raise RuntimeError("a bug that no retry cures")
        n = len(batch["id"])
        return {
            "id": batch["id"],
            "source": batch["source"],
            "status": ["ok"] * n,
            "error": [""] * n,
        }

    rows = pipeline.case_dataset(cases, batch_size=1).map_batches(fail_on_b, batch_size=1)
    statuses = write_table(
        pipeline.row_batches(rows), str(tmp_path / "t.parquet"), schema, cases, DEFAULT_STORE
    )
    assert statuses == {"ok": 2, "error": 1}
    table = {r["id"]: r for r in pq.read_table(tmp_path / "t.parquet").to_pylist()}
    assert table["b"] == {
        "id": "b",
        "source": "/in/b.png",
        "status": "error",
        "error": LOST,
    }
    assert table["a"]["status"] == table["c"]["status"] == "ok"
    assert not (tmp_path / "t.parquet.parts").exists()
