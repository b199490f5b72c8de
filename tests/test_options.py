"""The options people reach for (issue 27): a subset of the images (``--ids``, ``--limit``), the
model's probabilities (``--save-probabilities``) and where the model runs (``--device``)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from lungseg.core import imaging
from lungseg.core.config import EvaluateConfig, ResourceConfig, TrainConfig
from lungseg.core.errors import UserError
from lungseg.core.layout import MANIFEST_FILE, SEGMENT_TABLE
from lungseg.io import catalog, storage
from lungseg.jobs.evaluate import run_evaluation
from lungseg.jobs.segment import plan_segmentation, run_segmentation
from lungseg.jobs.train import run_training
from lungseg.stages import pipeline
from lungseg.stages.pipeline import Cluster
from tests.conftest import SAMPLE_IDS, copy_sample, labelled_config


def _ids_file(folder: str = "") -> str:
    """Three ids, one as a path relative to the input root (inside ``folder``)."""
    relative = f"{folder}{SAMPLE_IDS[1]}.png"
    return f"# chosen by hand\n\n{SAMPLE_IDS[3]}\n  {relative}  \n{SAMPLE_IDS[5]}\n"


def _lungseg(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lungseg", *argv],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=cwd,
    )


def test_ids_file_lines_are_ids_or_relative_paths_and_limit_takes_the_first(tmp_path):
    root = copy_sample(tmp_path / "data", SAMPLE_IDS[:8], masks=False)
    (tmp_path / "ids.txt").write_text(_ids_file("images/"))
    wanted = catalog.read_ids(str(tmp_path / "ids.txt"), catalog.DEFAULT_STORE)
    assert wanted == (SAMPLE_IDS[3], f"images/{SAMPLE_IDS[1]}.png", SAMPLE_IDS[5])
    found = catalog.find_cases(str(root))
    chosen = [SAMPLE_IDS[1], SAMPLE_IDS[3], SAMPLE_IDS[5]]  # in id order, as the catalog
    assert [c.id for c in found.select(wanted)] == chosen
    assert [c.id for c in found.select(wanted, limit=2)] == chosen[:2]
    assert [c.id for c in found.select(limit=3)] == SAMPLE_IDS[:3]
    assert found.select() == found.cases
    with pytest.raises(catalog.CatalogError) as unknown:
        found.select([*wanted, "nope", "images/other.png"], source="ids.txt")
    assert str(unknown.value) == (
        f"2 requested ids of ids.txt match no image under {root}: images/other.png, nope"
    )
    (tmp_path / "empty.txt").write_text("# nothing yet\n\n")
    with pytest.raises(catalog.CatalogError, match="no ids in it"):
        catalog.read_ids(str(tmp_path / "empty.txt"), catalog.DEFAULT_STORE)


def test_an_unknown_id_is_one_line_and_status_2_before_ray(tmp_path):
    copy_sample(tmp_path / "data", SAMPLE_IDS[:2])
    (tmp_path / "ids.txt").write_text(f"{SAMPLE_IDS[0]}\nMCUCXR_9999_0\n")
    done = _lungseg(
        "segment", "--input", "data/images", "--ids", "ids.txt", "--output", "out", cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"lungseg segment: error: 1 requested ids of ids.txt match no image under "
        f"{tmp_path}/data/images: MCUCXR_9999_0"
    ]
    assert not (tmp_path / "out").exists()
    assert "Ray" not in done.stdout


def test_limit_and_split_with_ids_are_checked_first():
    with pytest.raises(UserError, match="--limit must be at least 1, got 0"):
        EvaluateConfig(limit=0)
    with pytest.raises(UserError, match="--split and --ids exclude each other"):
        EvaluateConfig(split="s.json", ids="ids.txt")


@pytest.fixture(scope="module")
def subset_run(tmp_path_factory, local_ray, model_path):
    """A segment run of the ids file's images, limited to 2, with their probabilities."""
    root = copy_sample(tmp_path_factory.mktemp("data"), SAMPLE_IDS[:6])
    ids = tmp_path_factory.mktemp("ids") / "ids.txt"
    ids.write_text(_ids_file())
    out = tmp_path_factory.mktemp("runs") / "out"
    config = labelled_config(
        root, out, model=model_path, batch_size=2, ids=str(ids), limit=2, save_probabilities=True
    )
    return run_segmentation(config), config


def test_segment_does_only_the_chosen_images_and_records_the_choice(subset_run):
    result, config = subset_run
    out = Path(config.output)
    rows = pq.read_table(out / SEGMENT_TABLE).to_pylist()
    assert (result.images, result.failed) == (2, 0)
    assert [r["id"] for r in sorted(rows, key=lambda r: r["id"])] == [SAMPLE_IDS[1], SAMPLE_IDS[3]]
    assert sorted(p.stem for p in (out / "masks").iterdir()) == [SAMPLE_IDS[1], SAMPLE_IDS[3]]
    settings = json.loads((out / MANIFEST_FILE).read_text())["settings"]
    assert (settings["ids"], settings["limit"], settings["save_probabilities"]) == (
        config.ids,
        2,
        True,
    )
    assert (
        settings["ids_sha256"]
        == hashlib.sha256(f"{SAMPLE_IDS[1]}\n{SAMPLE_IDS[3]}".encode()).hexdigest()
    )


def test_probabilities_are_the_maps_the_masks_were_cut_from(subset_run):
    _, config = subset_run
    out = Path(config.output)
    for row in pq.read_table(out / SEGMENT_TABLE).to_pylist():
        assert row["probability"] == f"probabilities/{row['id']}.png"
        data = (out / row["probability"]).read_bytes()
        assert row["probability_fingerprint"] == storage.fingerprint(data)
        probability = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert (probability.shape, probability.dtype) == ((256, 256), np.uint8)
        small = imaging.postprocess(probability / 255.0, config.threshold)
        mask = imaging.resize_mask(small, row["height"], row["width"])
        written = cv2.imread(str(out / row["mask"]), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(mask.astype(np.uint8) * 255, written)


def test_resume_with_another_choice_is_refused_and_a_changed_map_is_redone(subset_run, tmp_path):
    _, config = subset_run
    for change, named in (
        ({"limit": 3}, "limit: 2 -> 3"),
        ({"limit": None}, "limit: 2 -> None"),
        ({"save_probabilities": False}, "save_probabilities: True -> False"),
    ):
        with pytest.raises(UserError, match="holds a run with other settings") as refused:
            run_segmentation(replace(config, resume=True, **change))
        assert named in str(refused.value)
    out = Path(config.output)
    changed = out / f"probabilities/{SAMPLE_IDS[3]}.png"
    changed.write_bytes(imaging.encode_image(np.zeros((256, 256), np.uint8)))
    resumed = run_segmentation(replace(config, resume=True))
    assert (resumed.images, resumed.resumed) == (2, 1)  # the changed map's row is done again
    row = {r["id"]: r for r in pq.read_table(out / SEGMENT_TABLE).to_pylist()}[SAMPLE_IDS[3]]
    assert row["probability_fingerprint"] == storage.fingerprint(changed.read_bytes())
    assert cv2.imread(str(changed), cv2.IMREAD_UNCHANGED).max() > 128


def test_evaluate_takes_the_same_choice(subset_run, tmp_path, model_path):
    _, config = subset_run
    evaluated = run_evaluation(
        EvaluateConfig(
            input=config.input,
            masks=config.masks,
            output=str(tmp_path / "eval"),
            model=model_path,
            batch_size=2,
            ids=config.ids,
            limit=1,
        )
    )
    assert evaluated["overall"]["images"] == 1
    assert [w["id"] for w in evaluated["worst"]] == [SAMPLE_IDS[1]]


@pytest.mark.parametrize(
    ("device", "on", "resolved"),
    [
        ("cpu", Cluster(2), "cpu"),
        ("auto", Cluster(2), "cpu"),
        ("auto", Cluster(16, gpus=2), "gpu"),
        ("gpu", Cluster(16, gpus=2), "gpu"),
        ("cpu", Cluster(16, gpus=2), "cpu"),
    ],
)
def test_device_is_made_concrete_on_the_cluster(device, on, resolved):
    resources = pipeline.resolve_device(ResourceConfig(device=device), on)
    assert resources == ResourceConfig(device=resolved)
    assert resources.use_gpu == (resolved == "gpu")


def test_device_gpu_without_gpus_is_refused():
    with pytest.raises(UserError) as refused:
        pipeline.resolve_device(ResourceConfig(device="gpu"), Cluster(2))
    assert str(refused.value) == (
        "--device gpu asks for GPUs, but this Ray cluster has none: use --device cpu or auto"
    )


@pytest.mark.usefixtures("local_ray")
def test_device_auto_resolves_to_cpu_here(tmp_path, model_path):
    root = copy_sample(tmp_path / "data", SAMPLE_IDS[:1])
    config = labelled_config(
        root, tmp_path / "out", model=model_path, resources=ResourceConfig(device="auto")
    )
    plan, (_, models) = plan_segmentation(config).placed()
    assert plan.config.resources.device == "cpu" and models.gpus == 0
    assert plan.config.precision in ("float32", "bfloat16")


@pytest.mark.timeout(240)
def test_segment_on_gpu_without_gpus_is_one_line_and_status_2_before_any_write(tmp_path):
    copy_sample(tmp_path / "data", SAMPLE_IDS[:1])
    done = _lungseg(
        "segment", "--input", "data/images", "--device", "gpu", "--output", "out", cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "lungseg segment: error: --device gpu asks for GPUs, but this Ray cluster has none: "
        "use --device cpu or auto"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("local_ray")
def test_training_on_gpu_without_gpus_is_refused_before_the_run_folder(tmp_path):
    copy_sample(tmp_path / "data", SAMPLE_IDS[:4])
    config = TrainConfig(
        data=str(tmp_path / "data"),
        output=str(tmp_path / "run"),
        resources=ResourceConfig(device="gpu"),
    )
    with pytest.raises(UserError, match="--device gpu asks for GPUs"):
        run_training(config)
    assert not (tmp_path / "run").exists()
