"""Ray Data stages shared by the jobs: the case dataset, the preprocessing actor pool, the CPU
shares that keep a small machine from hanging, and rows streamed back to the driver."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import ray

from lungseg import storage
from lungseg.catalog import Case
from lungseg.config import PREPROCESS_BATCH
from lungseg.preprocess import Preprocess, case_records
from lungseg.storage import Store

FAULT_DIR = "LUNGSEG_FAULT_DIR"


@dataclass(frozen=True)
class CpuBudget:
    """CPU shares that let Ray Data actors, their read tasks and train workers share a machine.

    Ray schedules by declared CPUs: on a 2-core laptop, two 1-CPU train workers plus 1-CPU
    preprocessing actors leave nothing for Ray Data's own tasks and the job hangs silently.
    """

    worker: float
    actor: float

    @staticmethod
    def for_cluster(
        workers: int, actors: int, worker: float | None = None, actor: float | None = None
    ) -> CpuBudget:
        """Half the cluster's CPUs to train workers, the rest shared by actors and Ray's tasks."""
        total = float(ray.cluster_resources().get("CPU", 1.0))
        worker = worker if worker is not None else max(0.1, round(total / 2 / max(workers, 1), 2))
        actor = (
            actor if actor is not None else max(0.1, round(min(1.0, total / 2 / (actors + 1)), 2))
        )
        return CpuBudget(worker=worker, actor=actor)


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


def task_batch(images: int, actors: int, most: int = PREPROCESS_BATCH) -> int:
    """Images per preprocessing task: ``most``, or fewer so that each actor gets four tasks."""
    return max(1, min(most, -(-images // (4 * max(actors, 1)))))


def preprocessed(
    cases: tuple[Case, ...] | list[Case],
    size: int,
    actors: int,
    actor_cpus: float,
    store: Store = storage.DEFAULT_STORE,
    display: int = 0,
) -> ray.data.Dataset:
    """A lazy dataset of preprocessed cases, decoded in a pool of ``actors`` OpenCV actors.

    ``display`` > 0 adds the ``display_png`` column (see :class:`Preprocess`).
    """
    batch_size = task_batch(len(cases), actors)
    return case_dataset(cases, batch_size).map_batches(
        Preprocess,
        fn_constructor_kwargs={"size": size, "store": store, "display": display},
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=batch_size,
        num_cpus=actor_cpus,
    )


def case_dataset(cases: Sequence[Case], batch_size: int) -> ray.data.Dataset:
    """Catalog cases as a dataset of :func:`case_records` rows, about one batch per block.

    One block per batch lets the stages downstream start early (and spreads the work over an
    actor pool); capped at 1000 blocks for huge sets. Ray Data restarts an actor that died (a
    preempted node, a killed process) and runs its batch again; a batch whose function raises
    is dropped rather than failing the job, and :func:`write_table` gives its cases error rows.
    """
    records = case_records(cases)
    blocks = max(1, min(-(-len(records) // batch_size), 1000))
    dataset = ray.data.from_items(records, override_num_blocks=blocks)
    dataset.context.max_errored_blocks = -1  # copied into every dataset derived from this one
    return dataset


def row_batches(rows: ray.data.Dataset | None) -> Iterator[pa.Table]:
    """A dataset's rows as pyarrow tables on the driver, block by block as they are done."""
    if rows is not None:
        yield from rows.iter_batches(batch_size=None, batch_format="pyarrow")
