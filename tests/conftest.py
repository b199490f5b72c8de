"""Shared fixtures: one real local Ray per test module, sample data, a small saved model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import pytest
import ray

from lungseg.config import SAMPLE

SAMPLE_IDS = sorted(p.stem for p in Path(SAMPLE, "images").glob("*.png"))


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray with 2 CPUs, shared by the tests of one module."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def copy_sample(root: Path, ids: list[str], masks: bool = True) -> Path:
    """Copy sample pairs into ``root/images`` (+ ``root/masks``) and return ``root``."""
    for folder in ("images", "masks") if masks else ("images",):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for case_id in ids:
            shutil.copy(Path(SAMPLE, folder, f"{case_id}.png"), root / folder)
    return root
