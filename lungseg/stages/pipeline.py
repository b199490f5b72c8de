"""Ray Data stages shared by the jobs: the case dataset, the preprocessing tasks' pool, the CPU
shares that keep a small machine from hanging, and rows streamed back to the driver."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import pyarrow as pa
import ray
from ray.data import ExecutionResources

from lungseg.core.config import AUTO, MODEL_BATCH, PREPROCESS_BATCH, ResourceConfig
from lungseg.core.errors import UserError
from lungseg.io import storage
from lungseg.io.catalog import Case
from lungseg.io.storage import Store
from lungseg.stages.preprocess import case_batch, preprocess_batch

FAULT_DIR = "LUNGSEG_FAULT_DIR"


def inject_fault(point: str, count: int) -> None:
    """Test hook: exit this process at once, the first time ``point`` is passed with ``count``.

    Off unless ``LUNGSEG_FAULT_<POINT>`` (e.g. ``LUNGSEG_FAULT_SEGMENTER=2``) equals ``count``
    and ``LUNGSEG_FAULT_DIR`` names a folder: the first process to get there creates the marker
    file ``<folder>/<point>`` and exits with status 1, as a killed worker would; the marker
    keeps every later pass (a restarted actor, a retried task) from exiting again.
    """
    wanted, folder = os.environ.get(f"LUNGSEG_FAULT_{point.upper()}"), os.environ.get(FAULT_DIR)
    if wanted is None or folder is None or int(wanted) != count:
        return
    try:
        os.close(os.open(os.path.join(folder, point), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    os._exit(1)


@dataclass(frozen=True)
class Pool:
    """A Ray Data pool: between ``min_size`` and ``max_size`` actors (Ray Data adds actors while
    their input queues up), each declaring ``cpus`` and ``gpus`` and running ``threads`` threads
    of its own (TensorFlow's intra-op threads, mask writers); or, with ``tasks``, up to
    ``max_size`` tasks at once, each declaring ``cpus``.

    Tasks run in the worker processes Ray keeps, started with Ray itself, where an actor is a
    process started for it: a job's first batch starts about 2 s sooner (the docs' performance
    page, warm workers against fresh actors). The stages that hold nothing between batches
    (preprocessing, cleaning) are tasks; the model, loaded once per process, is an actor.
    """

    min_size: int
    max_size: int
    cpus: float
    gpus: int = 0
    threads: int = 1
    calls: int = 1  # batches an actor takes at once (its own threads run them)
    tasks: bool = False

    def strategy(self) -> ray.data.ActorPoolStrategy | ray.data.TaskPoolStrategy:
        if self.tasks:
            return ray.data.TaskPoolStrategy(size=self.max_size)
        return ray.data.ActorPoolStrategy(
            min_size=self.min_size,
            max_size=self.max_size,
            max_concurrent_calls_per_actor=self.calls,
            enable_true_multi_threading=self.calls > 1,
        )

    def size_cpus(self) -> float:
        """The CPUs the pool declares at its largest."""
        return self.max_size * self.cpus


MODEL_SHARE = 0.6
"""A CPU node's share of cores for the model actors, which also write the masks: of an image's
cost the model is about half and writing its mask about a seventh, decoding and resizing a
third (``lungseg benchmark`` prints these costs; the docs' performance page has them)."""
CORES_PER_MODEL_ACTOR = 8
"""Cores one CPU model actor's TensorFlow keeps busy: more cores get more actors, since one
``predict`` spreads over many threads poorly."""
MODEL_CALLS = 2
"""Batches a model actor takes at once: it predicts one (a lock keeps the model to one) while its
threads post-process and write the other, so that neither waits for the other."""
SMALL_NODE = 4
"""Up to this many CPUs, preprocessing tasks declare less than a CPU each (:data:`SMALL_TASK`),
so that they fit beside the model actor; its threads fill the gaps."""
SMALL_TASK = 0.8


def attach() -> None:
    """Start a local Ray, or attach to the cluster ``RAY_ADDRESS`` names, unless this process
    already has one: what a job function does when its caller did not start Ray itself."""
    if not ray.is_initialized():
        ray.init()


def check_fits(pools: dict[str, Pool], on: Cluster) -> None:
    """Refuse pools that could never start, before any is asked for: an actor or task that needs
    more CPUs than the largest node has, or pools whose smallest sizes need more CPUs than the
    cluster has (Ray would wait for them for ever, saying nothing). ``pools`` are named by the
    options that size them."""
    for option, pool in pools.items():
        if pool.cpus > on.node:
            raise UserError(
                f"{option} asks for {pool.cpus:g} CPUs per {'task' if pool.tasks else 'actor'}, "
                f"more than the largest node of this Ray cluster has ({on.node:g})"
            )
    least = sum(pool.min_size * pool.cpus for pool in pools.values())
    if least > on.cpus + 1e-9:
        parts = ", ".join(f"{p.min_size} x {p.cpus:g} ({o})" for o, p in pools.items())
        raise UserError(
            f"the pools need {least:g} CPUs at their smallest ({parts}), more than this "
            f"Ray cluster has ({on.cpus:g}): ask for fewer actors or tasks, or fewer CPUs each"
        )


@dataclass(frozen=True)
class Cluster:
    """What a Ray cluster offers: its CPUs and GPUs, and the CPUs of its largest node (an actor
    cannot declare more than one node has; default: ``cpus``, one node)."""

    cpus: float
    gpus: int = 0
    node_cpus: float | None = None

    @property
    def node(self) -> float:
        return self.node_cpus or self.cpus


def cluster() -> Cluster:
    """The Ray cluster this process is attached to."""
    resources = ray.cluster_resources()
    nodes = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]]
    cpus = float(resources.get("CPU", 1.0))
    return Cluster(cpus, int(resources.get("GPU", 0)), float(max(nodes, default=cpus)) or cpus)


def resolve_device(resources: ResourceConfig, on: Cluster) -> ResourceConfig:
    """``resources`` with ``device`` made concrete on the cluster ``on``: ``auto`` is ``gpu``
    where it has GPUs, else ``cpu``; ``gpu`` where it has none is refused, before any work
    (Ray would wait for them for ever)."""
    if resources.device == "gpu" and on.gpus < 1:
        raise UserError(
            "--device gpu asks for GPUs, but this Ray cluster has none: use --device cpu or auto"
        )
    if resources.device == AUTO:
        return replace(resources, device="gpu" if on.gpus else "cpu")
    return resources


def resolve_precision(precision: str, use_gpu: bool, cpuinfo: str = "/proc/cpuinfo") -> str:
    """``precision``, with ``auto`` made concrete: bfloat16 on GPUs and on CPUs whose flags
    (``cpuinfo``) show bfloat16 units (``avx512_bf16``, ``amx_bf16``), else float32.

    On those the model runs faster and the bundled model's validation Dice is the same to the
    third decimal (the docs' Segment page). Decided on the driver, so that the manifest records
    it.
    """
    if precision != AUTO:
        return precision
    if use_gpu:
        return "bfloat16"
    try:
        with open(cpuinfo) as f:
            flags = next(
                (line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []
            )
    except OSError:
        flags = []
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "float32"


def resolve_batch(batch_size: int | None, use_gpu: bool) -> int:
    """``batch_size``, or the device's :data:`~lungseg.core.config.MODEL_BATCH`. Decided on the
    driver, so that the manifest records it (masks differ in the last bits with it)."""
    return batch_size or MODEL_BATCH["gpu" if use_gpu else "cpu"]


def train_worker_cpus(on: Cluster, workers: int, given: float | None = None) -> float:
    """CPUs per Ray Train worker: ``given``, else half the cluster's shared among the workers,
    and at most half the largest node's.

    Ray schedules by declared CPUs: while the workers train, Ray Data streams their shards
    through tasks of its own, and with every CPU given to workers those tasks never run and the
    job hangs silently (on a 2-core laptop, two 1-CPU workers do just that).
    """
    if given is not None:
        return given
    return max(0.1, round(min(on.cpus / max(workers, 1), on.node) / 2, 2))


def preprocess_pool(
    on: Cluster, resources: ResourceConfig = ResourceConfig(), reserved: float = 0.0
) -> Pool:
    """The preprocessing tasks' pool on the cluster, less the ``reserved`` CPUs of other actors:
    as many tasks at once as the spare CPUs hold.

    Each task declares :data:`SMALL_TASK` CPUs on nodes of up to :data:`SMALL_NODE` CPUs, else
    1 (or ``resources.actor_cpus``). ``resources.preprocess_actors`` fixes how many run at once.
    """
    fixed = resources.preprocess_actors
    each = resources.actor_cpus or (SMALL_TASK if on.node <= SMALL_NODE else 1.0)
    most = fixed or max(1, int(max(on.cpus - reserved, each) / each + 1e-9))
    return Pool(fixed or 1, most, cpus=each, tasks=True)


def segment_pools(
    on: Cluster, resources: ResourceConfig = ResourceConfig(), model_actors: int | None = None
) -> tuple[Pool, Pool]:
    """The preprocessing and model actor pools of a segment job on the cluster.

    On GPUs (``resources.device``, :func:`resolve_device`): a model actor per GPU (1 CPU each:
    writing the masks is left to CPU tasks), every other CPU to preprocessing. On CPUs: a model
    actor per :data:`CORES_PER_MODEL_ACTOR` cores, or per node where nodes are smaller, sharing
    :data:`MODEL_SHARE` of them (writing its masks too) and never declaring more than that share
    of a node, since an actor that fits on no node never starts; the rest to preprocessing
    (:func:`preprocess_pool`). ``model_actors`` fixes the model pool's size.
    """
    if resolve_device(resources, on).use_gpu:
        count = model_actors or on.gpus
        model = Pool(count, count, cpus=1.0, gpus=1, threads=2, calls=MODEL_CALLS)
    else:
        count = model_actors or max(1, round(on.cpus / min(CORES_PER_MODEL_ACTOR, on.node)))
        share = round(min(on.cpus / count, on.node) * MODEL_SHARE, 2)
        model = Pool(count, count, share, threads=max(1, math.ceil(share)), calls=MODEL_CALLS)
    return preprocess_pool(on, resources, model.size_cpus()), model


def task_batch(images: int, actors: int, most: int = PREPROCESS_BATCH) -> int:
    """Images per preprocessing task: ``most``, or fewer so that each actor gets four tasks."""
    return max(1, min(most, -(-images // (4 * max(actors, 1)))))


def preprocessed(
    cases: tuple[Case, ...] | list[Case],
    size: int,
    pool: Pool,
    store: Store = storage.DEFAULT_STORE,
    display: int = 0,
    train: bool = False,
    header: bool = False,
) -> ray.data.Dataset:
    """A lazy dataset of preprocessed cases, decoded by
    :class:`lungseg.stages.preprocess.Preprocess` in the tasks of ``pool`` (``display``,
    ``train``, ``header``: its columns)."""
    batch_size = task_batch(len(cases), pool.max_size)
    settings = {"display": display, "train": train, "header": header}
    return case_dataset(cases, batch_size).map_batches(
        preprocess_batch,
        fn_kwargs={"size": size, "store": store, **settings},
        compute=pool.strategy(),
        batch_size=batch_size,
        num_cpus=pool.cpus,
    )


_CASE_SCHEMA = pa.schema(
    [
        *((key, pa.string()) for key in ("id", "name", "source")),
        ("truth", pa.list_(pa.string())),
        *((key, pa.string()) for key in ("source_stamp", "truth_stamp")),
    ]
)


def case_dataset(cases: Sequence[Case], batch_size: int) -> ray.data.Dataset:
    """Catalog cases as a dataset of :func:`case_batch` rows, about one batch per block.

    One block per batch lets the stages downstream start early (and spreads the work over an
    actor pool); capped at 1000 blocks for huge sets. Each block is made in Arrow from its own
    cases and put in the object store at once: the driver never holds a Python row per case, nor
    all the blocks (``from_items`` of a million cases held both). Ray Data
    restarts an actor that died (a preempted node, a killed process) and runs its batch again;
    a batch whose function raises is dropped rather than failing the job, and
    :func:`write_table` gives its cases error rows.
    """
    per_block = max(batch_size, -(-len(cases) // 1000))
    blocks = [
        ray.put(pa.Table.from_pydict(case_batch(cases[start : start + per_block]), _CASE_SCHEMA))
        for start in range(0, len(cases), per_block)
    ] or [ray.put(_CASE_SCHEMA.empty_table())]
    dataset = ray.data.from_arrow_refs(blocks)
    dataset.context.max_errored_blocks = -1  # copied into every dataset derived from this one
    return dataset


QUEUE_BYTES = 128 << 20
"""Object store that a streaming job's blocks may hold at once, so that a fast stage runs at
most this far ahead of a slow one (about 2,000 images' model inputs): unbounded, preprocessing
queued a whole run for the model and the job's memory grew with the run (the docs' performance
page, memory row)."""


def bound_queue(dataset: ray.data.Dataset, queue_bytes: int = QUEUE_BYTES) -> None:
    """Cap the object store that ``dataset``'s execution holds at once (:data:`QUEUE_BYTES`)."""
    dataset.context.execution_options.resource_limits = ExecutionResources.for_limits(
        object_store_memory=queue_bytes
    )


def row_batches(rows: ray.data.Dataset | None) -> Iterator[pa.Table]:
    """A dataset's rows as pyarrow tables on the driver, block by block as they are done."""
    if rows is not None:
        yield from rows.iter_batches(batch_size=None, batch_format="pyarrow")
