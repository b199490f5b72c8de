"""Frozen settings of each job, filled from the command line by cli.py."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib.resources import files

SAMPLE = str(files("lungseg") / "sample")
"""The 16 Montgomery X-rays with masks packaged with lungseg: every job's default input."""

DEFAULT_RUN = "runs/lungseg"
DEFAULT_SEGMENT_OUTPUT = "out/segment"


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
    epochs: int = 30
    batch_size: int = 8
    learning_rate: float = 1e-3
    val_fraction: float = 0.2
    seed: int = 0
    model: ModelConfig = ModelConfig()
    resources: ResourceConfig = ResourceConfig()
    s3_endpoint: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SegmentConfig:
    model: str = f"{DEFAULT_RUN}/model.keras"
    input: str = f"{SAMPLE}/images"
    masks: str | None = None
    output: str = DEFAULT_SEGMENT_OUTPUT
    batch_size: int = 8
    threshold: float = 0.5
    segment_actors: int = 1
    resources: ResourceConfig = ResourceConfig()
    s3_endpoint: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)
