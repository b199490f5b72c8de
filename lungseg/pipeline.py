"""Ray Data stages built from imaging.py: the preprocessing actor and the dataset builder."""

from __future__ import annotations

import os
import posixpath
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from lungseg import imaging, report, storage
from lungseg.catalog import Case
from lungseg.config import PREPROCESS_BATCH

OK, FLAGGED, ERROR = "ok", "flagged", "error"
"""Row statuses: done; done but worth a look (why in ``error``); failed (why in ``error``)."""
FAULT_DIR = "LUNGSEG_FAULT_DIR"
LOST = "lost by the pipeline: its batch failed (see the Ray Data logs)"
JOURNAL_SUFFIX = ".parts"
_PART = re.compile(r"part-(\d+)\.parquet")
_FRESH = "fresh"  # marks a journal begun by a fresh run: the table beside it is stale
_TABLE = "table.parquet.tmp"  # the table being written, moved onto its place when complete
INFO_COLUMNS = tuple(f.name for f in fields(imaging.ImageInfo))
"""Header columns of :class:`Preprocess` output: strings (empty) and float64 (NaN) when unknown."""


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


def case_records(cases: tuple[Case, ...] | list[Case]) -> list[dict]:
    """Catalog cases as rows for ``ray.data.from_items``."""
    return [{"id": c.id, "name": c.name, "source": c.image, "truth": list(c.masks)} for c in cases]


class Preprocess:
    """Ray Data actor: read bytes through pyarrow, decode, grayscale, normalise, resize.

    Output columns: ``id``, ``name`` (of the output files), ``source``, ``image`` (uint8 size x
    size), ``mask`` (0/1 uint8 size x size, zeros without truth), ``truth_png`` (the truth at full
    size as PNG bytes, empty without truth), ``height``, ``width`` (the image's own size), the
    DICOM header's ``INFO_COLUMNS``, ``status``, ``error``; with ``display`` > 0 also
    ``display_png``, the normalised image shrunk to at most ``display`` pixels a side as PNG
    bytes (empty on error), for overlays. A failing image becomes a row with ``status ==
    "error"`` and the reason, never an exception.
    """

    def __init__(
        self, size: int, s3_endpoint: str | None = None, threads: int = 1, display: int = 0
    ) -> None:
        cv2.setNumThreads(threads)
        self.size = size
        self.s3_endpoint = s3_endpoint
        self.display = display

    def _one(self, source: str, truth: list[str]) -> dict:
        image, info = imaging.load_image_with_info(
            storage.read_bytes(source, self.s3_endpoint), source
        )
        row = {
            **asdict(info),
            "image": imaging.resize_image(image, self.size),
            "mask": np.zeros((self.size, self.size), np.uint8),
            "truth_png": b"",
            "height": image.shape[0],
            "width": image.shape[1],
        }
        if self.display:
            row["display_png"] = imaging.encode_image(report.downscale(image, self.display))
        if truth:
            mask = imaging.load_mask(
                [storage.read_bytes(uri, self.s3_endpoint) for uri in truth], truth
            )
            if mask.shape != image.shape:
                raise ValueError(
                    f"mask {mask.shape[1]}x{mask.shape[0]} differs from image "
                    f"{image.shape[1]}x{image.shape[0]}: {', '.join(truth)}"
                )
            row["mask"] = imaging.resize_mask(mask, self.size, self.size)
            row["truth_png"] = imaging.encode_png(mask)
        return row

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        blank = np.zeros((self.size, self.size), np.uint8)
        rows = []
        for source, truth in zip(batch["source"], batch["truth"], strict=True):
            truth = [str(t) for t in truth]
            try:
                rows.append({**self._one(str(source), truth), "status": OK, "error": ""})
            except Exception as exc:  # a bad image becomes an error row, never a crashed job
                rows.append(
                    {
                        "image": blank,
                        "mask": blank,
                        "truth_png": b"",
                        "display_png": b"",
                        "height": -1,
                        "width": -1,
                        **asdict(imaging.ImageInfo()),
                        "status": ERROR,
                        "error": f"{type(exc).__name__}: {exc}",
                    }
                )
        out = {
            key: np.array([r[key] for r in rows])
            for key in ("height", "width", *INFO_COLUMNS, "status", "error")
        }
        out["image"] = np.stack([r["image"] for r in rows])
        out["mask"] = np.stack([r["mask"] for r in rows])
        out["truth_png"] = np.array([r["truth_png"] for r in rows], dtype=object)
        if self.display:
            out["display_png"] = np.array([r["display_png"] for r in rows], dtype=object)
        out["id"] = batch["id"]
        out["name"] = batch["name"]
        out["source"] = batch["source"]
        out["has_truth"] = np.array([len(t) > 0 for t in batch["truth"]])
        return out


def task_batch(images: int, actors: int, most: int = PREPROCESS_BATCH) -> int:
    """Images per preprocessing task: ``most``, or fewer so that each actor gets four tasks."""
    return max(1, min(most, -(-images // (4 * max(actors, 1)))))


def preprocessed(
    cases: tuple[Case, ...] | list[Case],
    size: int,
    actors: int,
    actor_cpus: float,
    s3_endpoint: str | None = None,
    display: int = 0,
) -> ray.data.Dataset:
    """A lazy dataset of preprocessed cases, decoded in a pool of ``actors`` OpenCV actors.

    ``display`` > 0 adds the ``display_png`` column (see :class:`Preprocess`).
    """
    batch_size = task_batch(len(cases), actors)
    return case_dataset(cases, batch_size).map_batches(
        Preprocess,
        fn_constructor_kwargs={"size": size, "s3_endpoint": s3_endpoint, "display": display},
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


def _journal(uri: str) -> str:
    """The folder beside a job's table where it keeps its rows while it runs."""
    return f"{uri}{JOURNAL_SUFFIX}"


def _journal_parts(uri: str, s3_endpoint: str | None) -> tuple[list[str], bool]:
    """The journal's part files (paths, in order) and whether a fresh run started it."""
    files = {posixpath.basename(p): p for p in storage.list_files(_journal(uri), s3_endpoint)}
    parts = sorted((int(m[1]), p) for name, p in files.items() if (m := _PART.fullmatch(name)))
    return [path for _, path in parts], _FRESH in files


def previous_rows(uri: str, schema: pa.Schema, s3_endpoint: str | None = None) -> list[dict]:
    """The rows that earlier runs of a job left at ``uri``, for a resumed run to choose from.

    The complete table, unless the last run started afresh and was interrupted (its journal
    says so), then the journal's parts in the order written: a later row of an id replaces an
    earlier one. Unreadable files (a part cut short by a crash) are skipped with a message.
    """
    fs, path = storage.resolve(uri, s3_endpoint)
    parts, fresh = _journal_parts(uri, s3_endpoint)
    with storage.explained(uri):
        table_exists = fs.get_file_info(path).type == pafs.FileType.File
    rows: dict[str, dict] = {}
    for file in [path, *parts] if table_exists and not fresh else parts:
        try:
            table = pq.read_table(file, filesystem=fs, schema=schema)
        except (OSError, pa.ArrowException) as exc:
            print(f"resume: ignoring unreadable {file}: {exc}")
            continue
        rows.update((row["id"], row) for row in table.to_pylist())
    return list(rows.values())


def write_table(
    rows: ray.data.Dataset | None,
    uri: str,
    schema: pa.Schema,
    cases: Sequence[Case],
    s3_endpoint: str | None = None,
    on_table: Callable[[pa.Table], None] | None = None,
    known: Sequence[dict] = (),
    resume: bool = False,
) -> Counter[str]:
    """On the driver, stream ``rows`` into ONE Parquet file at ``uri``; count rows by status.

    ``rows`` holds exactly the (scalar) columns of ``schema``, among them ``id``, ``source``,
    ``status`` and ``error``; ``known`` rows (kept by a resumed run, or already on the driver)
    come first. Each case gets exactly one row: a repeated id (Ray running a batch again after a
    failure) keeps its first row, and a case whose id never came out of the pipeline gets an
    ``error`` row "lost by the pipeline". ``on_table`` sees every table as it is written.

    While it runs, each batch of rows also goes to a journal, ``<uri>.parts/``, for
    :func:`previous_rows` to read after an interruption; a fresh run (not ``resume``) first
    clears the journal of earlier runs. The table is written in the journal and moved onto
    ``uri`` when complete, so an earlier table stays whole until then; then the journal goes.
    """
    journal = _journal(uri)
    if resume:
        parts, _ = _journal_parts(uri, s3_endpoint)
    else:
        storage.remove_tree(journal, s3_endpoint)
        storage.write_bytes(storage.join(journal, _FRESH), b"", s3_endpoint)
        parts = []
    seen: set[str] = set()
    statuses: Counter[str] = Counter()

    def account(table: pa.Table) -> pa.Table:
        first = []
        for i, case_id in enumerate(table["id"].to_pylist()):
            if case_id not in seen:
                seen.add(case_id)
                first.append(i)
        table = table.take(pa.array(first, pa.int64()))
        statuses.update(table["status"].to_pylist())
        if on_table is not None:
            on_table(table)
        return table

    written = storage.join(journal, _TABLE)
    batches = () if rows is None else rows.iter_batches(batch_size=None, batch_format="pyarrow")
    with (
        storage.open_output(written, s3_endpoint) as stream,
        pq.ParquetWriter(stream, schema) as writer,
    ):
        writer.write_table(account(pa.Table.from_pylist(list(known), schema)))
        for batch in batches:
            table = account(batch.cast(schema))
            if table.num_rows:
                part = storage.join(journal, f"part-{len(parts):06d}.parquet")
                sink = pa.BufferOutputStream()
                pq.write_table(table, sink)
                storage.write_bytes(part, sink.getvalue().to_pybytes(), s3_endpoint)
                parts.append(part)
                writer.write_table(table)
        lost = [case for case in cases if case.id not in seen]
        why = {"status": ERROR, "error": LOST}
        rows_lost = [
            dict.fromkeys(schema.names) | {"id": c.id, "source": c.image} | why for c in lost
        ]
        writer.write_table(account(pa.Table.from_pylist(rows_lost, schema)))
    storage.replace(written, uri, s3_endpoint)
    storage.remove_tree(journal, s3_endpoint)
    return statuses
