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
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa

from lungseg import catalog, draw, imaging, modelfile, outputs, pipeline, qc, storage, table
from lungseg.config import BUNDLED_MODEL, SegmentConfig
from lungseg.layout import (
    ERROR,
    FLAGGED,
    LABELS_DIR,
    MASKS_DIR,
    NO_TRUTH,
    OK,
    OVERLAYS_DIR,
    REPORT_ASSETS,
    REPORT_FILE,
    REVIEW,
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
        ("labels", pa.string()),
        ("overlay", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("modality", pa.string()),
        ("view_position", pa.string()),
        ("spacing_row_mm", pa.float64()),
        ("spacing_col_mm", pa.float64()),
        ("lung_fraction", pa.float64()),
        ("lung_area_mm2", pa.float64()),
        ("right_lung_fraction", pa.float64()),
        ("left_lung_fraction", pa.float64()),
        ("right_lung_area_mm2", pa.float64()),
        ("left_lung_area_mm2", pa.float64()),
        ("tp", pa.int64()),
        ("fp", pa.int64()),
        ("fn", pa.int64()),
        ("dice", pa.float64()),
        ("iou", pa.float64()),
        ("qc_score", pa.float64()),
        ("qc", pa.string()),
        ("qc_reason", pa.string()),
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
    review: int = 0  # masks quality control sent to review (``qc``)


def tensorflow_threads(intra_op: int) -> None:
    """TensorFlow's thread pools for a model actor: one inter-op thread (independent ops run one
    at a time: TensorFlow's default, a pool as wide as the machine, oversubscribed the cores the
    other actors share, costing 8% on 2 cores) and ``intra_op`` threads per op, the CPUs the
    actor was given. No effect once TensorFlow has started in this process (a test's)."""
    import tensorflow as tf

    with contextlib.suppress(RuntimeError):
        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)


class Segmenter:
    """Ray Data actor: one model load, then lung probabilities per batch (``probability``, and
    ``second`` of each film's :func:`lungseg.qc.second_view` for quality control), and with
    ``write`` (on CPU nodes) the masks of each batch written by ``threads`` threads of its own.

    Writing here, where the image's size is known and the probabilities are at hand, spares a
    stage of tasks (their processes and a trip through the object store); on a GPU node the
    GPU would wait for the few CPUs of its actor, so there ``write`` is None and the batch
    goes on with ``probability`` (uint8, 0-255) to :func:`write_masks` tasks.

    The model always sees ``batch_size`` images, the batch padded with black ones: TensorFlow's
    CPU kernels give an image results that differ in the last bits with the batch's size, and
    a mask must not depend on which images shared its batch (a resumed run has other batches).
    Test hook: ``LUNGSEG_FAULT_SEGMENTER=N`` exits once after N batches
    (:func:`lungseg.pipeline.inject_fault`).
    """

    def __init__(
        self,
        model: str,
        batch_size: int,
        store: Store,
        precision: str,
        threads: int = 1,
        write: dict | None = None,
    ) -> None:
        from lungseg.model import load_model, with_precision

        tensorflow_threads(threads)
        self.model = with_precision(load_model(store.read_bytes(model)), precision)
        self.batch_size = batch_size
        self.batches = 0
        self.write = write
        self.writers = ThreadPoolExecutor(threads) if write is not None else None
        # Ray Data runs pipeline.MODEL_CALLS batches at once: one predicts, another writes.
        self.predicting = threading.Lock()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray | list]:
        ok = batch["status"] == OK
        out = {k: v for k, v in batch.items() if k != "image"}
        films = batch["image"][ok]
        seconds = np.array([qc.second_view(film) for film in films]).reshape(films.shape)
        with self.predicting:
            pipeline.inject_fault("segmenter", self.batches)
            self.batches += 1
            for key, views in (("probability", films), ("second", seconds)):
                out[key] = np.zeros(batch["image"].shape, np.uint8)
                if len(views):
                    out[key][ok] = self._predict(views)
        if self.writers is None:
            return out
        return _columns(self.writers.map(lambda i: write_row(out, i, **self.write), range(len(ok))))

    def _predict(self, films: np.ndarray) -> np.ndarray:
        """Probabilities (uint8, 0-255) of a stack of films, padded to the batch size."""
        n = len(films)
        images = np.zeros((max(n, self.batch_size), *films.shape[1:], 1), np.uint8)
        images[:n, ..., 0] = films
        return imaging.probability_bytes(self.model.predict_on_batch(images)[:n, ..., 0])


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


def write_row(
    batch: dict[str, np.ndarray],
    i: int,
    output: str,
    threshold: float,
    calibration: qc.Calibration,
    store: Store,
    overlays: bool = False,
    truth_required: bool = False,
) -> dict:
    """Post-process row ``i`` of a batch of probabilities, restore its size, write its mask PNG
    (and overlay), score it: its table row, never an exception.

    Files are named by the case's output name (:func:`lungseg.catalog.output_name`):
    ``masks/<name>.png`` (0/255) and ``labels/<name>.png`` (0, 1 the patient's right lung, 2 the
    left: :func:`lungseg.imaging.lung_labels`). ``lung_area_mm2`` (and its ``right_``/``left_``
    parts) is the pixel count times the pixel area (row x column spacing), null where the
    spacing is unknown. With ``overlays`` (the batch then has
    ``display_png``), the overlay goes to ``overlays/<name>.png``. ``qc_score``, ``qc`` (``ok``
    or ``review``) and ``qc_reason`` come from :func:`lungseg.qc.assess`, with ``second`` the
    probabilities of the film's second view. An implausible mask
    (:func:`lungseg.qc.implausible`: no lung, one lung, far too much or too little) is also
    ``flagged`` with the reasons in ``error``, as is, with ``truth_required`` (ground-truth
    masks were given), an image without one.
    """
    case_id, name, source = str(batch["id"][i]), str(batch["name"][i]), str(batch["source"][i])
    if batch["status"][i] != OK:
        return _row(case_id, source, error=str(batch["error"][i]))
    try:
        height, width = int(batch["height"][i]), int(batch["width"][i])
        probability = batch["probability"][i] / 255.0
        small = imaging.postprocess(probability, threshold)
        second = batch["second"][i] / 255.0
        quality = qc.assess(small, probability, second, threshold, calibration)
        doubts = list(quality.reasons) if quality.implausible else []
        mask = imaging.resize_mask(small, height, width)
        uri = storage.join(output, f"{MASKS_DIR}/{name}.png")
        store.write_bytes(uri, imaging.encode_png(mask))
        split = imaging.lungs_split(small)
        labels_uri = storage.join(output, f"{LABELS_DIR}/{name}.png")
        store.write_bytes(labels_uri, imaging.encode_image(imaging.lung_labels(mask, split)))
        right = imaging.right_columns(width, split)
        pixels = {"": cv2.countNonZero(mask), "right_": cv2.countNonZero(mask[:, :right])}
        pixels["left_"] = pixels[""] - pixels["right_"]
        header = _header(batch, i)
        row = _row(case_id, source, OK, mask=uri, labels=labels_uri, height=height, width=width)
        row |= header | {
            "qc_score": quality.score,
            "qc": REVIEW if quality.review else OK,
            "qc_reason": "; ".join(quality.reasons) or None,
        }
        pixel_mm2 = None
        if header["spacing_row_mm"] is not None and header["spacing_col_mm"] is not None:
            pixel_mm2 = header["spacing_row_mm"] * header["spacing_col_mm"]
        for side, count in pixels.items():
            row[f"{side}lung_fraction"] = count / (height * width)
            row[f"{side}lung_area_mm2"] = None if pixel_mm2 is None else count * pixel_mm2
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
        return row
    except Exception as exc:  # a bad image becomes an error row, never a crashed job
        return _row(case_id, source, error=f"{type(exc).__name__}: {exc}")


def write_masks(batch: dict[str, np.ndarray], **options) -> dict[str, list]:
    """Ray Data task (on GPU nodes): :func:`write_row` for every row; scalar columns out."""
    return _columns(write_row(batch, i, **options) for i in range(len(batch["id"])))


def _columns(rows: Iterable[dict]) -> dict[str, list]:
    """Table rows as the columns of :data:`SCHEMA`, the batch a Ray Data stage hands on."""
    rows = list(rows)
    return {name: [row[name] for row in rows] for name in SCHEMA.names}


MAKES = (
    SEGMENT_TABLE,
    SEGMENT_TABLE + table.JOURNAL_SUFFIX,
    MASKS_DIR,
    LABELS_DIR,
    OVERLAYS_DIR,
    SUMMARY_FILE,
    REPORT_FILE,
    REPORT_ASSETS,
)
"""What a segment or evaluate job (and a report of it) writes directly under its output root."""


def calibration(model: modelfile.ModelFile, name: str) -> qc.Calibration:
    """The quality-control calibration that scores a model's masks: its own (a lungseg trainer
    stores it in the model file); for a file without one, the bundled model's, with a
    warning, as scores in another model's units may send more or fewer films to review."""
    if model.calibration is not None:
        return model.calibration
    logger.warning(
        "%s has no quality-control calibration (not trained by this lungseg): "
        "qc_score uses the bundled model's, and may send more or fewer masks to review",
        name,
    )
    bundled = modelfile.describe(Path(BUNDLED_MODEL).read_bytes()).calibration
    assert bundled is not None, "the bundled model is calibrated"
    return bundled


def settings(config: SegmentConfig, model: modelfile.ModelFile, scoring: qc.Calibration) -> dict:
    """Every setting that changes a segment job's outputs: what its manifest records, and what
    a resumed run must share with the run it goes on with."""
    ids = None if config.ids is None else sorted(config.ids)
    return {
        "input": config.input,
        "masks": config.masks,
        "ids_sha256": None if ids is None else hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        "model_sha256": model.sha256,
        "model_input_size": model.size,
        "qc_calibration": asdict(scoring),
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
    precision = pipeline.resolve_precision(config.precision, config.resources.use_gpu)
    config = replace(config, precision=precision)  # what the manifest records
    model = modelfile.describe(store.read_bytes(config.model), config.model)
    scoring = calibration(model, config.model)
    found = catalog.find_cases(config.input, config.masks, store)
    logger.info("catalog: %s", found.summary())
    cases = found.cases if config.ids is None else found.select(config.ids)
    with outputs.claimed(
        store,
        config.output,
        job,
        settings(config, model, scoring),
        MAKES,
        reads={"--input": config.input, "--masks": config.masks},
        resume=config.resume,
        overwrite=config.overwrite,
    ) as claim:
        result = _segment(config, cases, model, scoring, store, claim.resumed, progress)
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
    scoring: qc.Calibration,
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
    cpus, gpus, node_cpus = pipeline.cluster_resources()
    preprocess, models = pipeline.segment_pools(
        cpus,
        gpus,
        res.use_gpu,
        config.segment_actors,
        res.preprocess_actors,
        res.actor_cpus,
        node_cpus,
    )
    write = {
        "output": config.output,
        "threshold": config.threshold,
        "calibration": scoring,
        "store": store,
        "overlays": config.overlays,
        "truth_required": config.masks is not None,
    }
    rows = None
    if todo:
        rows = pipeline.preprocessed(
            todo, model.size, preprocess, store, draw.DISPLAY_SIZE if config.overlays else 0
        )
        pipeline.bound_queue(rows)
        rows = rows.map_batches(
            Segmenter,
            fn_constructor_kwargs={
                "model": config.model,
                "batch_size": config.batch_size,
                "store": store,
                "precision": config.precision,
                "threads": models.threads,
                "write": None if res.use_gpu else write,
            },
            compute=models.strategy(),
            batch_size=config.batch_size,
            num_cpus=models.cpus,
            num_gpus=models.gpus,
        )
        if res.use_gpu:
            rows = rows.map_batches(
                write_masks,
                fn_kwargs=write,
                batch_size=pipeline.task_batch(len(todo), preprocess.max_size),
                num_cpus=1,
            )
    dice: list[float] = []
    review = sum(row["qc"] == REVIEW for row in kept)

    def account(rows: pa.Table) -> None:
        nonlocal review
        dice.extend(d for d in rows["dice"].to_pylist() if d is not None)
        review += rows["qc"].to_pylist().count(REVIEW)
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
        review=review,
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
        and exists(row["labels"])
        and (exists(row["overlay"]) if config.overlays else row["overlay"] is None)
    ]
