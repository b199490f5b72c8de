"""The segment job's GPU-node pipeline (model actors on GPUs, masks written by CPU tasks) on a
local Ray that offers one GPU as a resource: TensorFlow finds no GPU and runs on the CPU, but
Ray schedules and the job plumbs the stages as on a GPU node."""

from __future__ import annotations

from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import ray

from lungseg.core.config import ResourceConfig
from lungseg.jobs.segment import run_segmentation
from tests.conftest import SAMPLE_IDS, copy_sample, labelled_config


@pytest.fixture(scope="module")
def ray_with_a_gpu():
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.usefixtures("ray_with_a_gpu")
@pytest.mark.timeout(300)
def test_gpu_pipeline_writes_what_the_cpu_pipeline_writes(tmp_path, model_path):
    root = copy_sample(tmp_path / "data", SAMPLE_IDS[:5])
    # In float32: in bfloat16 (auto, on a CPU with AVX-512 BF16) the two actors' probabilities
    # differ in the last bits here; what this compares is the plumbing, not the arithmetic.
    config = labelled_config(
        root, tmp_path / "cpu", model=model_path, batch_size=2, precision="float32"
    )
    on_cpu = run_segmentation(config)
    on_gpu = run_segmentation(
        replace(config, output=str(tmp_path / "gpu"), resources=ResourceConfig(device="gpu"))
    )
    assert (on_gpu.images, on_gpu.flagged, on_gpu.failed) == (5, 0, 0)
    rows = [
        sorted(pq.read_table(r.table).to_pylist(), key=lambda r: r["id"]) for r in (on_cpu, on_gpu)
    ]
    keep = (
        "id",
        "status",
        "dice",
        "iou",
        "lung_fraction",
        "tp",
        "fp",
        "fn",
        "qc_dice",
        "qc_score",
        "qc",
    )
    assert [{k: r[k] for k in keep} for r in rows[0]] == [{k: r[k] for k in keep} for r in rows[1]]
    for case_id in SAMPLE_IDS[:5]:
        masks = [
            (tmp_path / side / "masks" / f"{case_id}.png").read_bytes() for side in ("cpu", "gpu")
        ]
        assert masks[0] == masks[1]
