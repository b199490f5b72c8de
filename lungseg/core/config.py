"""Frozen settings of each job: the one source of every default, of every option's help and of
its choices (in each field's metadata, :func:`option`), from which :mod:`lungseg.cli` builds
the command line."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from typing import Any

from lungseg.core.errors import UserError

SAMPLE = str(files("lungseg") / "sample")
"""The 16 Montgomery X-rays with masks packaged with lungseg: every job's default input."""
SAMPLE_IMAGES, SAMPLE_MASKS = f"{SAMPLE}/images", f"{SAMPLE}/masks"

BUNDLED_MODEL = str(files("lungseg") / "models" / "lungseg-unet256.keras")
"""The pretrained U-Net packaged with lungseg (see the model card): segment's default."""
BUNDLED_SPLIT = str(files("lungseg") / "models" / "split.json")
"""The train/validation split of the 604 cxr-lungs ids that the bundled model was trained on."""
BUNDLED_PROVENANCE = str(files("lungseg") / "models" / "lungseg-unet256.provenance.json")
"""What made the bundled weights: recipe, split, selected epoch, their SHA-256."""

PREPROCESS_BATCH = 128
"""Most images per preprocessing task: each Ray Data task costs scheduling, a block in the
object store and an idle gap in its actor (measured in the docs' performance page)."""
MODEL_BATCH = {"cpu": 4, "gpu": 8}
"""Images per model call unless ``--batch-size`` says otherwise, by device. On CPUs 4: a smaller
batch's activations stay in cache, and the bundled model cost 4-17% less per image at 4 than at 8
(float32 on 2 cores, seven comparisons; whole 400-film jobs the same within the noise: the docs'
performance page). On GPUs 8."""
THRESHOLD = 0.5
"""The lung probability at which masks are cut, in segment and in training's validation."""
CONTRAST_CLIP, CONTRAST_TILES = 2.0, 8
"""CLAHE's clip limit and tiles per side: clean's defaults."""


class ConfigError(UserError, ValueError):
    """A setting that cannot work (``--epochs 0``, an even blur kernel), found before any work."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def option(
    default: Any = None,
    help: str = "",
    *,
    flag: str | None = None,
    choices: tuple | None = None,
    parse: Callable[[str], Any] | None = None,
    positional: bool = False,
    required: bool = False,
    cli: bool = True,
    without: tuple[str, ...] = (),
) -> Any:
    """A config field and how the command line offers it: ``help``, its ``flag`` (default
    ``--field-name``), ``choices``, ``parse`` (text to value, for tuples), ``positional``,
    ``required`` (no default), ``cli=False`` (set by the job, not by the user), and for a nested
    config the fields it leaves ``without``."""
    meta = {"help": help, "flag": flag, "choices": choices, "parse": parse,
            "positional": positional, "cli": cli, "without": without}  # fmt: skip
    return field(metadata=meta) if required else field(default=default, metadata=meta)


def _parts(text: str) -> tuple[str, ...]:
    return tuple(part for part in text.split(",") if part)


def _counts(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in _parts(text))


AUTO = "auto"
"""Settled when the job runs: ``--precision`` bfloat16 where the hardware computes in it (GPUs,
CPUs with AVX-512 BF16 or AMX), else float32 (:func:`lungseg.stages.pipeline.resolve_precision`);
``--device`` GPUs where the Ray cluster has any (:func:`lungseg.stages.pipeline.resolve_device`)."""


DEFAULT_RUN = "runs/lungseg"
DEFAULT_SEGMENT_OUTPUT = "out/segment"
DEFAULT_EVALUATE_OUTPUT = "out/evaluate"
DEFAULT_CLEAN_OUTPUT = "out/clean"
DEFAULT_BENCHMARK_OUTPUT = "out/benchmark"
S3_ENDPOINT_HELP = (
    "endpoint URL of an S3-compatible store, http(s)://host:port (default: AWS_ENDPOINT_URL_S3 "
    "or AWS_ENDPOINT_URL, else AWS); never with credentials in it"
)


def _s3_endpoint() -> Any:
    return option(None, S3_ENDPOINT_HELP)


@dataclass(frozen=True)
class ModelConfig:
    """U-Net shape: input ``size`` x ``size``, filters doubling from ``base_filters``."""

    size: int = option(256, "model input size in pixels")
    base_filters: int = option(16, "filters of the first level")
    depth: int = option(4, "U-Net poolings")

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
    """How a U-Net is trained, by whichever trainer (:mod:`lungseg.model.recipe`).

    ``batch_size`` is the images of one training step, all workers together (Ray Train splits
    it evenly among them); ``patience`` the epochs without a better validation Dice before
    stopping (0: never).
    """

    epochs: int = option(40, "epochs to train in all")
    batch_size: int = option(4, "images per training step, split evenly among the workers")
    learning_rate: float = option(1e-3, "Adam's starting rate")
    augment: bool = option(
        True,
        "train without random rotation, scaling, shifts, brightness, contrast and gamma",
        flag="--no-augment",
    )
    patience: int = option(
        20,
        "stop after this many epochs without a better validation Dice (0: never); the run's "
        "model.keras is the best epoch's",
    )
    seed: int = option(0, "seed of weights and shuffling")
    model: ModelConfig = option(ModelConfig(), "U-Net")

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        _check(
            math.isfinite(self.learning_rate) and self.learning_rate > 0,
            f"--learning-rate must be > 0, got {self.learning_rate}",
        )
        _check(self.patience >= 0, f"--patience must be >= 0 (0: never stop), got {self.patience}")


DEVICES = ("cpu", "gpu", AUTO)
"""Where the model runs (``--device``); ``auto``: GPUs when the Ray cluster has any."""


@dataclass(frozen=True)
class ResourceConfig:
    """Preprocessing tasks at once and their CPUs each, GPUs for the model (None: derived from the
    cluster's CPUs and GPUs, :mod:`lungseg.stages.pipeline`)."""

    preprocess_actors: int | None = option(
        None, "OpenCV preprocessing tasks at once (default: as many as the spare CPUs hold)"
    )
    actor_cpus: float | None = option(
        None, "CPUs per preprocessing task (default: 0.8 up to 4 CPUs a node, else 1)"
    )
    device: str = option(
        "cpu",
        "where the model runs: gpu (one GPU per model actor or train worker; refused where the "
        "Ray cluster has none), cpu, or auto (GPUs when the Ray cluster has any)",
        choices=DEVICES,
    )

    @property
    def use_gpu(self) -> bool:
        """Whether the model runs on GPUs: ``device`` once made concrete (auto resolved by
        :func:`lungseg.stages.pipeline.resolve_device`)."""
        return self.device == "gpu"

    def __post_init__(self) -> None:
        _check(
            self.device in DEVICES,
            f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}",
        )
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

    data: str = option(SAMPLE, "root of X-rays and masks, any layout")
    masks: str | None = option(None, "separate root of the masks, if any")
    output: str = option(DEFAULT_RUN, "run folder: checkpoints, model.keras, metrics.csv")
    workers: int = option(2, "Ray Train workers")
    worker_cpus: float | None = option(
        None, "CPUs per train worker (default: half the cluster's CPUs shared among workers)"
    )
    val_fraction: float = option(0.2, "share of ids held out")
    split: str | None = option(
        None,
        f"JSON file with 'train' and 'val' id lists, instead of --val-fraction (the bundled "
        f"model's: {BUNDLED_SPLIT})",
    )
    recipe: RecipeConfig = option(RecipeConfig(), "recipe")
    resources: ResourceConfig = option(ResourceConfig(), "resources")
    s3_endpoint: str | None = _s3_endpoint()
    allow_local_output: bool = option(
        False,
        "accept a local --output on a multi-node cluster (a path every node mounts, e.g. NFS)",
    )
    single_process: bool = option(
        False,
        "train in this process without Ray (Keras on its own backend and devices): the same "
        "recipe and run folder, no checkpoints to resume from",
    )
    overwrite: bool = option(
        False,
        "replace the run in --output (a rerun with the same data, split and recipe goes on "
        "with it; one with others is refused unless this is given)",
    )

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
:func:`lungseg.model.unet.with_precision`)."""


@dataclass(frozen=True)
class SegmentConfig:
    """Settings of ``lungseg segment``. Without an ``input`` of its own the job segments the
    packaged sample, scored against the sample's masks."""

    model: str = option(BUNDLED_MODEL, ".keras model (default: the bundled one)")
    input: str = option(
        SAMPLE_IMAGES, "X-rays to segment (default: the packaged sample, with its masks)"
    )
    masks: str | None = option(None, "ground-truth masks, for Dice and IoU")
    output: str = option(DEFAULT_SEGMENT_OUTPUT, "output root")
    batch_size: int | None = option(
        None,
        f"images per model call (default: {MODEL_BATCH['cpu']} on CPUs, "
        f"{MODEL_BATCH['gpu']} on GPUs)",
    )
    threshold: float = option(THRESHOLD, "lung probability cut")
    precision: str = option(
        AUTO,
        "what the model computes in: auto is bfloat16 on GPUs and on CPUs with bf16 units "
        "(AVX-512 BF16, AMX), else float32; float16 is for GPU tensor cores",
        choices=(AUTO, *PRECISIONS),
    )
    segment_actors: int | None = option(
        None, "model actors (default: one per GPU on GPUs, else one per 8 CPUs)"
    )
    qc: str = option(
        "on",
        "quality control of each mask, from the same model pass: on (qc_dice, the Dice it is "
        "predicted to have, qc_score, qc, qc_reason) or off (those columns null)",
        choices=("on", "off"),
    )
    overlays: bool = option(
        False,
        "also write OUTPUT/overlays/<name>.png: the X-ray (longest side 512) with the predicted "
        "outline and, where a ground truth exists, agreement colours",
    )
    dicom_seg: bool = option(
        False,
        "also write OUTPUT/dicom-seg/<name>.dcm for each DICOM image: a DICOM Segmentation of "
        "both lungs, in the image's study, that PACS viewers open (needs the dicom extra)",
    )
    resume: bool = option(
        False,
        "go on with the earlier (e.g. interrupted) run in OUTPUT: keep the images it did whose "
        "inputs and files are unchanged, segment the rest; refused if it had other settings",
    )
    overwrite: bool = option(
        False, "replace the earlier run in OUTPUT: the files its ledger lists are removed first"
    )
    save_probabilities: bool = option(
        False,
        "also write OUTPUT/probabilities/<name>.png: the model's lung probability map (0-255 "
        "for 0-1) at the model's input size, for thresholding or ensembling yourself",
    )
    ids: str | None = option(
        None,
        "file of the images to segment, one id or path relative to --input a line (blank lines "
        "and # comments ignored)",
    )
    limit: int | None = option(
        None, "segment only the first LIMIT images, in id order (after --ids)"
    )
    dry_run: bool = option(
        False,
        "check the options, catalog the images, load the model and plan the pools, print "
        "what would run, and stop: no actor starts, nothing is written",
    )
    resources: ResourceConfig = option(ResourceConfig(), "resources")
    s3_endpoint: str | None = _s3_endpoint()

    def __post_init__(self) -> None:
        if self.input == SAMPLE_IMAGES and self.masks is None:
            object.__setattr__(self, "masks", SAMPLE_MASKS)
        _check(
            self.precision in (AUTO, *PRECISIONS),
            f"--precision must be one of {AUTO}, {', '.join(PRECISIONS)}, got {self.precision!r}",
        )
        _check(
            self.batch_size is None or self.batch_size >= 1,
            f"--batch-size must be at least 1, got {self.batch_size}",
        )
        _check(0 < self.threshold < 1, f"--threshold must be in (0, 1), got {self.threshold}")
        _check(
            self.segment_actors is None or self.segment_actors >= 1,
            f"--segment-actors must be at least 1, got {self.segment_actors}",
        )
        _check(not (self.resume and self.overwrite), "--resume and --overwrite exclude each other")
        _check(
            self.limit is None or self.limit >= 1, f"--limit must be at least 1, got {self.limit}"
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EvaluateConfig(SegmentConfig):
    """Settings of ``lungseg evaluate``: segment's, and which ids of a split file to score."""

    output: str = option(DEFAULT_EVALUATE_OUTPUT, "output root")
    split: str | None = option(
        None,
        f"JSON file of id lists: evaluate only those of --subset (the bundled model's split: "
        f"{BUNDLED_SPLIT})",
    )
    subset: str = option("val", "which list of the --split file")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.split is None or self.ids is None,
            "--split and --ids exclude each other: both say which images to evaluate",
        )


@dataclass(frozen=True)
class ExportConfig:
    """Settings of ``lungseg export``: a ``.keras`` model as a SavedModel in ``output``."""

    output: str = option(help="folder of the SavedModel (path or s3://)", required=True)
    model: str = option(BUNDLED_MODEL, ".keras model to export (default: the bundled one)")
    overwrite: bool = option(
        False, "replace the earlier export in OUTPUT: the files its ledger lists are removed first"
    )
    s3_endpoint: str | None = _s3_endpoint()


INVERT_RULES = ("border", "never", "always")


@dataclass(frozen=True)
class CleanParams:
    """Every parameter of OpenCV cleaning (:func:`lungseg.jobs.clean.clean_image`).

    ``blur_kernel`` is the odd Gaussian kernel side (1: no blur), ``blur_sigma`` 0 lets OpenCV
    derive sigma from the kernel; ``clahe_clip``/``clahe_tile`` apply only with ``clahe``;
    ``open_kernel``/``close_kernel`` are elliptical structuring element sides (0: skip);
    ``invert`` is ``border`` (invert when most of the border ring is foreground), ``never`` or
    ``always``.
    """

    size: int = option(256, "output side in pixels")
    blur_kernel: int = option(5, "odd Gaussian kernel side (1: off)")
    blur_sigma: float = option(0.0, "Gaussian sigma (0: from the kernel)")
    clahe: bool = option(False, "equalise contrast with CLAHE first")
    clahe_clip: float = option(CONTRAST_CLIP, "CLAHE clip limit")
    clahe_tile: int = option(CONTRAST_TILES, "CLAHE tiles per side")
    open_kernel: int = option(5, "opening ellipse side (0: off)")
    close_kernel: int = option(5, "closing ellipse side (0: off)")
    invert: str = option(
        "border",
        "invert the Otsu mask: 'border' when most of its 1-pixel border ring is foreground",
        choices=INVERT_RULES,
    )

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
    """Settings of ``lungseg clean``."""

    input: str = option(
        SAMPLE_IMAGES,
        "X-rays to clean, a folder or s3:// prefix; mask files in it are skipped (default: the "
        "packaged sample)",
    )
    output: str = option(DEFAULT_CLEAN_OUTPUT, "output root")
    overwrite: bool = option(
        False, "replace the earlier run in OUTPUT: the files its ledger lists are removed first"
    )
    sheet: int = option(8, "images on the contact sheet, first by id")
    batch_size: int = option(PREPROCESS_BATCH, "most images per task")
    params: CleanParams = option(CleanParams(), "cleaning steps")
    resources: ResourceConfig = option(ResourceConfig(), "resources", without=("device",))
    s3_endpoint: str | None = _s3_endpoint()

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

    output: str = option(DEFAULT_SEGMENT_OUTPUT, "a segment job's output root", positional=True)
    run: str | None = option(None, "training run folder: adds its curves")
    sheet: int = option(8, "images on each of the worst and best sheets")
    review: int = option(48, "most images on the sheet of those sent to review, lowest first")
    s3_endpoint: str | None = _s3_endpoint()

    def __post_init__(self) -> None:
        _check(self.sheet >= 0, f"--sheet must be >= 0, got {self.sheet}")
        _check(self.review >= 0, f"--review must be >= 0, got {self.review}")


BENCHMARK_STAGES = ("hospital", "inference", "preprocessing", "memory", "training")


@dataclass(frozen=True)
class BenchmarkConfig:
    """Settings of ``lungseg benchmark`` (:mod:`lungseg.jobs.benchmark`).

    ``input`` is a local root of X-rays (its masks feed the training row); ``films`` of them
    (a row of each count), resized to ``film_size`` pixels, are the hospital-size images;
    ``images`` the 512 px images of the inference row, ``preprocess_images`` those of the
    preprocessing row,
    ``memory_images`` the small and the large set of the memory row; ``train_model`` the U-Net
    trained in the training row; ``rounds`` how often each side runs (its best counts).
    """

    input: str = option(SAMPLE, "local root of X-rays to copy")
    output: str = option(DEFAULT_BENCHMARK_OUTPUT, "folder of benchmark.json")
    model: str = option(BUNDLED_MODEL, ".keras model of the inference rows")
    films: tuple[int, ...] = option(
        (400,), "comma-separated counts of hospital-size images (e.g. 400,2000)", parse=_counts
    )
    film_size: int = option(2048, "pixels a side of the hospital-size images")
    images: int = option(1000, "512 px images of the inference row")
    preprocess_images: int = option(10000, "images of the preprocessing row")
    memory_images: tuple[int, int] = option(
        (1000, 10000), "the small and the large set of the memory row", parse=_counts
    )
    train_images: int = option(128, "images of the training epoch")
    train_model: ModelConfig = option(ModelConfig(), "U-Net of the training row", cli=False)
    batch_size: int | None = option(
        None,
        "images per model call on every side of the segment rows, and per step of the "
        "training row (default: segment's for the device)",
    )
    rounds: int = option(2, "runs of each side (the best counts)")
    stages: tuple[str, ...] = option(
        BENCHMARK_STAGES, "comma-separated rows to measure", parse=_parts
    )
    use_gpu: bool = option(False, "segment on a GPU (inference rows)", flag="--gpu")

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
                *self.films,
                self.images,
                self.preprocess_images,
                self.train_images,
                *self.memory_images,
                self.batch_size or 1,
            )
            >= 1,
            "image counts and --batch-size must be at least 1",
        )
        _check(self.rounds >= 1, f"--rounds must be at least 1, got {self.rounds}")

    def to_dict(self) -> dict:
        return asdict(self)
