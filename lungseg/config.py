"""Frozen settings of each job, filled from the command line by cli.py."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib.resources import files

SAMPLE = str(files("lungseg") / "sample")
"""The 16 Montgomery X-rays with masks packaged with lungseg: every job's default input."""

BUNDLED_MODEL = str(files("lungseg") / "models" / "lungseg-unet256.keras")
"""The pretrained U-Net packaged with lungseg (see the README's model card): segment's default."""
BUNDLED_SPLIT = str(files("lungseg") / "models" / "split.json")
"""The train/validation split of the 604 cxr-lungs ids that the bundled model was trained on."""

PREPROCESS_BATCH = 128
"""Most images per preprocessing task. Each Ray Data task costs scheduling, a block in the
object store and an idle gap in its actor: on 2 cores, 4,000 X-rays went through two actors at
303 images/s in tasks of 16, 421 in tasks of 32 and 565 in tasks of 128."""

DEFAULT_RUN = "runs/lungseg"
DEFAULT_SEGMENT_OUTPUT = "out/segment"
DEFAULT_EVALUATE_OUTPUT = "out/evaluate"


@dataclass(frozen=True)
class ModelConfig:
    """U-Net shape: input ``size`` x ``size``, filters doubling from ``base_filters``."""

    size: int = 256
    base_filters: int = 16
    depth: int = 4


@dataclass(frozen=True)
class ResourceConfig:
    """Ray actors per stage and their CPU share (None: derived from the cluster)."""

    preprocess_actors: int = 2
    actor_cpus: float | None = None
    use_gpu: bool = False


@dataclass(frozen=True)
class TrainConfig:
    data: str = SAMPLE
    masks: str | None = None
    output: str = DEFAULT_RUN
    workers: int = 2
    worker_cpus: float | None = None
    epochs: int = 40
    batch_size: int = 2
    learning_rate: float = 1e-3
    val_fraction: float = 0.2
    split: str | None = None  # JSON {"train": [ids], "val": [ids]} instead of val_fraction
    augment: bool = True
    patience: int = 20  # epochs without a better validation Dice before stopping (0: never)
    seed: int = 0
    model: ModelConfig = ModelConfig()
    resources: ResourceConfig = ResourceConfig()
    s3_endpoint: str | None = None
    allow_local_output: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


PRECISIONS = ("float32", "bfloat16", "float16")
"""What the model computes in: float32, or Keras mixed precision (see
:func:`lungseg.model.with_precision`)."""


@dataclass(frozen=True)
class SegmentConfig:
    model: str = BUNDLED_MODEL
    input: str = f"{SAMPLE}/images"
    masks: str | None = None
    output: str = DEFAULT_SEGMENT_OUTPUT
    batch_size: int = 8
    threshold: float = 0.5
    segment_actors: int = 1
    resources: ResourceConfig = ResourceConfig()
    s3_endpoint: str | None = None
    overlays: bool = False
    ids: tuple[str, ...] | None = None  # only these ids of the catalog (evaluate's split)
    resume: bool = False  # keep the rows and masks an earlier run already wrote to ``output``
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            choices = ", ".join(PRECISIONS)
            raise ValueError(f"precision must be one of {choices}, got {self.precision!r}")

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
        if self.size < 8:
            raise ValueError(f"size must be at least 8, got {self.size}")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be odd and >= 1, got {self.blur_kernel}")
        if self.blur_sigma < 0:
            raise ValueError(f"blur_sigma must be >= 0, got {self.blur_sigma}")
        if self.clahe_clip <= 0 or self.clahe_tile < 1:
            raise ValueError("clahe_clip must be > 0 and clahe_tile >= 1")
        if self.open_kernel < 0 or self.close_kernel < 0:
            raise ValueError("open_kernel and close_kernel must be >= 0 (0 skips the step)")
        if self.invert not in INVERT_RULES:
            rules = ", ".join(INVERT_RULES)
            raise ValueError(f"invert must be one of {rules}, got {self.invert!r}")


@dataclass(frozen=True)
class CleanConfig:
    input: str = f"{SAMPLE}/images"
    output: str = DEFAULT_CLEAN_OUTPUT
    params: CleanParams = CleanParams()
    sheet: int = 8
    batch_size: int = PREPROCESS_BATCH  # most images per actor call
    resources: ResourceConfig = ResourceConfig()
    s3_endpoint: str | None = None

    def __post_init__(self) -> None:
        if self.sheet < 0 or self.batch_size < 1:
            raise ValueError("sheet must be >= 0 and batch_size >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ReportConfig:
    """Settings of ``lungseg report``.

    ``output`` is a segment job's output root, ``run`` a training run folder whose curves to
    show (optional), ``sheet`` the images on each of the worst and best contact sheets.
    """

    output: str = DEFAULT_SEGMENT_OUTPUT
    run: str | None = None
    sheet: int = 8
    s3_endpoint: str | None = None

    def __post_init__(self) -> None:
        if self.sheet < 0:
            raise ValueError(f"sheet must be >= 0, got {self.sheet}")


DEFAULT_BENCHMARK_OUTPUT = "out/benchmark"
BENCHMARK_STAGES = ("preprocessing", "inference", "training", "memory")


@dataclass(frozen=True)
class BenchmarkConfig:
    """Settings of ``lungseg benchmark`` (:mod:`lungseg.benchmark`).

    ``input`` is a local root of X-rays (its masks feed the training row); ``images`` the set
    of the preprocessing and inference rows; ``memory_images`` the small and the large set of
    the memory row; ``train_model`` the U-Net trained in the training row; ``rounds`` how
    often each side runs (its best counts).
    """

    input: str = SAMPLE
    output: str = DEFAULT_BENCHMARK_OUTPUT
    model: str = BUNDLED_MODEL
    images: int = 1000
    memory_images: tuple[int, int] = (1000, 10000)
    train_images: int = 128
    train_model: ModelConfig = ModelConfig()
    batch_size: int = 8
    rounds: int = 2
    stages: tuple[str, ...] = BENCHMARK_STAGES
    use_gpu: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.stages) - set(BENCHMARK_STAGES))
        if unknown:
            raise ValueError(f"unknown stages {unknown}: choose from {', '.join(BENCHMARK_STAGES)}")
        if len(self.memory_images) != 2:
            raise ValueError(f"memory_images must be two counts, got {self.memory_images}")
        if min(self.images, self.train_images, *self.memory_images, self.batch_size) < 1:
            raise ValueError("image counts and batch_size must be at least 1")
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")

    def to_dict(self) -> dict:
        return asdict(self)
