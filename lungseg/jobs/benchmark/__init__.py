"""Side-by-side benchmarks: each Ray stage against the plain loop a user would write instead.

Every row is a ratio of two measurements taken in one run on the same inputs (real X-rays
replicated under new ids, or resized to hospital images), the two sides alternating ``rounds``
times with each side's best kept, because shared machines are noisy:

1. hospital images (2048 px, at each of ``films``' counts), whole process: the loop and the
   tf.data pipeline a Keras user writes, each as its own process
   (:mod:`lungseg.jobs.benchmark.baselines`), against ``lungseg segment`` as its own process,
   Ray's start included; and in-process (Ray already running here), images/s;
2. inference, 512 px images, whole process, images/s;
3. preprocessing: the Preprocess steps in a loop against the Ray Data tasks, images/s;
4. training: the second of two epochs of ``model.fit`` against the training job's loop on Ray
   Train with one worker, seconds;
5. memory: the peak memory (PSS) of the whole Ray session segmenting a small vs a large set.

Beside every rate stands the ceiling the measured cost of each step allows on the machine's
cores (:class:`lungseg.jobs.benchmark.baselines.StageCosts`), and the share of it reached. The
memory row needs a Ray started by this process (``ray.init()`` with no cluster running).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import ray
import ray.train

from lungseg.core.config import (
    BenchmarkConfig,
    RecipeConfig,
    ResourceConfig,
    SegmentConfig,
    TrainConfig,
)
from lungseg.core.layout import OK
from lungseg.io import catalog
from lungseg.jobs import train
from lungseg.jobs.benchmark.baselines import (
    TRAIN_LEARNING_RATE,
    StageCosts,
    conv_flops,
    matmul_gflops,
    plain_epoch,
    plain_preprocess,
    plain_segment,
    replicate,
    stage_costs,
    training_arrays,
)
from lungseg.jobs.benchmark.sampler import (
    SAMPLE_SECONDS,
    Measurement,
    alternate,
    measure,
    session_processes,
)
from lungseg.jobs.benchmark.table import BenchmarkResult, Row, format_table, make_row
from lungseg.stages import pipeline

__all__ = [
    "BenchmarkResult",
    "Row",
    "conv_flops",
    "format_table",
    "replicate",
    "run_benchmark",
    "session_processes",
]

logger = logging.getLogger(__name__)

RESULT_FILE = "benchmark.json"


def _segment_config(config: BenchmarkConfig, folder: Path, output: Path) -> SegmentConfig:
    return SegmentConfig(
        model=config.model,
        input=str(folder),
        output=str(output),
        batch_size=config.batch_size,
        resources=ResourceConfig(device="gpu" if config.use_gpu else "cpu"),
        overwrite=True,
    )


def _ray_segment(config: BenchmarkConfig, folder: Path, output: Path) -> None:
    """The segment job on ``folder`` in this process (Ray running)."""
    from lungseg.jobs.segment import run_segmentation

    result = run_segmentation(_segment_config(config, folder, output))
    if result.failed:
        raise RuntimeError(f"{result.failed} of {result.images} images failed: {result.table}")


def _process(*command: str) -> None:
    """Run a command as a process of its own (under the session monitor); fail loudly."""
    env = {**os.environ, "RAY_ADDRESS": "local", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr[-2000:]}")


def _whole_process_sides(config: BenchmarkConfig, folder: Path, work: Path) -> dict:
    """The loop, the tf.data pipeline and the segment job, each as a process of its own:
    interpreter, imports, model loading and (for the job) Ray's start included."""
    sides = {}
    for peer, name in (("loop", "plain loop"), ("tfdata", "tf.data pipeline")):
        command = [sys.executable, "-m", "lungseg.jobs.benchmark.baselines", peer, str(folder)]
        command += [str(work / f"{folder.name}-{peer}"), config.model, str(config.batch_size)]
        sides[f"{name}, own process"] = partial(_process, *command)
    job = [sys.executable, "-m", "lungseg", "segment", "-q", "--overwrite", "--input"]
    job += [str(folder), "--output", str(work / f"{folder.name}-ray"), "--model", config.model]
    job += ["--batch-size", str(config.batch_size)]
    job += ["--device", "gpu" if config.use_gpu else "cpu"]
    sides["lungseg segment, own process"] = partial(_process, *job)
    return sides


TFDATA_GOAL = {400: 0.9, 2000: 1.0}
"""The segment job's rate over the tf.data pipeline's, whole process, by image count: Ray's
fixed costs weigh more on fewer images. A row takes the goal of the largest count at or below
its own (the smallest count's below it)."""


def tfdata_goal(count: int) -> float:
    below = [goal for n, goal in sorted(TFDATA_GOAL.items()) if n <= count]
    return below[-1] if below else min(TFDATA_GOAL.values())


def _film_rows(
    config: BenchmarkConfig,
    name: str,
    folder: Path,
    work: Path,
    costs: StageCosts,
    goal: float,
    whole: list[Measurement],
) -> list[Row]:
    """The whole-process rows of ``folder``'s images (the job against the loop and against the
    tf.data pipeline: ``whole``, one alternation of the three), and for the hospital images the
    in-process row too (Ray running here)."""
    cores = pipeline.cluster().cpus
    count = len(list(folder.iterdir()))
    ceiling = costs.ceiling(cores)
    loop, tfdata, job = whole
    note = (
        f"{count} images, batch {config.batch_size}, masks written at full size; each side "
        f"a process of its own (the job's Ray start, about {_ray_start_seconds():.0f} s here, "
        "included)"
    )
    rows = [
        make_row(
            f"{name}{suffix}",
            (peer, "lungseg segment"),
            "images/s",
            (runs, job),
            (count / runs.seconds, count / job.seconds),
            row_goal,
            True,
            note,
            cores,
            ceiling,
        )
        for suffix, peer, runs, row_goal in (
            (", whole process", "plain loop", loop, goal),
            (", whole process, tf.data", "tf.data pipeline", tfdata, tfdata_goal(count)),
        )
    ]
    if name.startswith("hospital"):
        paths = sorted(str(p) for p in folder.iterdir())
        runs = alternate(
            config.rounds,
            {
                "plain loop, in process": lambda: plain_segment(
                    paths, config.model, work / f"{folder.name}-inproc-loop", config.batch_size
                ),
                "segment job, in process": lambda: _ray_segment(
                    config, folder, work / f"{folder.name}-inproc"
                ),
            },
        )
        rates = (count / runs[0].seconds, count / runs[1].seconds)
        rows.append(
            make_row(
                f"{name}, in process",
                ("plain loop", "segment job, Ray running"),
                "images/s",
                runs,
                rates,
                goal,
                True,
                f"{count} images; Ray up in this process (the loop: TensorFlow imported, the "
                "model loaded each run; the job: its actors started, its model loaded, each run)",
                cores,
                ceiling,
            )
        )
    return rows


_RAY_START: list[float] = []


def _ray_start_seconds() -> float:
    """Seconds a local ``ray.init()`` and ``shutdown`` take here (measured once, in a process
    of its own)."""
    if not _RAY_START:
        code = (
            "import time, ray; t = time.perf_counter(); ray.init(include_dashboard=False, "
            "log_to_driver=False); ray.shutdown(); print(time.perf_counter() - t)"
        )
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={**os.environ, "RAY_ADDRESS": "local"},
        )
        if done.returncode or not done.stdout.strip():
            raise RuntimeError(f"timing ray.init failed ({done.returncode}): {done.stderr[-2000:]}")
        _RAY_START.append(float(done.stdout.strip().splitlines()[-1]))
    return _RAY_START[0]


def _ray_preprocess(folder: Path, size: int) -> None:
    """The Ray Data preprocessing tasks given the whole cluster (as clean and the training
    data stage have it), drained to its statuses alone (the images go on, not to the driver)."""
    cases = catalog.find_cases(str(folder)).cases
    pool = pipeline.preprocess_pool(pipeline.cluster())
    data = pipeline.preprocessed(cases, size, pool).select_columns(["status"])
    ok = sum(int((b["status"] == OK).sum()) for b in data.iter_batches(batch_size=None))
    if ok != len(cases):
        raise RuntimeError(f"{len(cases) - ok} of {len(cases)} images failed to preprocess")


def _preprocessing_row(config: BenchmarkConfig, folder: Path, size: int) -> Row:
    paths = sorted(str(p) for p in folder.iterdir())
    runs = alternate(
        config.rounds,
        {
            "plain loop": lambda: plain_preprocess(paths, size),
            "Ray Data": lambda: _ray_preprocess(folder, size),
        },
    )
    cores = pipeline.cluster().cpus
    pool = pipeline.preprocess_pool(pipeline.Cluster(cores))
    per_image = runs[0].cpu_seconds / len(paths) * 1000
    return make_row(
        "preprocessing",
        ("single-process loop", f"Ray Data, {pool.max_size} tasks at once"),
        "images/s",
        runs,
        (len(paths) / runs[0].seconds, len(paths) / runs[1].seconds),
        1.8,
        True,
        f"{len(paths)} images to {size}x{size}, tasks of "
        f"{pipeline.task_batch(len(paths), pool.max_size)}; the loop's {per_image:.2f} "
        f"core-ms per image on {cores:g} cores",
        cores,
        cores * 1000 / per_image,
    )


def _ray_epoch(config: BenchmarkConfig, images, masks, work: Path) -> float:
    """Seconds of the second of two epochs of the training job's loop on Ray Train with one
    worker, as the worker measured them (its ``seconds``: training steps, checkpointing left
    out as it is from ``model.fit``)."""
    from ray.train.tensorflow import TensorflowTrainer

    data = ray.data.from_items(
        [{"image": x, "mask": y} for x, y in zip(images, masks, strict=True)],
        override_num_blocks=max(1, len(images) // (4 * config.batch_size)),
    )
    folder = Path(tempfile.mkdtemp(dir=work, prefix="train-"))
    recipe = RecipeConfig(
        model=config.train_model,
        epochs=2,
        batch_size=config.batch_size,
        learning_rate=TRAIN_LEARNING_RATE,
        augment=False,
        patience=0,
    )
    on = pipeline.cluster()
    trainer = TensorflowTrainer(
        train.train_loop_per_worker,
        train_loop_config=train.loop_config(TrainConfig(workers=1, recipe=recipe)),
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, resources_per_worker={"CPU": pipeline.train_worker_cpus(on, 1)}
        ),
        datasets={"train": data, "val": data.limit(0)},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(name="run", storage_path=str(folder)),
    )
    return trainer.fit().metrics["seconds"]


def _training_row(config: BenchmarkConfig, work: Path) -> Row:
    images, masks = training_arrays(config.input, config.train_model.size, config.train_images)
    runs = alternate(
        config.rounds,
        {
            "model.fit": lambda: plain_epoch(config.train_model, images, masks, config.batch_size),
            "Ray Train": lambda: _ray_epoch(config, images, masks, work),
        },
    )
    size = config.train_model.size
    return make_row(
        "training",
        ("model.fit, one process", "Ray Train, 1 worker"),
        "s/epoch",
        runs,
        (runs[0].value, runs[1].value),
        1.10,
        False,
        f"{len(images)} images of {size}x{size} in memory, batch {config.batch_size}; the "
        f"second of 2 epochs, start-up and checkpointing excluded (whole runs: "
        f"{runs[0].seconds:.0f} vs {runs[1].seconds:.0f} s)",
        pipeline.cluster().cpus,
    )


def _memory_run(
    config: BenchmarkConfig, sources: Sequence[str], count: int, work: Path
) -> Measurement:
    """Segment ``count`` copies of ``sources`` under a :class:`SessionMonitor`."""
    folder, output = work / f"memory-{count}", work / f"memory-out-{count}"
    replicate(sources, count, folder)

    run = measure(lambda: _ray_segment(config, folder, output), pss=True)
    logger.info(
        "  %d images: %.0f s, peak %.0f MiB: %s",
        count,
        run.seconds,
        run.peak_memory / 2**20,
        run.memory_profile(6),
    )
    shutil.rmtree(folder)
    shutil.rmtree(output)
    return run


def _memory_row(config: BenchmarkConfig, sources: Sequence[str], work: Path) -> Row:
    runs = [_memory_run(config, sources, count, work) for count in config.memory_images]
    small, large = config.memory_images
    row = make_row(
        "memory",
        (f"{small} images", f"{large} images"),
        "MiB",
        runs,
        (runs[0].peak_memory / 2**20, runs[1].peak_memory / 2**20),
        1.2,
        False,
        "peak PSS summed over the driver and every process under it (GCS, raylet with the "
        f"object store, workers), sampled every {SAMPLE_SECONDS:g} s, segment pipeline "
        f"({runs[0].seconds:.0f} and {runs[1].seconds:.0f} s)",
        pipeline.cluster().cpus,
    )
    return replace(row, profile=f"at the peak: {runs[1].memory_profile()}")


def _machine() -> dict:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "")
    import tensorflow as tf

    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "ray_cpus": pipeline.cluster().cpus,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "matmul_gflops": round(matmul_gflops(), 1),
        "ray": ray.__version__,
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
    }


def run_benchmark(
    config: BenchmarkConfig, start_ray: Callable[[], None] = pipeline.attach
) -> BenchmarkResult:
    """Run the chosen stages side by side, log progress, write ``output/benchmark.json``.

    Every whole-process side runs first, with no Ray in this process: an idle local Ray beside
    ``lungseg segment`` (which starts its own) made it 3-4 s slower on 400 hospital images (29.2
    and 30.4 s against 26.2 and 26.2, 2026-12-04). Then ``start_ray`` (the CLI's starts a local
    Ray, whose processes the memory row measures) for the rows that need Ray here."""
    from lungseg.model.unet import load_model

    if any(uri.startswith("s3://") for uri in (config.input, config.output)):
        raise ValueError("the benchmark reads and writes local folders only")
    config = replace(config, batch_size=pipeline.resolve_batch(config.batch_size, config.use_gpu))
    sources = [case.image for case in catalog.find_cases(config.input).cases]
    model = load_model(Path(config.model).read_bytes())
    size, flops = int(model.input_shape[1]), conv_flops(model)
    precision = pipeline.resolve_precision(SegmentConfig().precision, config.use_gpu)
    work = Path(tempfile.mkdtemp(prefix="lungseg-benchmark-"))
    rows, costs = [], {}
    try:
        films = {
            "hospital": {
                f"hospital images ({config.film_size} px), {count:,}": (
                    replicate(sources, count, work / f"hospital-{count}", config.film_size),
                    1.2,
                )
                for count in config.films
            },
            "inference": {
                "inference (512 px images)": (
                    replicate(sources, config.images, work / "films"),
                    1.0,
                )
            },
        }
        whole, piped = {}, {}
        for stage in config.stages:
            for name, (folder, _) in films.get(stage, {}).items():
                logger.info("%s, each side a process of its own:", name)
                sample = sorted(str(p) for p in folder.iterdir())[: 4 * config.batch_size]
                measured = {
                    side: stage_costs(sample, config.model, config.batch_size, p, work / "c", job)
                    for side, p, job in (("pipeline", precision, True), ("loop", "float32", False))
                }
                costs[name] = {side: c.to_dict() for side, c in measured.items()}
                piped[name] = measured["pipeline"]
                sides = _whole_process_sides(config, folder, work)
                whole[name] = alternate(config.rounds, sides)
                _save_so_far(config, costs, whole, list(sides))
        if whole:
            _ray_start_seconds()  # timed once for the rows' notes, with no Ray running beside it
        start_ray()
        machine = _machine()
        for stage in config.stages:
            logger.info("%s:", stage)
            if stage in films:
                for name, (folder, goal) in films[stage].items():
                    rows.extend(
                        _film_rows(config, name, folder, work, piped[name], goal, whole[name])
                    )
            elif stage == "preprocessing":
                folder = replicate(sources, config.preprocess_images, work / "preprocessing")
                rows.append(_preprocessing_row(config, folder, size))
            elif stage == "training":
                rows.append(_training_row(config, work))
            else:
                rows.append(_memory_row(config, sources, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = BenchmarkResult(
        rows=rows,
        costs=costs,
        machine=machine,
        model={
            "model": config.model,
            "input": f"{size}x{size}",
            "parameters": model.count_params(),
            "gflops_per_image": round(flops / 1e9, 3),
            "precision": precision,
        },
        settings=config.to_dict(),
        json=os.path.join(config.output, RESULT_FILE),
    )
    _write_result(config, {k: v for k, v in asdict(result).items() if k != "json"}, True)
    return result


def _save_so_far(
    config: BenchmarkConfig, costs: dict, whole: dict[str, list[Measurement]], sides: list[str]
) -> None:
    """What is measured so far into ``output/benchmark.json``, marked ``"complete": false``:
    the step costs and each whole-process side's best round (``whole``: by image set, in the
    order of ``sides``), so that a run stopped before its Ray rows (an hour at 400 and 2,000
    films) keeps them. The finished run replaces it."""
    rounds = {
        name: {
            side: {"seconds": m.value, "cores": round(m.cores, 2), "profile": m.profile()}
            for side, m in zip(sides, measured, strict=True)
        }
        for name, measured in whole.items()
    }
    so_far = {"costs": costs, "whole_process": rounds, "settings": config.to_dict()}
    _write_result(config, so_far, False)


def _write_result(config: BenchmarkConfig, result: dict, complete: bool) -> None:
    """``result`` into ``output/benchmark.json``, with whether the run finished."""
    os.makedirs(config.output, exist_ok=True)
    with open(os.path.join(config.output, RESULT_FILE), "w") as f:
        json.dump(result | {"complete": complete}, f, indent=2)
