"""Frozen settings of each job, filled from the command line by cli.py."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from importlib.resources import files

from lungseg.errors import UserError

SAMPLE = str(files("lungseg") / "sample")
"""The 16 Montgomery X-rays with masks packaged with lungseg: every job's default input."""

BUNDLED_MODEL = str(files("lungseg") / "models" / "lungseg-unet256.keras")
"""The pretrained U-Net packaged with lungseg (see the README's model card): segment's default."""
BUNDLED_SPLIT = str(files("lungseg") / "models" / "split.json")
"""The train/validation split of the 604 cxr-lungs ids that the bundled model was trained on."""
BUNDLED_PROVENANCE = str(files("lungseg") / "models" / "lungseg-unet256.provenance.json")
"""What made the bundled weights: recipe, split, selected epoch, their SHA-256."""

PREPROCESS_BATCH = 128
"""Most images per preprocessing task. Each Ray Data task costs scheduling, a block in the
object store and an idle gap in its actor: on 2 cores, 4,000 X-rays went through two actors at
303 images/s in tasks of 16, 421 in tasks of 32 and 565 in tasks of 128."""


class ConfigError(UserError, ValueError):
    """A setting that cannot work (``--epochs 0``, an even blur kernel), found before any work."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


DEFAULT_RUN = "runs/lungseg"
DEFAULT_SEGMENT_OUTPUT = "out/segment"
DEFAULT_EVALUATE_OUTPUT = "out/evaluate"


@dataclass(frozen=True)
class ModelConfig:
    """U-Net shape: input ``size`` x ``size``, filters doubling from ``base_filters``."""

    size: int = 256
    base_filters: int = 16
    depth: int = 4

    def __post_init__(self) -> None:
        _check(
            self.depth >= 1 and self.base_filters >= 1, "--depth and --base-filters must be >= 1"
        )
        _check(
            self.size >= 2**self.depth and self.size % 2**self.depth == 0,
            f"--size {self.size} must be a multiple of 2**depth = {2**self.depth}",
        )


@dataclass(frozen=True)
class RecipeConfig:
    """How a U-Net is trained, by whichever trainer (:mod:`lungseg.recipe`).

    ``batch_size`` is the images of one training step, all workers together (Ray Train splits
    it evenly among them); ``patience`` the epochs without a better validation Dice before
    stopping (0: never).
    """

    epochs: int = 40
    batch_size: int = 4
    learning_rate: float = 1e-3
    augment: bool = True
    patience: int = 20
    seed: int = 0
    model: ModelConfig = ModelConfig()

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        _check(
            math.isfinite(self.learning_rate) and self.learning_rate > 0,
            f"--learning-rate must be > 0, got {self.learning_rate}",
        )
        _check(self.patience >= 0, f"--patience must be >= 0 (0: never stop), got {self.patience}")


@dataclass(frozen=True)
class ResourceConfig:
    """Preprocessing actors and their CPUs each, GPUs for the model (None: derived from the
    cluster's CPUs and GPUs, :mod:`lungseg.pipeline`)."""

    preprocess_actors: int | None = None
    actor_cpus: float | None = None
    use_gpu: bool = False

    def __post_init__(self) -> None:
        _check(
            self.preprocess_actors is None or self.preprocess_actors >= 1,
            f"--preprocess-actors must be at least 1, got {self.preprocess_actors}",
        )
        _check(
            self.actor_cpus is None or (math.isfinite(self.actor_cpus) and self.actor_cpus > 0),
            f"--actor-cpus must be a number > 0, got {self.actor_cpus}",
        )


@dataclass(frozen=True)
class TrainConfig:
    """Settings of ``lungseg train``: data, split, recipe and where the run folder goes.

    ``split`` names a JSON file ``{"train": [ids], "val": [ids]}`` used instead of
    ``val_fraction``; ``single_process`` trains in this process without Ray (``workers`` and
    the resources then do not apply).
    """

    data: str = SAMPLE
    masks: str | None = None
    output: str = DEFAULT_RUN
    workers: int = 2
    worker_cpus: float | None = None
    val_fraction: float = 0.2
    split: str | None = None
    recipe: RecipeConfig = RecipeConfig()
    resources: ResourceConfig = ResourceConfig()
    s3_endpoint: str | None = None
    allow_local_output: bool = False
    single_process: bool = False
    overwrite: bool = False  # replace the run in ``output`` instead of going on with it

    def __post_init__(self) -> None:
        _check(self.workers >= 1, f"--workers must be at least 1, got {self.workers}")
        _check(
            self.worker_cpus is None or (math.isfinite(self.worker_cpus) and self.worker_cpus > 0),
            f"--worker-cpus must be a number > 0, got {self.worker_cpus}",
        )
        _check(
            0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1), got {self.val_fraction}"
        )
        batch, workers = self.recipe.batch_size, 1 if self.single_process else self.workers
        _check(
            batch % workers == 0,
            f"--batch-size {batch} must split evenly among the {workers} workers",
        )

    def to_dict(self) -> dict:
        return asdict(self)


PRECISIONS = ("float32", "bfloat16", "float16")
"""What the model computes in: float32, or Keras mixed precision (see
:func:`lungseg.model.with_precision`)."""
AUTO = "auto"
"""bfloat16 where the hardware computes in it (GPUs, CPUs with AVX-512 BF16 or AMX), else
float32: :func:`lungseg.pipeline.resolve_precision`."""


@dataclass(frozen=True)
class SegmentConfig:
    model: str = BUNDLED_MODEL
    input: str = f"{SAMPLE}/images"
    masks: str | None = None
    output: str = DEFAULT_SEGMENT_OUTPUT
    batch_size: int = 8
    threshold: float = 0.5
    segment_actors: int | None = None  # model actors (None: one per GPU, or per 8 CPUs)
    resources: ResourceConfig = ResourceConfig()
    s3_endpoint: str | None = None
    overlays: bool = False
    ids: tuple[str, ...] | None = None  # only these ids of the catalog (evaluate's split)
    resume: bool = False  # go on with the run whose outputs are in ``output`` (same settings)
    overwrite: bool = False  # replace the run whose outputs are in ``output``
    precision: str = "auto"

    def __post_init__(self) -> None:
        _check(
            self.precision in (AUTO, *PRECISIONS),
            f"--precision must be one of {AUTO}, {', '.join(PRECISIONS)}, got {self.precision!r}",
        )
        _check(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        _check(0 < self.threshold < 1, f"--threshold must be in (0, 1), got {self.threshold}")
        _check(
            self.segment_actors is None or self.segment_actors >= 1,
            f"--segment-actors must be at least 1, got {self.segment_actors}",
        )
        _check(not (self.resume and self.overwrite), "--resume and --overwrite exclude each other")

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_CLEAN_OUTPUT = "out/clean"
INVERT_RULES = ("border", "never", "always")


@dataclass(frozen=True)
class CleanParams:
    """Every parameter of OpenCV cleaning (:func:`lungseg.clean.clean_image`).

    ``blur_kernel`` is the odd Gaussian kernel side (1: no blur), ``blur_sigma`` 0 lets OpenCV
    derive sigma from the kernel; ``clahe_clip``/``clahe_tile`` apply only with ``clahe``;
    ``open_kernel``/``close_kernel`` are elliptical structuring element sides (0: skip);
    ``invert`` is ``border`` (invert when most of the border ring is foreground), ``never`` or
    ``always``.
    """

    size: int = 256
    blur_kernel: int = 5
    blur_sigma: float = 0.0
    clahe: bool = False
    clahe_clip: float = 2.0
    clahe_tile: int = 8
    open_kernel: int = 5
    close_kernel: int = 5
    invert: str = "border"

    def __post_init__(self) -> None:
        _check(self.size >= 8, f"--size must be at least 8, got {self.size}")
        _check(
            self.blur_kernel >= 1 and self.blur_kernel % 2 == 1,
            f"--blur-kernel must be odd and >= 1, got {self.blur_kernel}",
        )
        _check(self.blur_sigma >= 0, f"--blur-sigma must be >= 0, got {self.blur_sigma}")
        _check(
            self.clahe_clip > 0 and self.clahe_tile >= 1,
            "--clahe-clip must be > 0 and --clahe-tile >= 1",
        )
        _check(
            self.open_kernel >= 0 and self.close_kernel >= 0,
            "--open-kernel and --close-kernel must be >= 0 (0 skips the step)",
        )
        _check(
            self.invert in INVERT_RULES,
            f"--invert must be one of {', '.join(INVERT_RULES)}, got {self.invert!r}",
        )


@dataclass(frozen=True)
class CleanConfig:
    input: str = f"{SAMPLE}/images"
    output: str = DEFAULT_CLEAN_OUTPUT
    params: CleanParams = CleanParams()
    sheet: int = 8
    batch_size: int = PREPROCESS_BATCH  # most images per actor call
    resources: ResourceConfig = ResourceConfig()
    s3_endpoint: str | None = None
    overwrite: bool = False  # replace the outputs of an earlier run in ``output``

    def __post_init__(self) -> None:
        _check(self.sheet >= 0, f"--sheet must be >= 0, got {self.sheet}")
        _check(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ReportConfig:
    """Settings of ``lungseg report``.

    ``output`` is a segment job's output root, ``run`` a training run folder whose curves to
    show (optional), ``sheet`` the images on each of the worst and best contact sheets,
    ``review`` the most on the sheet of images sent to review (lowest QC score first).
    """

    output: str = DEFAULT_SEGMENT_OUTPUT
    run: str | None = None
    sheet: int = 8
    review: int = 48
    s3_endpoint: str | None = None

    def __post_init__(self) -> None:
        _check(self.sheet >= 0, f"--sheet must be >= 0, got {self.sheet}")
        _check(self.review >= 0, f"--review must be >= 0, got {self.review}")


DEFAULT_BENCHMARK_OUTPUT = "out/benchmark"
BENCHMARK_STAGES = ("hospital", "inference", "preprocessing", "memory", "training")


@dataclass(frozen=True)
class BenchmarkConfig:
    """Settings of ``lungseg benchmark`` (:mod:`lungseg.benchmark`).

    ``input`` is a local root of X-rays (its masks feed the training row); ``films`` of them,
    resized to ``film_size`` pixels, are the hospital films; ``images`` the 512 px films of the
    inference row, ``preprocess_images`` those of the preprocessing row, ``memory_images`` the
    small and the large set of the memory row; ``train_model`` the U-Net trained in the
    training row; ``rounds`` how often each side runs (its best counts).
    """

    input: str = SAMPLE
    output: str = DEFAULT_BENCHMARK_OUTPUT
    model: str = BUNDLED_MODEL
    films: int = 400
    film_size: int = 2048
    images: int = 1000
    preprocess_images: int = 10000
    memory_images: tuple[int, int] = (1000, 10000)
    train_images: int = 128
    train_model: ModelConfig = ModelConfig()
    batch_size: int = 8
    rounds: int = 2
    stages: tuple[str, ...] = BENCHMARK_STAGES
    use_gpu: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.stages) - set(BENCHMARK_STAGES))
        _check(
            not unknown, f"unknown --stages {unknown}: choose from {', '.join(BENCHMARK_STAGES)}"
        )
        _check(
            len(self.memory_images) == 2,
            f"--memory-images must be two counts, got {self.memory_images}",
        )
        _check(
            min(
                self.films,
                self.images,
                self.preprocess_images,
                self.train_images,
                *self.memory_images,
                self.batch_size,
            )
            >= 1,
            "image counts and --batch-size must be at least 1",
        )
        _check(self.rounds >= 1, f"--rounds must be at least 1, got {self.rounds}")

    def to_dict(self) -> dict:
        return asdict(self)
