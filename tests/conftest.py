"""Shared fixtures: one real local Ray per test module, sample data, a small saved model."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("LUNGSEG_CACHE", tempfile.mkdtemp(prefix="lungseg-cache-"))  # not ~/.cache

import pytest
import ray

from lungseg.core.config import BUNDLED_MODEL, SAMPLE, SegmentConfig

SAMPLE_IDS = sorted(p.stem for p in Path(SAMPLE, "images").glob("*.png"))


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray with 2 CPUs, shared by the tests of one module."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    """The bundled U-Net saved anew as a file of its own (another SHA-256): its masks of real
    X-rays are plausible lungs, so they come out ``ok`` where an untrained model's are flagged."""
    from lungseg.model.unet import load_model

    path = tmp_path_factory.mktemp("model") / "model.keras"
    load_model(Path(BUNDLED_MODEL).read_bytes()).save(path)
    return str(path)


def labelled_config(
    root: Path | str, output: Path | str, job: type[SegmentConfig] = SegmentConfig, **options
) -> SegmentConfig:
    """A segment (or ``job=EvaluateConfig``) job over ``root/images`` scored against
    ``root/masks``, writing to ``output`` (a path or URI); ``options`` set the rest (``model``,
    ``batch_size``, ...)."""
    return job(input=f"{root}/images", masks=f"{root}/masks", output=str(output), **options)


def copy_sample(root: Path, ids: list[str], masks: bool = True) -> Path:
    """Copy sample pairs into ``root/images`` (+ ``root/masks``) and return ``root``."""
    for folder in ("images", "masks") if masks else ("images",):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for case_id in ids:
            shutil.copy(Path(SAMPLE, folder, f"{case_id}.png"), root / folder)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Distinctive fake credentials, so tests can prove they never land in outputs or logs.
S3_SECRET = "lungseg-test-secret-0123456789"


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint (moto's server) on loopback; Ray started later inherits its keys."""
    from moto.server import ThreadedMotoServer

    os.environ.update(
        AWS_ACCESS_KEY_ID="lungseg-test-key",
        AWS_SECRET_ACCESS_KEY=S3_SECRET,
        AWS_DEFAULT_REGION="us-east-1",
    )
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3(s3_endpoint):
    """A boto3 client of the loopback endpoint, for setting up and inspecting buckets."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint)


def upload_sample(s3, bucket: str, prefix: str, ids: list[str]) -> str:
    """Put sample pairs at ``s3://bucket/prefix/{images,masks}/<id>.png``; return the root URI."""
    if bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=bucket)
    for folder in ("images", "masks"):
        for case_id in ids:
            s3.upload_file(
                str(Path(SAMPLE, folder, f"{case_id}.png")),
                bucket,
                f"{prefix}/{folder}/{case_id}.png",
            )
    return f"s3://{bucket}/{prefix}"
