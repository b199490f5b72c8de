"""Batch inference: X-rays -> mask PNGs at each image's own size + one Parquet row per image.

Three overlapping Ray Data stages: OpenCV preprocessing actors, segmenting actors that load the
model once each (a GPU each when asked), and post-processing tasks that clean the mask, restore
the image's size, write the PNG and score it against the ground truth when there is one, and
with ``overlays`` draw the X-ray's overlay (:func:`lungseg.draw.overlay`) there too.

Every image gets one row; with ``resume``, images whose row and files an earlier run already
wrote are kept, and only the rest are segmented (see :func:`run_segmentation`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray

from lungseg import catalog, draw, imaging, modelfile, outputs, pipeline, qc, storage, table
from lungseg.config import SegmentConfig
from lungseg.layout import (
    ERROR,
    FLAGGED,
    MASKS_DIR,
    NO_TRUTH,
    OK,
    OVERLAYS_DIR,
    REPORT_ASSETS,
    REPORT_FILE,
    SEGMENT_TABLE,
    SUMMARY_FILE,
)
from lungseg.metrics import confusion
from lungseg.preprocess import INFO_COLUMNS
from lungseg.progress import Progress
from lungseg.storage import Store

logger = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("mask", pa.string()),
        ("overlay", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("modality", pa.string()),
        ("view_position", pa.string()),
        ("spacing_row_mm", pa.float64()),
        ("spacing_col_mm", pa.float64()),
        ("lung_fraction", pa.float64()),
        ("lung_area_mm2", pa.float64()),
        ("tp", pa.int64()),
        ("fp", pa.int64()),
        ("fn", pa.int64()),
        ("dice", pa.float64()),
        ("iou", pa.float64()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)


@dataclass(frozen=True)
class SegmentResult:
    """Where the masks and the table went, and how the images fared."""

    output: str
    table: str
    images: int
    flagged: int
    failed: int
    resumed: int  # rows kept from an earlier run (``resume``)
    mean_dice: float | None


def single_inter_op_thread() -> None:
    """Run TensorFlow's independent ops one at a time, each on all cores (intra-op threads).

    TensorFlow's default, an inter-op pool as wide as the machine, oversubscribes the cores
    that the pipeline's other actors share: with one inter-op thread the segment pipeline ran
    600 X-rays 8% faster on 2 cores. No effect once TensorFlow has started in this process.
    """
    import tensorflow as tf

    with contextlib.suppress(RuntimeError):  # TensorFlow already started (a test's process)
        tf.config.threading.set_inter_op_parallelism_threads(1)


class Segmenter:
    """Ray Data actor: one model load, then lung probabilities (uint8, 0-255) per batch.

    The model always sees ``batch_size`` images, the batch padded with black ones: TensorFlow's
    CPU kernels give an image results that differ in the last bits with the batch's size, and
    a mask must not depend on which images shared its batch (a resumed run has other batches).
    Test hook: ``LUNGSEG_FAULT_SEGMENTER=N`` exits once after N batches
    (:func:`lungseg.pipeline.inject_fault`).
    """

    def __init__(
        self, model: str, batch_size: int, store: Store, precision: str = "float32"
    ) -> None:
        from lungseg.model import load_model, with_precision

        single_inter_op_thread()
        self.model = with_precision(load_model(store.read_bytes(model)), precision)
        self.batch_size = batch_size
        self.batches = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pipeline.inject_fault("segmenter", self.batches)
        self.batches += 1
        ok = batch["status"] == OK
        probability = np.zeros(batch["image"].shape, np.uint8)
        if ok.any():
            n = int(ok.sum())
            images = np.zeros((max(n, self.batch_size), *batch["image"].shape[1:], 1), np.uint8)
            images[:n, ..., 0] = batch["image"][ok]
            predicted = self.model.predict_on_batch(images)[:n, ..., 0]
            probability[ok] = np.rint(np.asarray(predicted) * 255).astype(np.uint8)
        out = {k: v for k, v in batch.items() if k not in ("image", "mask")}
        out["probability"] = probability
        return out


def _row(
    case_id: str, source: str, status: str = ERROR, error: str | None = None, **values
) -> dict:
    row = dict.fromkeys(SCHEMA.names)
    row |= {"id": case_id, "source": source, "status": status, "error": error or None, **values}
    return row


def _header(batch: dict[str, np.ndarray], i: int) -> dict[str, str | float | None]:
    """Row ``i``'s DICOM header columns, the actor's empty strings and NaN made null."""
    header: dict[str, str | float | None] = {}
    for key in INFO_COLUMNS:
        value = batch[key][i]
        if isinstance(value, float | np.floating):
            header[key] = None if np.isnan(value) else float(value)
        else:
            header[key] = str(value) or None
    return header


def _write_overlay(
    display_png: bytes, mask: np.ndarray, truth: np.ndarray | None, uri: str, store: Store
) -> None:
    """Draw the overlay on the display copy of the X-ray (masks resized to it), write it."""
    display = imaging.decode(display_png, "display copy")
    masks = [None if m is None else imaging.resize_mask(m, *display.shape) for m in (mask, truth)]
    store.write_bytes(uri, imaging.encode_image(draw.overlay(display, *masks)))


def write_masks(
    batch: dict[str, np.ndarray],
    output: str,
    threshold: float,
    store: Store,
    overlays: bool = False,
    truth_required: bool = False,
) -> dict[str, list]:
    """Ray Data task: post-process, restore size, write each mask PNG, score it; scalars out.

    Files are named by the case's output name (:func:`lungseg.catalog.output_name`):
    ``masks/<name>.png``. ``lung_area_mm2`` is the lung pixel count times the pixel area (row x
    column spacing), null where the spacing is unknown. With ``overlays`` (the batch then has
    ``display_png``), each image's overlay goes to ``overlays/<name>.png``. An implausible mask
    (:func:`lungseg.qc.implausible`: no lung, one lung, far too much or too little) is
    ``flagged`` with the reasons in ``error``, as is, with ``truth_required`` (ground-truth
    masks were given), an image without one.
    """
    rows = []
    for i, case_id in enumerate(batch["id"]):
        case_id, name, source = str(case_id), str(batch["name"][i]), str(batch["source"][i])
        if batch["status"][i] != OK:
            rows.append(_row(case_id, source, error=str(batch["error"][i])))
            continue
        try:
            height, width = int(batch["height"][i]), int(batch["width"][i])
            small = imaging.postprocess(batch["probability"][i] / 255.0, threshold)
            doubts = qc.implausible(small)
            mask = imaging.resize_mask(small, height, width)
            uri = storage.join(output, f"{MASKS_DIR}/{name}.png")
            store.write_bytes(uri, imaging.encode_png(mask))
            header = _header(batch, i)
            row = _row(
                case_id,
                source,
                OK,
                mask=uri,
                height=height,
                width=width,
                lung_fraction=float(mask.mean()),
                **header,
            )
            if header["spacing_row_mm"] is not None and header["spacing_col_mm"] is not None:
                pixel_mm2 = header["spacing_row_mm"] * header["spacing_col_mm"]
                row["lung_area_mm2"] = int(mask.sum()) * pixel_mm2
            truth = None
            if batch["has_truth"][i]:
                truth = imaging.binarise(imaging.decode(batch["truth_png"][i], "truth"))
                counts = confusion(mask, truth)
                row |= {"tp": counts.tp, "fp": counts.fp, "fn": counts.fn}
                row |= {"dice": counts.dice, "iou": counts.iou}
            elif truth_required:
                doubts.append(NO_TRUTH)
            if doubts:
                row |= {"status": FLAGGED, "error": "; ".join(doubts)}
            if overlays:
                row["overlay"] = storage.join(output, f"{OVERLAYS_DIR}/{name}.png")
                _write_overlay(batch["display_png"][i], mask, truth, row["overlay"], store)
            rows.append(row)
        except Exception as exc:  # a bad image becomes an error row, never a crashed job
            rows.append(_row(case_id, source, error=f"{type(exc).__name__}: {exc}"))
    return {name: [row[name] for row in rows] for name in SCHEMA.names}


MAKES = (
    SEGMENT_TABLE,
    SEGMENT_TABLE + table.JOURNAL_SUFFIX,
    MASKS_DIR,
    OVERLAYS_DIR,
    SUMMARY_FILE,
    REPORT_FILE,
    REPORT_ASSETS,
)
"""What a segment or evaluate job (and a report of it) writes directly under its output root."""


def settings(config: SegmentConfig, model: modelfile.ModelFile) -> dict:
    """Every setting that changes a segment job's outputs: what its manifest records, and what
    a resumed run must share with the run it goes on with."""
    ids = None if config.ids is None else sorted(config.ids)
    return {
        "input": config.input,
        "masks": config.masks,
        "ids_sha256": None if ids is None else hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        "model_sha256": model.sha256,
        "model_input_size": model.size,
        "threshold": config.threshold,
        "precision": config.precision,
        "batch_size": config.batch_size,
        "overlays": config.overlays,
    }


def run_segmentation(
    config: SegmentConfig,
    progress: Progress | None = None,
    job: str = "segment",
    then: Callable[[SegmentResult, Store], None] | None = None,
) -> SegmentResult:
    """Segment every image under ``config.input``; masks and the Parquet table go to ``output``.

    The output root is claimed first (:func:`lungseg.outputs.claimed`): never where the job
    reads, one job at a time, one run per root. With ``config.resume``, the rows that the
    earlier run with the same settings left in the output root (its table, or the journal of an
    interrupted run) are kept where the row is not an ``error``, its source is the same and its
    mask (and overlay) files exist; only the other images are segmented, and the table holds
    both, as an uninterrupted run would. ``progress`` sees every image as its row is written;
    ``then`` (evaluate's summary) runs before the root is given up.
    """
    progress = progress or Progress()
    store = Store.for_job(config.s3_endpoint)
    model = modelfile.describe(store.read_bytes(config.model), config.model)
    found = catalog.find_cases(config.input, config.masks, store)
    logger.info("catalog: %s", found.summary())
    cases = found.cases if config.ids is None else found.select(config.ids)
    with outputs.claimed(
        store,
        config.output,
        job,
        settings(config, model),
        MAKES,
        reads={"--input": config.input, "--masks": config.masks},
        resume=config.resume,
        overwrite=config.overwrite,
    ) as claim:
        result = _segment(config, cases, model, store, claim.resumed, progress)
        if then is not None:
            then(result, store)
        claim.write_manifest(
            state="complete", images=result.images, flagged=result.flagged, failed=result.failed
        )
    return result


def _segment(
    config: SegmentConfig,
    cases: Sequence[catalog.Case],
    model: modelfile.ModelFile,
    store: Store,
    resume: bool,
    progress: Progress,
) -> SegmentResult:
    table_uri = storage.join(config.output, SEGMENT_TABLE)
    kept = _resumable(cases, table_uri, config, store) if resume else []
    done = {row["id"] for row in kept}
    todo = [case for case in cases if case.id not in done]
    if resume:
        logger.info("resume: %d images done by an earlier run, %d to segment", len(kept), len(todo))
    res = config.resources
    budget = pipeline.CpuBudget.for_cluster(
        config.segment_actors, res.preprocess_actors, None, res.actor_cpus
    )
    rows = None
    if todo:
        rows = (
            pipeline.preprocessed(
                todo,
                model.size,
                res.preprocess_actors,
                budget.actor,
                store,
                draw.DISPLAY_SIZE if config.overlays else 0,
            )
            .map_batches(
                Segmenter,
                fn_constructor_kwargs={
                    "model": config.model,
                    "batch_size": config.batch_size,
                    "store": store,
                    "precision": config.precision,
                },
                compute=ray.data.ActorPoolStrategy(size=config.segment_actors),
                batch_size=config.batch_size,
                num_cpus=budget.worker,
                num_gpus=1 if res.use_gpu else 0,
            )
            .map_batches(
                write_masks,
                fn_kwargs={
                    "output": config.output,
                    "threshold": config.threshold,
                    "store": store,
                    "overlays": config.overlays,
                    "truth_required": config.masks is not None,
                },
                batch_size=pipeline.task_batch(len(todo), res.preprocess_actors),
                num_cpus=budget.actor,
            )
        )
    dice: list[float] = []

    def account(rows: pa.Table) -> None:
        dice.extend(d for d in rows["dice"].to_pylist() if d is not None)
        progress.advance(rows.num_rows, rows["status"].to_pylist().count(ERROR))

    progress.start("segment", len(cases))
    statuses = table.write_table(
        pipeline.row_batches(rows),
        table_uri,
        SCHEMA,
        cases,
        store,
        on_table=account,
        known=kept,
        resume=resume,
    )
    progress.finish()
    return SegmentResult(
        output=config.output,
        table=table_uri,
        images=len(cases),
        flagged=statuses[FLAGGED],
        failed=statuses[ERROR],
        resumed=len(kept),
        mean_dice=float(np.mean(dice)) if dice else None,
    )


def _resumable(
    cases: Sequence[catalog.Case], table_uri: str, config: SegmentConfig, store: Store
) -> list[dict]:
    """The rows of earlier runs that a resumed run keeps (see :func:`run_segmentation`)."""
    sources = {case.id: case.image for case in cases}
    written = set(store.list_files(config.output))

    def exists(uri: str | None) -> bool:
        return uri is not None and store.resolve(uri)[1] in written

    return [
        row
        for row in table.previous_rows(table_uri, SCHEMA, store)
        if sources.get(row["id"]) == row["source"]
        and row["status"] != ERROR
        and exists(row["mask"])
        and (exists(row["overlay"]) if config.overlays else row["overlay"] is None)
    ]
