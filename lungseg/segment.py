"""Batch inference: X-rays -> mask PNGs at each image's own size + one Parquet row per image.

Three overlapping Ray Data stages: OpenCV preprocessing actors, segmenting actors that load the
model once each (a GPU each when asked), and post-processing tasks that clean the mask, restore
the image's size, write the PNG and score it against the ground truth when there is one, and
with ``overlays`` draw the X-ray's overlay (:func:`lungseg.report.overlay`) there too.

Every image gets one row; with ``resume``, images whose row and files an earlier run already
wrote are kept, and only the rest are segmented (see :func:`run_segmentation`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray

from lungseg import catalog, imaging, pipeline, report, storage
from lungseg.config import SegmentConfig
from lungseg.metrics import confusion

TABLE_FILE = "segmentation.parquet"
MASKS_DIR = "masks"
NO_TRUTH = "no ground-truth mask found: not scored"
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


def load_model(uri: str, s3_endpoint: str | None = None):
    """Load a ``.keras`` model from a path or URI, without its optimizer."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    with tempfile.TemporaryDirectory() as folder:
        local = os.path.join(folder, os.path.basename(uri.rstrip("/")) or "model.keras")
        with open(local, "wb") as f:
            f.write(storage.read_bytes(uri, s3_endpoint))
        return keras.models.load_model(local, compile=False)


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
        self,
        model: str,
        batch_size: int,
        s3_endpoint: str | None = None,
        precision: str = "float32",
    ) -> None:
        from lungseg.model import with_precision

        single_inter_op_thread()
        self.model = with_precision(load_model(model, s3_endpoint), precision)
        self.batch_size = batch_size
        self.batches = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pipeline.inject_fault("segmenter", self.batches)
        self.batches += 1
        ok = batch["status"] == pipeline.OK
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
    case_id: str, source: str, status: str = pipeline.ERROR, error: str | None = None, **values
) -> dict:
    row = dict.fromkeys(SCHEMA.names)
    row |= {"id": case_id, "source": source, "status": status, "error": error or None, **values}
    return row


def _header(batch: dict[str, np.ndarray], i: int) -> dict[str, str | float | None]:
    """Row ``i``'s DICOM header columns, the actor's empty strings and NaN made null."""
    header: dict[str, str | float | None] = {}
    for key in pipeline.INFO_COLUMNS:
        value = batch[key][i]
        if isinstance(value, float | np.floating):
            header[key] = None if np.isnan(value) else float(value)
        else:
            header[key] = str(value) or None
    return header


def _write_overlay(
    display_png: bytes,
    mask: np.ndarray,
    truth: np.ndarray | None,
    uri: str,
    s3_endpoint: str | None,
) -> None:
    """Draw the overlay on the display copy of the X-ray (masks resized to it), write it."""
    display = imaging.decode(display_png, "display copy")
    masks = [None if m is None else imaging.resize_mask(m, *display.shape) for m in (mask, truth)]
    storage.write_bytes(uri, imaging.encode_image(report.overlay(display, *masks)), s3_endpoint)


def write_masks(
    batch: dict[str, np.ndarray],
    output: str,
    threshold: float,
    s3_endpoint: str | None,
    overlays: bool = False,
    truth_required: bool = False,
) -> dict[str, list]:
    """Ray Data task: post-process, restore size, write each mask PNG, score it; scalars out.

    Files are named by the case's output name (:func:`lungseg.catalog.output_name`):
    ``masks/<name>.png``. ``lung_area_mm2`` is the lung pixel count times the pixel area (row x
    column spacing), null where the spacing is unknown. With ``overlays`` (the batch then has
    ``display_png``), each image's overlay goes to ``overlays/<name>.png``. With
    ``truth_required`` (ground-truth masks were given), an image without one is ``flagged``.
    """
    rows = []
    for i, case_id in enumerate(batch["id"]):
        case_id, name, source = str(case_id), str(batch["name"][i]), str(batch["source"][i])
        if batch["status"][i] != pipeline.OK:
            rows.append(_row(case_id, source, error=str(batch["error"][i])))
            continue
        try:
            height, width = int(batch["height"][i]), int(batch["width"][i])
            small = imaging.postprocess(batch["probability"][i] / 255.0, threshold)
            mask = imaging.resize_mask(small, height, width)
            uri = storage.join(output, f"{MASKS_DIR}/{name}.png")
            storage.write_bytes(uri, imaging.encode_png(mask), s3_endpoint)
            header = _header(batch, i)
            row = _row(
                case_id,
                source,
                pipeline.OK,
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
                row |= {"status": pipeline.FLAGGED, "error": NO_TRUTH}
            if overlays:
                row["overlay"] = storage.join(output, f"{report.OVERLAYS_DIR}/{name}.png")
                _write_overlay(batch["display_png"][i], mask, truth, row["overlay"], s3_endpoint)
            rows.append(row)
        except Exception as exc:  # a bad image becomes an error row, never a crashed job
            rows.append(_row(case_id, source, error=f"{type(exc).__name__}: {exc}"))
    return {name: [row[name] for row in rows] for name in SCHEMA.names}


def run_segmentation(config: SegmentConfig) -> SegmentResult:
    """Segment every image under ``config.input``; masks and the Parquet table go to ``output``.

    With ``config.resume``, the rows that an earlier run with the same options left in the
    output root (its table, or the journal of an interrupted run) are kept where the row is not
    an ``error``, its source is the same and its mask (and overlay) files exist; only the other
    images are segmented, and the table holds both, as an uninterrupted run would.
    """
    storage.check_writable(config.output, config.s3_endpoint)
    found = catalog.find_cases(config.input, config.masks, config.s3_endpoint)
    print(f"catalog: {found.summary()}")
    cases = found.cases if config.ids is None else found.select(config.ids)
    table_uri = storage.join(config.output, TABLE_FILE)
    kept = _resumable(cases, table_uri, config) if config.resume else []
    done = {row["id"] for row in kept}
    todo = [case for case in cases if case.id not in done]
    if config.resume:
        print(f"resume: {len(kept)} images done by an earlier run, {len(todo)} to segment")
    res = config.resources
    budget = pipeline.CpuBudget.for_cluster(
        config.segment_actors, res.preprocess_actors, None, res.actor_cpus
    )
    rows = None
    if todo:
        rows = (
            pipeline.preprocessed(
                todo,
                _model_size(config),
                res.preprocess_actors,
                budget.actor,
                config.s3_endpoint,
                report.DISPLAY_SIZE if config.overlays else 0,
            )
            .map_batches(
                Segmenter,
                fn_constructor_kwargs={
                    "model": config.model,
                    "batch_size": config.batch_size,
                    "s3_endpoint": config.s3_endpoint,
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
                    "s3_endpoint": config.s3_endpoint,
                    "overlays": config.overlays,
                    "truth_required": config.masks is not None,
                },
                batch_size=pipeline.task_batch(len(todo), res.preprocess_actors),
                num_cpus=budget.actor,
            )
        )
    dice: list[float] = []
    statuses = pipeline.write_table(
        rows,
        table_uri,
        SCHEMA,
        cases,
        config.s3_endpoint,
        on_table=lambda table: dice.extend(d for d in table["dice"].to_pylist() if d is not None),
        known=kept,
        resume=config.resume,
    )
    return SegmentResult(
        output=config.output,
        table=table_uri,
        images=len(cases),
        flagged=statuses[pipeline.FLAGGED],
        failed=statuses[pipeline.ERROR],
        resumed=len(kept),
        mean_dice=float(np.mean(dice)) if dice else None,
    )


def _resumable(cases: Sequence[catalog.Case], table: str, config: SegmentConfig) -> list[dict]:
    """The rows of earlier runs that a resumed run keeps (see :func:`run_segmentation`)."""
    sources = {case.id: case.image for case in cases}
    written = set(storage.list_files(config.output, config.s3_endpoint))

    def exists(uri: str | None) -> bool:
        return uri is not None and storage.resolve(uri, config.s3_endpoint)[1] in written

    return [
        row
        for row in pipeline.previous_rows(table, SCHEMA, config.s3_endpoint)
        if sources.get(row["id"]) == row["source"]
        and row["status"] != pipeline.ERROR
        and exists(row["mask"])
        and (exists(row["overlay"]) if config.overlays else row["overlay"] is None)
    ]


def _model_size(config: SegmentConfig) -> int:
    """The model's input size, read from the model file on the driver."""
    return int(load_model(config.model, config.s3_endpoint).input_shape[1])
