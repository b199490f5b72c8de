"""The plain loops and the tf.data pipeline a user would write instead of lungseg's Ray jobs,
the inputs they run on, and the cost of each step of segmenting one image (the ceiling a
pipeline could reach).

``python -m lungseg.jobs.benchmark.baselines loop|tfdata FOLDER OUTPUT MODEL BATCH`` runs the
segmenting loop or the tf.data pipeline as a process of its own, to time it whole (imports and
model loading included) beside the job.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from lungseg.core import imaging, qc
from lungseg.core.config import SegmentConfig
from lungseg.jobs import segment
from lungseg.model import modelfile

TRAIN_LEARNING_RATE = 1e-3
"""Adam's learning rate on both sides of the training row."""


def replicate(sources: Sequence[str], count: int, folder: Path, size: int | None = None) -> Path:
    """``count`` files in ``folder`` under new ids ``x000000`` ..., the ``sources`` round-robin:
    hard links (copies across file systems), or with ``size`` the sources resized to ``size``
    pixels a side (cubic) and saved once as 8-bit PNGs, then linked. Returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if size is not None:
        resized = folder.parent / f"{folder.name}-{size}px"
        resized.mkdir(exist_ok=True)
        for i, source in enumerate(sources):
            image = imaging.load_image(Path(source).read_bytes(), source)
            big = cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC)
            cv2.imwrite(str(resized / f"s{i:04d}.png"), big)
        sources = sorted(str(p) for p in resized.iterdir())
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


def plain_preprocess(paths: Sequence[str], size: int) -> None:
    """The preprocessing loop: the Preprocess actor's decode, normalise and resize, in turn."""
    for path in paths:
        imaging.resize_image(imaging.load_image(Path(path).read_bytes(), path), size)


def _load(model_uri: str) -> tuple:
    """The Keras model of a local ``.keras`` file and the calibration that scores its masks."""
    from lungseg.model.unet import load_model

    data = Path(model_uri).read_bytes()
    return load_model(data), segment.calibration(modelfile.describe(data), model_uri)[0]


def _write_mask(
    path: str,
    image: np.ndarray,
    film: np.ndarray,
    probability: np.ndarray,
    calibration: qc.Calibration,
    output: Path,
    labels: bool = False,
) -> None:
    """What the job does with an image's probabilities: post-process and assess them (with
    ``film``, the image at the model's size) at segment's default threshold, resize the mask to
    the image, write its PNG, and with ``labels`` the labels picture that tells the lungs apart
    (the job writes both; the loop, the mask alone)."""
    threshold = SegmentConfig.threshold
    small = imaging.postprocess(probability, threshold)
    qc.assess(small, probability, film, calibration)
    mask = imaging.resize_mask(small, *image.shape[:2])
    (output / f"{Path(path).stem}.png").write_bytes(imaging.encode_png(mask))
    if labels:
        picture = imaging.lung_labels(mask, imaging.lungs_split(small))
        labels_png = imaging.encode_image(picture, flat=True)
        (output / f"{Path(path).stem}-labels.png").write_bytes(labels_png)


def plain_segment(paths: Sequence[str], model_uri: str, output: Path, batch_size: int) -> None:
    """The segmenting loop: load the model, then decode, preprocess, predict (float32, Keras'
    defaults) the images, post-process, assess
    (:func:`lungseg.core.qc.assess`) and write the masks batch by batch, in one process."""
    from lungseg.model.unet import predict_in_batches

    model, calibration = _load(model_uri)
    size = int(model.input_shape[1])
    output.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = [imaging.load_image(Path(p).read_bytes(), p) for p in chunk]
        batch = np.stack([imaging.resize_image(image, size) for image in images])
        probability = predict_in_batches(model, batch, batch_size)
        for path, image, film, p in zip(chunk, images, batch, probability, strict=True):
            _write_mask(path, image, film, p, calibration, output)


def tfdata_segment(paths: Sequence[str], model_uri: str, output: Path, batch_size: int) -> None:
    """The tf.data pipeline a Keras user writes in fifteen lines: files decoded and resized in
    parallel by ``map(..., num_parallel_calls=AUTOTUNE)``, batched and prefetched, then
    ``predict_on_batch``, the cut at segment's threshold, the mask resized back and written.

    No quality control, no labels, no min-max stretch: the strongest peer, doing the least.
    Autotuning's optimiser is off, as a user who met TensorFlow 2.21's stall would turn it:
    its thread (``Model::OptimizeLoop``) held the iterator's end for 35-40 s in 3 of 7 runs
    of 400 films (gdb); off, none of 7 stalled and the map still runs a call per core.
    """
    import tensorflow as tf

    model, _ = _load(model_uri)
    size = int(model.input_shape[1])
    threshold = SegmentConfig.threshold
    output.mkdir(parents=True, exist_ok=True)

    def load(path: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image = tf.io.decode_image(tf.io.read_file(path), channels=1, expand_animations=False)
        small = tf.image.resize(image, (size, size), method="area")
        return tf.cast(tf.round(small), tf.uint8), tf.shape(image)[:2]

    data = (
        tf.data.Dataset.from_tensor_slices(list(paths))
        .map(load, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    options = tf.data.Options()
    options.autotune.enabled = False
    data = data.with_options(options)
    names = iter(paths)
    for images, shapes in data:
        probabilities = np.asarray(model.predict_on_batch(images))[..., 0]
        for probability, (height, width) in zip(probabilities, shapes.numpy(), strict=True):
            mask = (probability >= threshold).astype(np.uint8) * 255
            mask = cv2.resize(mask, (int(width), int(height)), interpolation=cv2.INTER_NEAREST)
            cv2.imwrite(str(output / f"{Path(next(names)).stem}.png"), mask)


PEERS = {"loop": plain_segment, "tfdata": tfdata_segment}
"""The segmenting peers that run as processes of their own, by the name on their command line."""


@dataclass(frozen=True)
class StageCosts:
    """Core-milliseconds per image of each step of segmenting an image, measured one step after
    the other in this process: OpenCV on one thread, the model with its own threads (the CPU
    time of all of them), at the pipeline's precision and batch size."""

    decode: float  # read the file, decode it
    preprocess: float  # grayscale, stretch, resize to the model's input
    model: float  # predict the image, per image of a batch
    write: float  # post-process, assess, resize back, encode and write the mask and labels PNGs

    @property
    def total(self) -> float:
        return self.decode + self.preprocess + self.model + self.write

    def ceiling(self, cores: float) -> float:
        """Images/s that ``cores`` fully busy with these steps would segment."""
        return cores * 1000 / self.total

    def to_dict(self) -> dict:
        return asdict(self) | {"total": self.total}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


STEP_REPEATS = 3
"""How many times :func:`stage_costs` times each step, keeping its least: a shared machine's
noise only ever adds (2026-12-07, timed once: the same model step 123.7 core-ms a film in one
run's 400-film row, 183.9 in its 2,000-film row)."""


def stage_costs(
    paths: Sequence[str],
    model_uri: str,
    batch_size: int,
    precision: str,
    output: Path,
    job: bool,
    repeats: int = STEP_REPEATS,
) -> StageCosts:
    """:class:`StageCosts` over ``paths`` (whole batches of them), each step the least of
    ``repeats`` timings. ``job``: the job's steps, its model as segment runs it
    (:func:`lungseg.model.unet.for_inference`) and its labels picture written too; else the
    loop's, the model as loaded in ``precision``."""
    from lungseg.model.unet import for_inference, predict_in_batches, with_precision

    model, calibration = _load(model_uri)
    model = (for_inference if job else with_precision)(model, precision)
    size = int(model.input_shape[1])
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    output.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, list[float]] = {
        step: [] for step in ("decode", "preprocess", "model", "write")
    }
    try:
        for repeat in range(repeats):
            started = _cpu_seconds()
            decoded = [imaging.decode(Path(p).read_bytes(), p) for p in paths]
            seconds["decode"].append(_cpu_seconds() - started)
            started = _cpu_seconds()
            small = np.stack(
                [
                    imaging.resize_image(imaging.normalise(imaging.to_grayscale(d)), size)
                    for d in decoded
                ]
            )
            seconds["preprocess"].append(_cpu_seconds() - started)
            if repeat == 0:
                # traced once, as in an actor
                predict_in_batches(model, small[:batch_size], batch_size)
            started = _cpu_seconds()
            probability = predict_in_batches(model, small, batch_size)
            seconds["model"].append(_cpu_seconds() - started)
            started = _cpu_seconds()
            for path, image, film, p in zip(paths, decoded, small, probability, strict=True):
                _write_mask(path, image, film, p, calibration, output, job)
            seconds["write"].append(_cpu_seconds() - started)
    finally:
        cv2.setNumThreads(threads)
    n = len(paths) / 1000
    return StageCosts(**{step: min(times) / n for step, times in seconds.items()})


def training_arrays(root: str, size: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The labelled cases under ``root`` through :class:`lungseg.stages.preprocess.Preprocess` (in
    this process), repeated to ``count``."""
    from lungseg.io import catalog
    from lungseg.stages.preprocess import Preprocess, case_batch

    cases = catalog.find_cases(root).labelled
    if not cases:
        raise ValueError(f"the training row needs X-rays with masks under {root}")
    out = Preprocess(size, train=True)(case_batch(cases))
    failed = [str(e) for e in out["error"] if e]
    if failed:
        raise RuntimeError(f"{len(failed)} training images failed: {failed[0]}")
    picks = np.arange(count) % len(cases)
    return out["image"][picks], out["mask"][picks]


def plain_epoch(model_config, images: np.ndarray, masks: np.ndarray, batch_size: int) -> float:
    """Seconds of the second of two epochs of ``model.fit`` with the training job's loss, fed
    float32 arrays (uint8 ones cost ``fit`` about 40% more per step here)."""
    import keras

    from lungseg.model.unet import bce_dice_loss, build_unet

    keras.utils.set_random_seed(0)
    model = build_unet(**asdict(model_config))
    model.compile(optimizer=keras.optimizers.Adam(TRAIN_LEARNING_RATE), loss=bce_dice_loss)
    stamps: list[float] = []
    clock = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda *_: stamps.append(time.perf_counter()),
        on_epoch_end=lambda *_: stamps.append(time.perf_counter()),
    )
    x, y = (a[..., None].astype(np.float32) for a in (images, masks))
    model.fit(x, y, batch_size, 2, verbose=0, callbacks=[clock])
    return stamps[3] - stamps[2]


if __name__ == "__main__":  # a segmenting peer as a process of its own
    peer, folder, out, model_file, batch = sys.argv[1:6]
    paths = sorted(str(p) for p in Path(folder).iterdir())
    PEERS[peer](paths, model_file, Path(out), int(batch))
