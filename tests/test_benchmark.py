"""The benchmark at tiny sizes: every row runs and the result is well formed (nothing timed)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

from lungseg.core.config import BenchmarkConfig, ModelConfig
from lungseg.jobs.benchmark import (
    conv_flops,
    format_table,
    replicate,
    run_benchmark,
    session_processes,
    tfdata_goal,
)
from lungseg.jobs.benchmark.baselines import StageCosts
from lungseg.jobs.benchmark.sampler import Measurement
from tests.conftest import SAMPLE_IDS, copy_sample


def test_conv_flops_counts_convolutions_and_transposed_ones():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, padding="same"),
            keras.layers.Conv2DTranspose(2, 2, strides=2),
        ]
    )
    assert conv_flops(model) == 2 * 8 * 8 * 9 * 3 * 4 + 2 * 8 * 8 * 4 * 4 * 2


def test_replicate_links_sources_round_robin_under_new_ids(tmp_path):
    root = copy_sample(tmp_path / "data", SAMPLE_IDS[:2], masks=False)
    sources = sorted(str(p) for p in (root / "images").iterdir())
    folder = replicate(sources, 5, tmp_path / "copies")
    assert sorted(p.name for p in folder.iterdir()) == [f"x{i:06d}.png" for i in range(5)]
    assert (folder / "x000004.png").read_bytes() == Path(sources[0]).read_bytes()


def test_session_processes_include_children():
    alone = sum(rss for _, _, rss in session_processes().values())
    code = "import sys; x = bytearray(300 * 2**20); print(flush=True); sys.stdin.read()"
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        child.stdout.readline()  # the child has touched its 300 MiB
        processes = session_processes()
        assert (
            processes[os.getpid()][0] == "driver"
            and processes[child.pid][0] == Path(sys.executable).name
        )
        assert sum(rss for _, _, rss in processes.values()) - alone > 250 * 2**20
        # The child's 300 MiB are its own pages: its PSS holds them whole.
        assert session_processes(pss=True)[child.pid][2] > 250 * 2**20
    finally:
        child.communicate(b"")


def test_replicate_resizes_to_hospital_films(tmp_path):
    root = copy_sample(tmp_path / "data", SAMPLE_IDS[:2], masks=False)
    sources = sorted(str(p) for p in (root / "images").iterdir())
    folder = replicate(sources, 3, tmp_path / "films", size=1024)
    films = sorted(folder.iterdir())
    assert [p.name for p in films] == ["x000000.png", "x000001.png", "x000002.png"]
    import cv2

    assert cv2.imread(str(films[2]), cv2.IMREAD_UNCHANGED).shape == (1024, 1024)
    assert films[0].read_bytes() == films[2].read_bytes()


def test_tfdata_goal_by_image_count():
    goals = [tfdata_goal(n) for n in (4, 399, 400, 1999, 2000, 1_000_000)]
    assert goals == [0.9, 0.9, 0.9, 0.9, 1.0, 1.0]


def test_profile_names_the_top_consumers_and_adds_up():
    cpu = {"driver": 3.1, "raylet": 0.4, "gcs_server": 0.3, "agent": 0.1, "IDLE": 1.0}
    run = Measurement(10.0, 10.0, cpu, 0, {})
    assert run.profile(2) == "driver 3.1 s, IDLE 1.0 s, the rest (3) 0.8 s"
    assert run.profile(5) == "driver 3.1 s, IDLE 1.0 s, raylet 0.4 s, gcs_server 0.3 s, agent 0.1 s"


def test_stage_costs_sum_to_a_ceiling():
    costs = StageCosts(decode=30.0, preprocess=5.0, model=45.0, write=20.0)
    assert costs.total == 100.0
    assert costs.ceiling(2) == 20.0  # two cores, 100 core-ms per image


@pytest.mark.usefixtures("local_ray")
@pytest.mark.timeout(900)  # three whole-process sides of two image sets
def test_benchmark_runs_every_stage_at_tiny_sizes(tmp_path, model_path, caplog):
    root = copy_sample(tmp_path / "data", SAMPLE_IDS[:2])
    caplog.set_level(logging.INFO, logger="lungseg")
    own = []  # whole-process sides measured when Ray is asked for: all of them, none after
    so_far = []  # benchmark.json as a run stopped then would leave it

    def start_ray() -> None:
        own.append(sum("own process:" in r.getMessage() for r in caplog.records))
        so_far.append(json.loads((tmp_path / "out" / "benchmark.json").read_text()))

    result = run_benchmark(
        BenchmarkConfig(
            input=str(root),
            output=str(tmp_path / "out"),
            model=model_path,
            films=(4,),
            film_size=1024,
            images=8,
            preprocess_images=8,
            memory_images=(4, 8),
            train_images=4,
            train_model=ModelConfig(size=64, base_filters=4, depth=2),
            batch_size=4,
            rounds=1,
        ),
        start_ray=start_ray,
    )
    assert own == [6] == [sum("own process:" in r.getMessage() for r in caplog.records)]
    [partial] = so_far
    assert partial["complete"] is False and partial["settings"]["rounds"] == 1
    assert (
        list(partial["whole_process"])
        == list(partial["costs"])
        == [
            "hospital images (1024 px), 4",
            "inference (512 px images)",
        ]
    )
    for sides in partial["whole_process"].values():
        assert list(sides) == [
            "plain loop, own process",
            "tf.data pipeline, own process",
            "lungseg segment, own process",
        ]
        assert all(side["seconds"] > 0 and side["cores"] > 0 for side in sides.values())
    saved = json.loads(Path(result.json).read_text())
    assert saved["complete"] is True
    stages = [row["stage"] for row in saved["rows"]]
    assert stages == [
        "hospital images (1024 px), 4, whole process",
        "hospital images (1024 px), 4, whole process, tf.data",
        "hospital images (1024 px), 4, in process",
        "inference (512 px images), whole process",
        "inference (512 px images), whole process, tf.data",
        "preprocessing",
        "memory",
        "training",
    ]
    for row in saved["rows"]:
        assert row["baseline_value"] > 0 and row["value"] > 0 and row["ratio"] > 0
        assert isinstance(row["met"], bool) and row["goal"][:2] in (">=", "<=")
        assert 0 <= row["idle"] <= 1
    films = [row for row in saved["rows"] if row["stage"].startswith(("hospital", "inference"))]
    assert len(films) == 5
    assert all(
        row["ceiling"] > 0 and row["share"] == round(row["value"] / row["ceiling"], 2)
        for row in films
    )
    peers = [row["baseline"] for row in films if "whole process" in row["stage"]]
    assert peers == ["plain loop", "tf.data pipeline"] * 2
    tfdata = [row["goal"] for row in films if row["baseline"] == "tf.data pipeline"]
    assert tfdata == [">= 0.90", ">= 0.90"]
    for costs in saved["costs"].values():
        for side in ("pipeline", "loop"):
            assert costs[side]["total"] == pytest.approx(
                sum(costs[side][s] for s in ("decode", "preprocess", "model", "write"))
            )
    assert saved["model"]["gflops_per_image"] > 0 and saved["machine"]["matmul_gflops"] > 0
    table = format_table(result)
    assert all(f"| {stage} |" in table for stage in stages)
    assert "| ceiling on 2 cores |" in table
    # Without the segment stages (--stages preprocessing,memory) there is no step table.
    alone = format_table(dataclasses.replace(result, rows=result.rows[5:], costs={}))
    assert "| preprocessing |" in alone and "core-ms per image |" not in alone


@pytest.mark.timeout(600)
def test_the_benchmark_command_starts_its_ray_after_the_whole_process_sides(tmp_path, model_path):
    """As the README runs it: a process with no Ray until the whole-process sides are measured
    (``lungseg segment`` starts its own), then Ray for the in-process row."""
    root = copy_sample(tmp_path / "data", SAMPLE_IDS[:2])
    out = tmp_path / "out"
    argv = ["--input", str(root), "--output", str(out), "--model", model_path, "--stages"]
    argv += ["hospital", "--films", "4", "--film-size", "256", "--batch-size", "4", "--rounds", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "lungseg", "benchmark", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_ADDRESS": "local"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((out / "benchmark.json").read_text())
    assert [row["stage"] for row in saved["rows"]] == [
        "hospital images (256 px), 4, whole process",
        "hospital images (256 px), 4, whole process, tf.data",
        "hospital images (256 px), 4, in process",
    ]
    assert saved["machine"]["ray_cpus"] > 0
    assert "lungseg segment" in done.stdout
