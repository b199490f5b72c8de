"""Object storage end to end against a real S3 endpoint (moto's server on loopback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from lungseg.core.config import ModelConfig, RecipeConfig, TrainConfig
from lungseg.io import catalog, storage
from lungseg.io.storage import Store
from lungseg.jobs.segment import run_segmentation
from lungseg.jobs.train import run_training
from lungseg.stages import pipeline
from tests.conftest import S3_SECRET, SAMPLE_IDS, free_port, labelled_config, upload_sample

pytestmark = [pytest.mark.usefixtures("s3_endpoint", "local_ray"), pytest.mark.timeout(420)]


def _fs(endpoint: str) -> pafs.S3FileSystem:
    return Store(endpoint).resolve("s3://any")[0]


def test_train_from_bucket_into_bucket_then_resume(s3, s3_endpoint):
    data = upload_sample(s3, "xrays", "montgomery", SAMPLE_IDS[:8])
    s3.create_bucket(Bucket="runs")
    config = TrainConfig(
        data=data,
        output="s3://runs/unet/exp1",
        workers=2,
        val_fraction=0.25,
        recipe=RecipeConfig(epochs=1, batch_size=2, model=ModelConfig(64, 4, 2)),
        s3_endpoint=s3_endpoint,
    )
    first = run_training(config)
    assert first.model == "s3://runs/unet/exp1/model.keras"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="runs")["Contents"]}
    for name in ("model.keras", "metrics.csv", "curves.png", "config.json"):
        assert f"unet/exp1/{name}" in keys
    assert any(
        k.startswith("unet/exp1/checkpoints/checkpoint_") and k.endswith("model.keras")
        for k in keys
    )
    saved = s3.get_object(Bucket="runs", Key="unet/exp1/config.json")["Body"].read().decode()
    assert json.loads(saved)["data"] == data and S3_SECRET not in saved

    _assert_no_clutter(s3, "runs", keys)

    resumed = run_training(replace(config, recipe=replace(config.recipe, epochs=2)))
    assert [row["epoch"] for row in resumed.history] == [1, 2]
    assert resumed.history[0] == first.history[0]
    _assert_no_clutter(s3, "runs")


def _assert_no_clutter(s3, bucket: str, keys: set[str] | None = None) -> None:
    """No zero-byte folder markers (``folder/``) and no Ray storage probe among the outputs."""
    keys = keys or {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert not [k for k in keys if k.endswith("/")], "folder markers"
    assert not [k for k in keys if k.endswith(".validate_storage_marker")], "Ray's probe"


def test_segment_bucket_prefix_into_another_bucket(s3, s3_endpoint, tmp_path):
    from lungseg.model.unet import build_unet

    data = upload_sample(s3, "xrays", "seg", SAMPLE_IDS[:5])
    s3.put_object(Bucket="xrays", Key="seg/images/broken.png", Body=b"not a png")
    s3.create_bucket(Bucket="models")
    build_unet(size=64, base_filters=4, depth=2).save(tmp_path / "m.keras")
    s3.upload_file(str(tmp_path / "m.keras"), "models", "small/model.keras")
    s3.create_bucket(Bucket="results")

    config = labelled_config(
        data,
        "s3://results/batch1",
        model="s3://models/small/model.keras",
        batch_size=2,
        s3_endpoint=s3_endpoint,
    )
    result = run_segmentation(config)
    assert result.table == "s3://results/batch1/segmentation.parquet"
    table = pq.read_table("results/batch1/segmentation.parquet", filesystem=_fs(s3_endpoint))
    rows = {r["id"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted([*SAMPLE_IDS[:5], "broken"])
    assert (result.images, result.failed) == (6, 1)
    for case_id in SAMPLE_IDS[:5]:
        assert rows[case_id]["mask"] == f"masks/{case_id}.png"  # under s3://results/batch1
        assert rows[case_id]["source"] == f"{data}/images/{case_id}.png"
        assert 0 <= rows[case_id]["dice"] <= 1
        head = s3.head_object(Bucket="results", Key=f"batch1/masks/{case_id}.png")
        assert head["ContentLength"] > 0
    assert rows["broken"]["status"] == "error" and "ImageDecodeError" in rows["broken"]["error"]
    assert S3_SECRET.encode() not in table.to_pandas().to_csv().encode()
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="results")["Contents"]}
    assert not [k for k in keys if ".parts/" in k], "the journal is removed from the bucket"
    _assert_no_clutter(s3, "results", keys)

    # Resumed in the bucket: the 5 done images are kept, the broken one is tried again.
    resumed = run_segmentation(replace(config, resume=True))
    assert (resumed.resumed, resumed.images, resumed.failed) == (5, 6, 1)
    again = pq.read_table("results/batch1/segmentation.parquet", filesystem=_fs(s3_endpoint))
    assert sorted(again.to_pylist(), key=lambda r: r["id"]) == sorted(
        rows.values(), key=lambda r: r["id"]
    )
    _assert_no_clutter(s3, "results")


def test_object_gone_mid_run_becomes_error_row(s3, s3_endpoint):
    data = upload_sample(s3, "xrays", "gone", SAMPLE_IDS[:2])
    found = catalog.find_cases(f"{data}/images", store=Store(s3_endpoint))
    s3.delete_object(Bucket="xrays", Key=f"gone/images/{SAMPLE_IDS[0]}.png")
    rows = pipeline.preprocessed(
        found.cases, 64, pipeline.Pool(1, 1, 0.25, tasks=True), Store(s3_endpoint)
    ).take_all()
    status = {row["id"]: (row["status"], row["error"]) for row in rows}
    assert status[SAMPLE_IDS[1]] == ("ok", "")
    assert status[SAMPLE_IDS[0]][0] == "error"
    assert f"s3://xrays/gone/images/{SAMPLE_IDS[0]}.png" in status[SAMPLE_IDS[0]][1]


def test_missing_bucket_is_named(s3_endpoint):
    with pytest.raises(storage.StorageError, match=r"s3://no-such-bucket/x: the bucket does not"):
        catalog.find_cases("s3://no-such-bucket/x", store=Store(s3_endpoint))
    with pytest.raises(storage.StorageError, match=r"s3://no-out-bucket/r: the bucket does not"):
        Store(s3_endpoint).check_writable("s3://no-out-bucket/r")


def test_empty_prefix_is_named(s3, s3_endpoint):
    s3.create_bucket(Bucket="empty")
    with pytest.raises(catalog.CatalogError, match=r"not found: s3://empty/nothing/here"):
        catalog.find_cases("s3://empty/nothing/here", store=Store(s3_endpoint))
    s3.put_object(Bucket="empty", Key="notes/readme.txt", Body=b"no images here")
    with pytest.raises(catalog.CatalogError, match=r"no images .* under s3://empty/notes"):
        catalog.find_cases("s3://empty/notes", store=Store(s3_endpoint))


def test_unreachable_endpoint_is_named_quickly():
    started = time.monotonic()
    with pytest.raises(storage.StorageError, match=r"s3://xrays/a: the S3 endpoint is unreachable"):
        catalog.find_cases("s3://xrays/a", store=Store(f"http://127.0.0.1:{free_port()}"))
    assert time.monotonic() - started < 60


def test_access_denied_is_named(tmp_path):
    """A second moto server that enforces IAM: our keys are unknown to it, so access is denied."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                Store(endpoint).file_type("s3://locked/x")
            except storage.StorageError as exc:
                if "unreachable" not in str(exc):
                    break
            time.sleep(0.1)
        with pytest.raises(storage.StorageError, match=r"s3://locked/data: access denied"):
            catalog.find_cases("s3://locked/data", store=Store(endpoint))
        with pytest.raises(storage.StorageError, match=r"s3://locked/out: access denied"):
            Store(endpoint).check_writable("s3://locked/out")
    finally:
        server.terminate()
        server.wait(10)
