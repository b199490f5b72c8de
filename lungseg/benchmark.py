"""Side-by-side benchmarks: each Ray stage against the plain loop a user would write instead.

Every row is a ratio of two measurements taken in one run on the same inputs (real X-rays
replicated under new ids), the two sides alternating ``rounds`` times with each side's best
kept, because shared machines are noisy:

1. preprocessing: a single-process loop of the same decode + resize functions vs the Ray Data
   actor stage (:func:`lungseg.pipeline.preprocessed`), images/s;
2. inference: a loop of decode, preprocess, ``predict_on_batch``, post-process and mask writing
   vs :func:`lungseg.segment.run_segmentation` with the same model and batch size, images/s;
3. training: the second of two epochs (steady state: Ray Train's start-up and tracing left out)
   of ``model.fit`` on in-memory arrays vs :func:`lungseg.train.train_loop_per_worker` on Ray
   Train with one worker and the same arrays, seconds;
4. memory: the peak memory (PSS) of the whole Ray session (the driver and every process under
   it: GCS, raylet with the object store, workers) segmenting a small vs a large set, MiB.

The memory row needs a Ray started by this process (``ray.init()`` with no cluster running).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import ray
import ray.train
from ray.train.tensorflow import TensorflowTrainer

from lungseg import catalog, imaging, pipeline, segment, storage, train
from lungseg.config import (
    BenchmarkConfig,
    RecipeConfig,
    ResourceConfig,
    SegmentConfig,
    TrainConfig,
)
from lungseg.layout import OK
from lungseg.model import load_model
from lungseg.preprocess import Preprocess, case_records

RESULT_FILE = "benchmark.json"
TRAIN_LEARNING_RATE = 1e-3
"""Adam's learning rate on both sides of the training row."""
SAMPLE_SECONDS = 0.2
"""Interval of the memory sampler."""


@dataclass(frozen=True)
class Row:
    """One ratio: the Ray side against its baseline, measured in one run on the same inputs.

    Values are in ``unit``; ``*_cores`` are the CPU seconds of the whole session per wall
    second of each side's best run, ``profile`` the Ray side's top CPU consumers in it (the
    memory row: its top holders of memory at the peak).
    """

    stage: str
    baseline: str
    candidate: str
    unit: str
    baseline_value: float
    value: float
    ratio: float
    goal: str  # e.g. ">= 1.80" or "<= 1.10"
    met: bool
    baseline_cores: float
    cores: float
    profile: str
    note: str


@dataclass(frozen=True)
class BenchmarkResult:
    """The rows, the machine they ran on, the model's analytic cost, and the JSON file written."""

    rows: list[Row]
    machine: dict
    model: dict
    settings: dict
    json: str


def _row(
    stage: str,
    sides: tuple[str, str],
    unit: str,
    runs: Sequence[Measurement],
    values: tuple[float, float],
    goal: float,
    at_least: bool,
    note: str,
) -> Row:
    """A :class:`Row` of ``values[1] / values[0]``, which must be at least (``at_least``) or at
    most ``goal``."""
    ratio = values[1] / values[0]
    return Row(
        stage,
        *sides,
        unit,
        *values,
        ratio,
        f"{'>=' if at_least else '<='} {goal:.2f}",
        ratio >= goal if at_least else ratio <= goal,
        round(runs[0].cores, 2),
        round(runs[1].cores, 2),
        runs[1].profile(),
        note,
    )


def replicate(sources: Sequence[str], count: int, folder: Path) -> Path:
    """``count`` hard links (copies across file systems) of ``sources``, round-robin, in
    ``folder`` under new ids ``x000000`` ...; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        source = Path(sources[i % len(sources)])
        target = folder / f"x{i:06d}{source.suffix.lower()}"
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
    return folder


def conv_flops(model) -> int:
    """Floating-point operations (2 per multiply-add) of a Keras model's convolutions, per image.

    BatchNorm, activations, pooling and concatenation are left out: a few operations per
    activation, well under 1% of the convolutions of a U-Net.
    """
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2DTranspose):  # each input pixel scatters k*k*out
            _, height, width, channels = layer.input.shape
        elif isinstance(layer, keras.layers.Conv2D):  # each output pixel gathers k*k*in
            _, height, width, _ = layer.output.shape
            channels = layer.input.shape[-1]
        else:
            continue
        total += 2 * height * width * math.prod(layer.kernel_size) * channels * layer.filters
    return total


def matmul_gflops(n: int = 2048, repeats: int = 3) -> float:
    """This machine's attainable float32 GFLOP/s: the best of ``repeats`` NumPy n x n matmuls."""
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def session_processes(
    root: int | None = None, pss: bool = False
) -> dict[int, tuple[str, float, int]]:
    """``pid -> (title, CPU seconds, memory bytes)`` of process ``root`` (default: this one,
    titled ``driver``) and all its descendants; Ray workers by their ``ray::...`` title.

    Memory is the resident set size (RSS), or with ``pss`` the proportional set size:
    resident pages, those shared by n processes counted 1/n in each, so that a sum over
    processes counts Ray's shared-memory object store once (a sum of RSS counts it in the
    raylet and again in every worker that maps an object). PSS costs the kernel a walk of each
    process's page tables: tens of milliseconds per sample in a Ray session.
    """
    root = root or os.getpid()
    stats: dict[int, list[str]] = {}
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # fields[0] is field 3, state
            except (OSError, IndexError):  # gone meanwhile
                continue
            stats[int(name)] = fields
            children.setdefault(int(fields[1]), []).append(int(name))
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    found, pending = {}, [root]
    while pending:
        pid = pending.pop()
        pending.extend(children.get(pid, ()))
        if pid in stats:
            fields = stats[pid]
            cpu = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
            memory = _pss(pid) if pss else None
            title = "driver" if pid == root else _title(pid)
            found[pid] = (title, cpu, int(fields[21]) * page if memory is None else memory)
    return found


def _pss(pid: int) -> int | None:
    """A process's proportional set size in bytes, None where the kernel does not tell."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def _title(pid: int) -> str:
    """A process's Ray title (``MapWorker(MapBatches(Preprocess))``), else the Python script
    it runs, else its command name (``raylet``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        if args and args[0].startswith("ray::"):
            return args[0].split()[0].removeprefix("ray::")
        script = next((a for a in args[1:] if a.endswith(".py") and " " not in a), None)
        if script:
            return os.path.basename(script)
        with open(f"/proc/{pid}/comm") as f:  # 15 characters at most
            return f.read().strip().removeprefix("ray::") or "?"
    except OSError:  # gone meanwhile
        return "?"


class SessionMonitor:
    """Context manager sampling :func:`session_processes` every ``SAMPLE_SECONDS``: the peak
    of the summed memory (PSS with ``pss``, else RSS), that peak by process title, and the CPU
    seconds spent meanwhile by process title."""

    def __init__(self, pss: bool = False) -> None:
        self.pss = pss
        self.peak_memory = 0
        self.peak_by_title: Counter[str] = Counter()
        self.cpu: Counter[str] = Counter()
        self._last: dict[int, float] | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        processes = session_processes(pss=self.pss)
        total = sum(rss for _, _, rss in processes.values())
        if total > self.peak_memory:
            self.peak_memory = total
            self.peak_by_title = Counter()
            for title, _, rss in processes.values():
                self.peak_by_title[title] += rss
        last = self._last
        for pid, (title, cpu, _) in processes.items():
            # A process born after the first sample spent all its CPU time in the window.
            self.cpu[title] += cpu - (cpu if last is None else last.get(pid, 0.0))
        self._last = {pid: cpu for pid, (_, cpu, _) in processes.items()}

    def _run(self) -> None:
        while not self._done.wait(SAMPLE_SECONDS):
            self._sample()

    def __enter__(self) -> SessionMonitor:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self._sample()


@dataclass(frozen=True)
class Measurement:
    """One run of one side: its wall seconds, its figure (seconds unless the side reports
    another, e.g. one epoch's), the session's CPU seconds by process title, its peak memory
    (PSS, see :func:`session_processes`) and that peak by process title."""

    seconds: float
    value: float
    cpu: dict[str, float]
    peak_memory: int
    memory: dict[str, int]

    @property
    def cores(self) -> float:
        """CPU seconds of the whole session per wall second."""
        return sum(self.cpu.values()) / self.seconds

    def profile(self, top: int = 4) -> str:
        """The ``top`` CPU consumers, e.g. ``driver 3.1 s, raylet 0.4 s``."""
        ranked = sorted(self.cpu.items(), key=lambda item: -item[1])[:top]
        return ", ".join(f"{title} {seconds:.1f} s" for title, seconds in ranked)

    def memory_profile(self, top: int = 4) -> str:
        """The ``top`` holders of memory at the peak, e.g. ``raylet 2,100 MiB, driver 900 MiB``."""
        ranked = sorted(self.memory.items(), key=lambda item: -item[1])[:top]
        return ", ".join(f"{title} {size / 2**20:,.0f} MiB" for title, size in ranked)


def _measure(run: Callable[[], float | None], pss: bool = False) -> Measurement:
    """Run ``run`` under a :class:`SessionMonitor`; its figure is what it returns, else the
    wall seconds."""
    with SessionMonitor(pss) as monitor:
        started = time.perf_counter()
        value = run()
        seconds = time.perf_counter() - started
    cpu = {title: round(t, 2) for title, t in monitor.cpu.items() if t > 0}
    return Measurement(
        seconds,
        seconds if value is None else value,
        cpu,
        monitor.peak_memory,
        dict(monitor.peak_by_title),
    )


def _alternate(rounds: int, sides: dict[str, Callable[[], float | None]]) -> list[Measurement]:
    """Measure each side ``rounds`` times in alternation; each side's best (smallest figure)."""
    best: dict[str, Measurement] = {}
    for round_ in range(rounds):
        for name, run in sides.items():
            m = _measure(run)
            if name not in best or m.value < best[name].value:
                best[name] = m
            print(f"  round {round_ + 1} {name}: {m.value:.2f} s, {m.cores:.2f} cores, "
                  f"{m.profile()}", flush=True)  # fmt: skip
    return list(best.values())


def _plain_preprocess(paths: Sequence[str], size: int) -> None:
    """The baseline: the Preprocess actor's decode, normalise and resize in a plain loop."""
    for path in paths:
        imaging.resize_image(imaging.load_image(Path(path).read_bytes(), path), size)


def _ray_preprocess(folder: Path, size: int) -> None:
    """The Ray Data actor stage with the segment job's actors and CPU shares, drained."""
    cases = catalog.find_cases(str(folder)).cases
    resources = ResourceConfig()
    budget = pipeline.CpuBudget.for_cluster(
        SegmentConfig().segment_actors, resources.preprocess_actors, None, resources.actor_cpus
    )
    data = pipeline.preprocessed(cases, size, resources.preprocess_actors, budget.actor)
    ok = sum(int((b["status"] == OK).sum()) for b in data.iter_batches(batch_size=None))
    if ok != len(cases):
        raise RuntimeError(f"{len(cases) - ok} of {len(cases)} images failed to preprocess")


def _plain_segment(paths: Sequence[str], model_uri: str, output: Path, batch_size: int) -> None:
    """The baseline: load the model, then decode, preprocess, predict, post-process and write
    the masks batch by batch, in one process."""
    model = load_model(Path(model_uri).read_bytes())
    size = int(model.input_shape[1])
    output.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = [imaging.load_image(Path(p).read_bytes(), p) for p in chunk]
        batch = np.stack([imaging.resize_image(image, size) for image in images])
        probability = np.asarray(model.predict_on_batch(batch[..., None]))[..., 0]
        for path, image, p in zip(chunk, images, probability, strict=True):
            mask = imaging.resize_mask(imaging.postprocess(p), *image.shape)
            (output / f"{Path(path).stem}.png").write_bytes(imaging.encode_png(mask))


def _ray_segment(config: BenchmarkConfig, folder: Path, output: Path) -> None:
    """The segment job on ``folder``, with the benchmark's model, batch size and device."""
    result = segment.run_segmentation(
        SegmentConfig(
            model=config.model,
            input=str(folder),
            output=str(output),
            batch_size=config.batch_size,
            resources=ResourceConfig(use_gpu=config.use_gpu),
        )
    )
    if result.failed:
        raise RuntimeError(f"{result.failed} of {result.images} images failed: {result.table}")


def _training_arrays(config: BenchmarkConfig) -> tuple[np.ndarray, np.ndarray]:
    """The labelled inputs through :class:`lungseg.preprocess.Preprocess` (in this process),
    repeated to ``train_images``."""
    cases = catalog.find_cases(config.input).labelled
    if not cases:
        raise ValueError(f"the training row needs X-rays with masks under {config.input}")
    records = case_records(cases)
    batch = {key: [r[key] for r in records] for key in records[0]}
    out = Preprocess(config.train_model.size)(batch)
    failed = [str(e) for e in out["error"] if e]
    if failed:
        raise RuntimeError(f"{len(failed)} training images failed: {failed[0]}")
    picks = np.arange(config.train_images) % len(cases)
    return out["image"][picks], out["mask"][picks]


def _plain_epoch(config: BenchmarkConfig, images: np.ndarray, masks: np.ndarray) -> float:
    """Seconds of the second of two epochs of ``model.fit`` with the training job's loss, fed
    float32 arrays (uint8 ones cost ``fit`` about 40% more per step here)."""
    import keras

    from lungseg.model import bce_dice_loss, build_unet

    keras.utils.set_random_seed(0)
    model = build_unet(**asdict(config.train_model))
    model.compile(optimizer=keras.optimizers.Adam(TRAIN_LEARNING_RATE), loss=bce_dice_loss)
    stamps: list[float] = []
    clock = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda *_: stamps.append(time.perf_counter()),
        on_epoch_end=lambda *_: stamps.append(time.perf_counter()),
    )
    x, y = (a[..., None].astype(np.float32) for a in (images, masks))
    model.fit(x, y, config.batch_size, 2, verbose=0, callbacks=[clock])
    return stamps[3] - stamps[2]


def _ray_epoch(config: BenchmarkConfig, images: np.ndarray, masks: np.ndarray, work: Path) -> float:
    """Seconds of the second of two epochs of the training job's loop on Ray Train with one
    worker, as the worker measured them (its ``seconds``: training steps, checkpointing left
    out as it is from ``model.fit``)."""
    data = ray.data.from_items(
        [{"image": x, "mask": y} for x, y in zip(images, masks, strict=True)],
        override_num_blocks=max(1, len(images) // (4 * config.batch_size)),
    )
    folder = Path(tempfile.mkdtemp(dir=work, prefix="train-"))
    trainer = TensorflowTrainer(
        train.train_loop_per_worker,
        train_loop_config=train.loop_config(
            TrainConfig(
                workers=1,
                recipe=RecipeConfig(
                    model=config.train_model,
                    epochs=2,
                    batch_size=config.batch_size,
                    learning_rate=TRAIN_LEARNING_RATE,
                    seed=0,
                    augment=False,
                    patience=0,
                ),
            )
        ),
        scaling_config=ray.train.ScalingConfig(
            num_workers=1,
            resources_per_worker={"CPU": pipeline.CpuBudget.for_cluster(1, 0).worker},
        ),
        datasets={"train": data, "val": data.limit(0)},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(name="run", storage_path=str(folder)),
    )
    return trainer.fit().metrics["seconds"]


def _preprocessing_row(config: BenchmarkConfig, folder: Path, size: int) -> Row:
    paths = sorted(str(p) for p in folder.iterdir())
    runs = _alternate(
        config.rounds,
        {
            "plain loop": lambda: _plain_preprocess(paths, size),
            "Ray Data": lambda: _ray_preprocess(folder, size),
        },
    )
    cores = float(ray.cluster_resources().get("CPU", 1.0))
    actors = ResourceConfig().preprocess_actors
    return _row(
        "preprocessing",
        ("single-process loop", f"Ray Data, {actors} actors"),
        "images/s",
        runs,
        (len(paths) / runs[0].seconds, len(paths) / runs[1].seconds),
        0.9 * cores,
        True,
        f"{len(paths)} images to {size}x{size}, tasks of "
        f"{pipeline.task_batch(len(paths), actors)}, goal 0.9 x "
        f"{cores:g} cores",
    )


def _inference_row(config: BenchmarkConfig, folder: Path, work: Path, flops: int) -> Row:
    paths = sorted(str(p) for p in folder.iterdir())
    runs = _alternate(
        config.rounds,
        {
            "plain loop": lambda: _plain_segment(
                paths, config.model, work / "plain", config.batch_size
            ),
            "Ray pipeline": lambda: _ray_segment(config, folder, work / "ray"),
        },
    )
    rates = (len(paths) / runs[0].seconds, len(paths) / runs[1].seconds)
    return _row(
        "inference",
        ("single-process loop", "segment pipeline"),
        "images/s",
        runs,
        rates,
        1.0,
        True,
        f"{len(paths)} images, batch {config.batch_size}, {'GPU' if config.use_gpu else 'CPU'}, "
        f"masks written, model loading included; {flops / 1e9:.2f} GFLOPs/image: "
        f"{rates[0] * flops / 1e9:.0f} vs {rates[1] * flops / 1e9:.0f} GFLOP/s",
    )


def _training_row(config: BenchmarkConfig, work: Path) -> Row:
    images, masks = _training_arrays(config)
    runs = _alternate(
        config.rounds,
        {
            "model.fit": lambda: _plain_epoch(config, images, masks),
            "Ray Train": lambda: _ray_epoch(config, images, masks, work),
        },
    )
    size = config.train_model.size
    return _row(
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
    )


def _memory_run(
    config: BenchmarkConfig, sources: Sequence[str], count: int, work: Path
) -> Measurement:
    """Segment ``count`` copies of ``sources`` under a :class:`SessionMonitor`."""
    folder, output = work / f"memory-{count}", work / f"memory-out-{count}"
    replicate(sources, count, folder)
    run = _measure(lambda: _ray_segment(config, folder, output), pss=True)
    print(
        f"  {count} images: {run.seconds:.0f} s, peak {run.peak_memory / 2**20:.0f} MiB: "
        f"{run.memory_profile(6)}",
        flush=True,
    )
    shutil.rmtree(folder)
    shutil.rmtree(output)
    return run


def _memory_row(config: BenchmarkConfig, sources: Sequence[str], work: Path) -> Row:
    runs = [_memory_run(config, sources, count, work) for count in config.memory_images]
    small, large = config.memory_images
    row = _row(
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
    )
    return replace(row, profile=f"at the peak: {runs[1].memory_profile()}")


def _machine() -> dict:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "")
    import tensorflow as tf

    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "ray_cpus": float(ray.cluster_resources().get("CPU", 0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "matmul_gflops": round(matmul_gflops(), 1),
        "ray": ray.__version__,
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
    }


def run_benchmark(config: BenchmarkConfig) -> BenchmarkResult:
    """Run the chosen stages side by side, print progress, write ``output/benchmark.json``."""
    if storage.is_remote(config.input) or storage.is_remote(config.output):
        raise ValueError("the benchmark reads and writes local folders only")
    sources = [case.image for case in catalog.find_cases(config.input).cases]
    machine = _machine()
    model = load_model(Path(config.model).read_bytes())
    size, flops = int(model.input_shape[1]), conv_flops(model)
    work = Path(tempfile.mkdtemp(prefix="lungseg-benchmark-"))
    rows = []
    try:
        folder = replicate(sources, config.images, work / "images")
        for stage in config.stages:
            print(f"{stage}:", flush=True)
            if stage == "preprocessing":
                rows.append(_preprocessing_row(config, folder, size))
            elif stage == "inference":
                rows.append(_inference_row(config, folder, work, flops))
            elif stage == "training":
                rows.append(_training_row(config, work))
            else:
                rows.append(_memory_row(config, sources, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(config.output, exist_ok=True)
    result = BenchmarkResult(
        rows=rows,
        machine=machine,
        model={
            "model": config.model,
            "input": f"{size}x{size}",
            "parameters": model.count_params(),
            "gflops_per_image": round(flops / 1e9, 3),
        },
        settings=config.to_dict(),
        json=os.path.join(config.output, RESULT_FILE),
    )
    with open(result.json, "w") as f:
        json.dump({k: v for k, v in asdict(result).items() if k != "json"}, f, indent=2)
    return result


def format_table(result: BenchmarkResult) -> str:
    """The rows as a Markdown table, then the Ray sides' CPU profiles, the machine, the model."""
    lines = [
        "| stage | baseline | Ray | ratio | goal | met | cores used | conditions |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result.rows:
        lines.append(
            f"| {r.stage} | {r.baseline}: {r.baseline_value:.1f} {r.unit} | {r.candidate}: "
            f"{r.value:.1f} {r.unit} | {r.ratio:.2f} | {r.goal} | {'yes' if r.met else 'no'} "
            f"| {r.baseline_cores:.2f} / {r.cores:.2f} | {r.note} |"
        )
    lines.append("")
    lines.extend(f"Ray side, {r.stage}: {r.profile}" for r in result.rows)
    m, model = result.machine, result.model
    lines.append(
        f"machine: {m['cpu']}, {m['cores']} cores ({m['ray_cpus']:g} for Ray), "
        f"{m['memory_gib']} GiB, GPUs: {', '.join(m['gpus']) or 'none'}; float32 matmul "
        f"{m['matmul_gflops']:.0f} GFLOP/s; Ray {m['ray']}, TensorFlow {m['tensorflow']}"
    )
    lines.append(
        f"model: {model['input']} input, {model['parameters']:,} parameters, "
        f"{model['gflops_per_image']:.2f} GFLOPs/image (convolutions)"
    )
    return "\n".join(lines)
