"""Sizing the actor pools for any node, and the preprocessing actor stage on a real local Ray,
with real and broken files."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lungseg.core.config import ResourceConfig
from lungseg.core.errors import UserError
from lungseg.core.layout import ERROR, OK
from lungseg.io import catalog
from lungseg.stages import pipeline
from tests.conftest import SAMPLE_IDS, copy_sample

Pool, Cluster = pipeline.Pool, pipeline.Cluster


@pytest.mark.parametrize(
    ("cpus", "gpus", "use_gpu", "preprocess", "model"),
    [
        # A 2-core laptop: one model actor on 1.2 CPUs (2 TensorFlow threads, writing the
        # masks), one preprocessing task at a time on the rest.
        (2, 0, False, Pool(1, 1, 0.8, tasks=True), Pool(1, 1, 1.2, threads=2, calls=2)),
        # A 16-core node: two model actors on 60% of the cores, 6 preprocessing tasks at once.
        (16, 0, False, Pool(1, 6, 1.0, tasks=True), Pool(2, 2, 4.8, threads=5, calls=2)),
        # 16 cores and a GPU: the GPU's actor writes nothing itself; 15 CPUs to preprocessing.
        (16, 1, True, Pool(1, 15, 1.0, tasks=True), Pool(1, 1, 1.0, gpus=1, threads=2, calls=2)),
        # A 64-core node with 4 GPUs: an actor per GPU, 60 preprocessing tasks at once.
        (64, 4, True, Pool(1, 60, 1.0, tasks=True), Pool(4, 4, 1.0, gpus=1, threads=2, calls=2)),
    ],
)
def test_pools_fit_the_node(cpus, gpus, use_gpu, preprocess, model):
    device = "gpu" if use_gpu else "cpu"
    pools = pipeline.segment_pools(Cluster(cpus, gpus), ResourceConfig(device=device))
    assert pools == (preprocess, model)
    assert pools[0].size_cpus() + pools[1].size_cpus() <= cpus + 1e-9  # never more than there is


def test_no_actor_declares_more_than_a_node_has():
    # Two 3-CPU nodes (tests/test_cluster.py): a 3.6-CPU model actor would never start.
    preprocess, model = pipeline.segment_pools(Cluster(6, node_cpus=3))
    assert model == Pool(2, 2, 1.8, threads=2, calls=2)
    # An upper bound: tasks start where CPUs are free (two here, one beside each model actor).
    assert preprocess == Pool(1, 3, 0.8, tasks=True)
    # Four 16-core nodes: eight model actors of 4.8 CPUs, three to a node.
    preprocess, model = pipeline.segment_pools(Cluster(64, node_cpus=16))
    assert (model.max_size, model.cpus, preprocess.cpus) == (8, 4.8, 1.0)
    # A fixed single actor on a cluster of small nodes still fits on one of them.
    assert pipeline.segment_pools(Cluster(6, node_cpus=3), model_actors=1)[1].cpus == 1.8


def test_given_sizes_are_fixed_and_a_missing_gpu_is_named():
    fixed = ResourceConfig(preprocess_actors=3)
    preprocess, model = pipeline.segment_pools(Cluster(16), fixed, model_actors=1)
    assert (preprocess.min_size, preprocess.max_size, model.max_size) == (3, 3, 1)
    assert model.cpus == 9.6 and model.threads == 10
    with pytest.raises(UserError, match="--device gpu asks for GPUs, but this Ray cluster has no"):
        pipeline.segment_pools(Cluster(8), ResourceConfig(device="gpu"))


def test_preprocessing_alone_runs_as_many_tasks_as_the_cpus_hold():
    assert pipeline.preprocess_pool(Cluster(2)) == Pool(1, 2, 0.8, tasks=True)
    assert pipeline.preprocess_pool(Cluster(16)) == Pool(1, 16, 1.0, tasks=True)
    three = ResourceConfig(preprocess_actors=3)
    assert pipeline.preprocess_pool(Cluster(16), three) == Pool(3, 3, 1.0, tasks=True)


def test_training_workers_leave_half_the_cpus_to_ray_data():
    assert pipeline.train_worker_cpus(Cluster(2), 2) == 0.5
    assert pipeline.train_worker_cpus(Cluster(16), 4) == 2.0
    assert pipeline.train_worker_cpus(Cluster(16), 4, given=3.0) == 3.0
    # Two 3-CPU nodes and one worker: at most half of one node, not half of both.
    assert pipeline.train_worker_cpus(Cluster(6, node_cpus=3), 1) == 1.5


@pytest.mark.parametrize(
    ("flags", "use_gpu", "precision"),
    [
        ("fpu avx2 avx512f avx512_bf16", False, "bfloat16"),
        ("fpu avx2 amx_bf16 amx_tile", False, "bfloat16"),
        ("fpu avx2 avx512f", False, "float32"),
        ("fpu avx2", True, "bfloat16"),
    ],
)
def test_auto_precision_follows_the_hardware(tmp_path, flags, use_gpu, precision):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert pipeline.resolve_precision("auto", use_gpu, str(cpuinfo)) == precision
    assert pipeline.resolve_precision("float32", use_gpu, str(cpuinfo)) == "float32"
    assert pipeline.resolve_precision("auto", False, str(tmp_path / "none")) == "float32"


def test_the_batch_follows_the_device_unless_given():
    assert (pipeline.resolve_batch(None, False), pipeline.resolve_batch(None, True)) == (4, 8)
    assert pipeline.resolve_batch(16, False) == pipeline.resolve_batch(16, True) == 16


@pytest.mark.usefixtures("local_ray")
@pytest.mark.timeout(180)
def test_preprocess_sample_and_bad_files(tmp_path):
    root = copy_sample(tmp_path, SAMPLE_IDS[:3])
    (root / "images" / "broken.png").write_bytes(b"this is text, not a PNG")
    (root / "images" / "empty.png").write_bytes(b"")
    small = cv2.imread(str(root / "masks" / f"{SAMPLE_IDS[0]}.png"), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(root / "images" / "odd.png"), np.zeros((300, 200), np.uint8) + 7)
    cv2.imwrite(str(root / "masks" / "odd.png"), small)  # 512x512 mask for a 200x300 image
    found = catalog.find_cases(str(root))
    rows = {
        row["id"]: row
        for row in pipeline.preprocessed(found.cases, 64, Pool(1, 2, 0.25, tasks=True), train=True)
        .materialize()
        .take_all()
    }
    assert sorted(rows) == sorted([*SAMPLE_IDS[:3], "broken", "empty", "odd"])
    for case_id in SAMPLE_IDS[:3]:
        row = rows[case_id]
        assert row["status"] == OK and row["error"] == ""
        assert row["image"].shape == (64, 64) and row["image"].dtype == np.uint8
        assert row["image"].min() == 0 and row["image"].max() > 200
        assert set(np.unique(row["mask"])) == {0, 1}
        assert (row["height"], row["width"]) == (512, 512)
        assert row["has_truth"]
    assert rows["broken"]["status"] == ERROR
    assert "ImageDecodeError" in rows["broken"]["error"] and "broken.png" in rows["broken"]["error"]
    assert "empty file" in rows["empty"]["error"]
    assert rows["odd"]["status"] == ERROR
    assert "mask 512x512 differs from image 200x300" in rows["odd"]["error"]
