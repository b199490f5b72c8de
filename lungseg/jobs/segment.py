"""Batch inference: X-rays -> mask PNGs at each image's own size + one Parquet row per image.

Three overlapping Ray Data stages: OpenCV preprocessing tasks, segmenting actors that load the
model once each (a GPU each when asked), and a :class:`MaskWriter` that cleans the mask,
restores the image's size, writes the PNGs and scores the mask against the ground truth when
there is one (in the segmenting actor on CPU nodes, in tasks of its own on GPU nodes).

A job runs in three steps: :func:`plan_segmentation` checks everything that needs no Ray (the
model, loaded in a process of its own; the catalog; where it writes), then with Ray up
:func:`segment_cases` runs on the claimed output root. Every image gets one row, with the
fingerprints of the files it read and wrote; with ``resume``, the rows of an earlier run whose
inputs and files are still the same are kept, and only the rest are segmented (see
:func:`resumable`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa

from lungseg.core import dicomseg, draw, imaging, qc
from lungseg.core.config import BUNDLED_MODEL, SegmentConfig
from lungseg.core.layout import (
    DICOM_SEG_DIR,
    ERROR,
    FLAGGED,
    LABELS_DIR,
    MASKS_DIR,
    NO_DICOM_SEG,
    NO_TRUTH,
    OK,
    OVERLAYS_DIR,
    PROBABILITIES_DIR,
    REVIEW,
    SEGMENT,
    SEGMENT_TABLE,
)
from lungseg.core.metrics import confusion
from lungseg.core.progress import Progress
from lungseg.io import catalog, storage
from lungseg.io.storage import Store
from lungseg.model import loadcheck, modelfile
from lungseg.runs import outputs, table
from lungseg.stages import pipeline
from lungseg.stages.preprocess import INFO_COLUMNS

logger = logging.getLogger(__name__)

EMPTY_TRUTH = "the ground-truth mask is empty (no non-zero pixel): not scored"
"""The ``error`` of a ``flagged`` image whose ground truth holds no lung."""

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("mask", pa.string()),
        ("labels", pa.string()),
        ("overlay", pa.string()),
        ("probability", pa.string()),
        ("dicom_seg", pa.string()),
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
        ("qc_dice", pa.float64()),
        ("qc_score", pa.float64()),
        ("qc", pa.string()),
        ("qc_reason", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("source_fingerprint", pa.string()),
        ("source_stamp", pa.string()),
        ("truth_fingerprint", pa.string()),
        ("truth_stamp", pa.string()),
        ("mask_fingerprint", pa.string()),
        ("labels_fingerprint", pa.string()),
        ("overlay_fingerprint", pa.string()),
        ("probability_fingerprint", pa.string()),
        ("dicom_seg_fingerprint", pa.string()),
    ]
)


@dataclass(frozen=True)
class SegmentResult:
    """Where the masks and the table went, and how the images fared."""

    output: str
    table: str
    images: int
    flagged: int
    failed_ids: tuple[str, ...]  # the ids of the ``error`` rows, in id order
    resumed: int  # rows kept from an earlier run (``resume``)
    mean_dice: float | None
    review: int = 0  # masks quality control sent to review (``qc``)
    dicom_segs: int = 0  # DICOM SEG objects written (``dicom_seg``)
    not_dicom: int = 0  # images segmented without one, not being DICOM (with ``dicom_seg``)
    planned: int | None = None  # with ``dry_run``: the images a run would segment, none done

    @property
    def failed(self) -> int:
        return len(self.failed_ids)

    def outcome(self) -> dict:
        """What the manifest records of the run (:func:`lungseg.runs.outputs.outcome`)."""
        return outputs.outcome(
            self.images, self.flagged, self.failed_ids, self.resumed, self.review
        )


def tensorflow_threads(intra_op: int) -> None:
    """TensorFlow's thread pools for a model actor: one inter-op thread (independent ops run one
    at a time: TensorFlow's default, a pool as wide as the machine, oversubscribed the cores the
    other actors share: the docs' performance page has its cost) and ``intra_op`` threads per
    op, the CPUs the
    actor was given. No effect once TensorFlow has started in this process (a test's)."""
    import tensorflow as tf

    with contextlib.suppress(RuntimeError):
        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)


@dataclass(frozen=True)
class MaskWriter:
    """How a batch of probabilities becomes files and table rows under ``output``: cut at
    ``threshold``, scored by quality control in ``calibration``'s units (None: ``--qc off``,
    implausible masks still flagged), with an overlay each
    when ``overlays``, the probability map when ``probabilities``, and a DICOM Segmentation
    of each DICOM image drawn by ``dicom_seg`` when given; ``truth_required`` (ground-truth
    masks were given) flags an image without one."""

    output: str
    threshold: float
    calibration: qc.Calibration | None
    store: Store
    overlays: bool = False
    truth_required: bool = False
    probabilities: bool = False
    dicom_seg: dicomseg.Algorithm | None = None

    def files(self) -> tuple[str, ...]:
        """The table's columns that name a file of every image, in the order of :meth:`keys`
        (a DICOM image's SEG, ``dicom_seg``, comes after them)."""
        return ("mask", "labels", *self._optional("overlay", "probability"))

    def _optional(self, overlay: str, probability: str) -> tuple[str, ...]:
        return (overlay,) * self.overlays + (probability,) * self.probabilities

    def keys(self, name: str) -> list[str]:
        """The files that may be written for the case whose output name is ``name``, relative
        to the root: those of :meth:`files`, then a SEG (where the image turns out to be
        DICOM)."""
        folders = (MASKS_DIR, LABELS_DIR, *self._optional(OVERLAYS_DIR, PROBABILITIES_DIR))
        seg = [f"{DICOM_SEG_DIR}/{name}.dcm"] if self.dicom_seg is not None else []
        return [f"{folder}/{name}.png" for folder in folders] + seg

    def _write(self, key: str, data: bytes) -> str:
        """Write one file under the root; its fingerprint."""
        self.store.write_bytes(storage.join(self.output, key), data)
        return storage.fingerprint(data)

    def row(self, batch: dict[str, np.ndarray], i: int) -> dict:
        """Post-process row ``i`` of a batch of probabilities, restore its size, write its mask
        PNG (and overlay), score it: its table row, never an exception.

        Files are named by the case's output name (:func:`lungseg.io.catalog.output_name`):
        ``masks/<name>.png`` (0/255) and ``labels/<name>.png`` (0, 1 the patient's right lung, 2
        the left: :func:`lungseg.core.imaging.lung_labels`); the row holds these keys relative to
        the output root, and their fingerprints. ``lung_area_mm2`` (and its ``right_``/``left_``
        parts) is the pixel count times the pixel area (row x column spacing), null where the
        spacing is unknown. With ``overlays`` (the batch then has ``display_png``), the overlay
        goes to ``overlays/<name>.png``; with ``probabilities``, the model's probabilities (the
        batch's ``probability``, 0-255 at the model's input size) to
        ``probabilities/<name>.png``. With ``dicom_seg`` (the batch then has
        ``dicom_header``), a DICOM image's labels also go to ``dicom-seg/<name>.dcm``
        (:func:`lungseg.core.dicomseg.segmentation`); one that cannot be made (a header without
        the UIDs to reference) flags the image, its PNGs written. ``qc_dice`` (the Dice the
        mask is predicted to have), ``qc_score``, ``qc`` (``ok`` or ``review``) and
        ``qc_reason`` come from :func:`lungseg.core.qc.assess`. An implausible mask
        (:func:`lungseg.core.qc.implausible`: no lung, one lung, far too much or too little) is
        also ``flagged`` with the reasons in ``error``, as is an empty ground truth (not scored)
        and, with ``truth_required``, an image without one.
        """
        case_id, name, source = str(batch["id"][i]), str(batch["name"][i]), str(batch["source"][i])
        read = {key: str(batch[key][i]) or None for key in _READ}
        if batch["status"][i] != OK:  # unread (error), or read and not for this model (flagged)
            status, error = str(batch["status"][i]), str(batch["error"][i])
            return _row(case_id, source, status, error, **read) | _header(batch, i)
        try:
            height, width = int(batch["height"][i]), int(batch["width"][i])
            probability = batch["probability"][i] / 255.0
            small = imaging.postprocess(probability, self.threshold)
            quality = None
            if self.calibration is None:
                doubts = qc.implausible(small)
            else:
                film = batch["image"][i]
                quality = qc.assess(small, probability, film, self.calibration)
                doubts = list(quality.reasons) if quality.implausible else []
            mask = imaging.resize_mask(small, height, width)
            split = imaging.lungs_split(small)
            paths = self.keys(name)
            files = self.files()
            keys = dict(zip(files, paths[: len(files)], strict=True))
            row = _row(case_id, source, OK, **keys, **read)
            row["mask_fingerprint"] = self._write(keys["mask"], imaging.encode_png(mask))
            labels = imaging.lung_labels(mask, split)
            labels_png = imaging.encode_image(labels, flat=True)
            row["labels_fingerprint"] = self._write(keys["labels"], labels_png)
            if self.probabilities:
                picture = imaging.encode_image(batch["probability"][i])
                row["probability_fingerprint"] = self._write(keys["probability"], picture)
            if self.dicom_seg is not None and len(batch["dicom_header"][i]):
                try:
                    seg = dicomseg.segmentation(batch["dicom_header"][i], labels, self.dicom_seg)
                except Exception as exc:  # a header that cannot be referenced: the PNGs stand
                    doubts.append(f"{NO_DICOM_SEG}: {exc}")
                else:
                    row["dicom_seg"] = paths[-1]
                    row["dicom_seg_fingerprint"] = self._write(paths[-1], seg)
            right = imaging.right_columns(width, split)
            pixels = {"": cv2.countNonZero(mask), "right_": cv2.countNonZero(mask[:, :right])}
            pixels["left_"] = pixels[""] - pixels["right_"]
            header = _header(batch, i)
            row |= header | {"height": height, "width": width}
            if quality is not None:
                row |= {
                    "qc_dice": quality.dice,
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
                if not truth.any():
                    doubts.append(EMPTY_TRUTH)
                    truth = None
            elif self.truth_required:
                doubts.append(NO_TRUTH)
            if truth is not None:
                counts = confusion(mask, truth)
                row |= {"tp": counts.tp, "fp": counts.fp, "fn": counts.fn}
                row |= {"dice": counts.dice, "iou": counts.iou}
            if doubts:
                row |= {"status": FLAGGED, "error": "; ".join(doubts)}
            if self.overlays:
                picture = _overlay(batch["display_png"][i], mask, truth)
                row["overlay_fingerprint"] = self._write(keys["overlay"], picture)
            return row
        except Exception as exc:  # a bad image becomes an error row, never a crashed job
            return _row(case_id, source, error=f"{type(exc).__name__}: {exc}", **read)

    def rows(self, batch: dict[str, np.ndarray], indices: Iterable[int] | None = None) -> list:
        """:meth:`row` of each row of ``batch``."""
        return [self.row(batch, i) for i in indices or range(len(batch["id"]))]


_READ = ("source_fingerprint", "source_stamp", "truth_fingerprint", "truth_stamp")


class Segmenter:
    """Ray Data actor: one model load, then lung probabilities per batch (``probability``: one
    pass of the model, quality control included), and with a ``writer`` (on CPU nodes) the masks
    of each batch written by ``threads`` threads of its own.

    Writing here, where the image's size is known and the probabilities are at hand, spares a
    stage of tasks (their processes and a trip through the object store); on a GPU node the
    GPU would wait for the few CPUs of its actor, so there ``writer`` is None and the batch
    goes on with ``probability`` (uint8, 0-255) and the ``image`` quality control reads to
    :func:`write_masks` tasks.

    The model always sees ``batch_size`` images, the batch padded with black ones: TensorFlow's
    CPU kernels give an image results that differ in the last bits with the batch's size, and
    a mask must not depend on which images shared its batch (a resumed run has other batches).
    Test hook: ``LUNGSEG_FAULT_SEGMENTER=N`` exits once after N batches
    (:func:`lungseg.stages.pipeline.inject_fault`).
    """

    def __init__(
        self,
        model: str,
        batch_size: int,
        store: Store,
        precision: str,
        threads: int = 1,
        writer: MaskWriter | None = None,
    ) -> None:
        from lungseg.model.unet import for_inference, load_model

        tensorflow_threads(threads)
        self.model = for_inference(load_model(store.read_bytes(model)), precision)
        self.batch_size = batch_size
        self.batches = 0
        self.writer = writer
        self.writers = ThreadPoolExecutor(threads) if writer is not None else None
        # Ray Data runs pipeline.MODEL_CALLS batches at once: one predicts, another writes.
        self.predicting = threading.Lock()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray | list]:
        ok = batch["status"] == OK
        out = dict(batch)  # the image stays: quality control reads it
        films = batch["image"][ok]
        with self.predicting:
            pipeline.inject_fault("segmenter", self.batches)
            self.batches += 1
            out["probability"] = np.zeros(batch["image"].shape, np.uint8)
            if len(films):
                out["probability"][ok] = self._predict(films)
        if self.writers is None or self.writer is None:
            return out
        write = self.writer.row
        return _columns(self.writers.map(lambda i: write(out, i), range(len(ok))))

    def _predict(self, films: np.ndarray) -> np.ndarray:
        """Probabilities (uint8, 0-255) of a stack of images, padded to the batch size."""
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


def _overlay(display_png: bytes, mask: np.ndarray, truth: np.ndarray | None) -> bytes:
    """The overlay's PNG, drawn on the display copy of the X-ray (masks resized to it)."""
    display = imaging.decode(display_png, "display copy")
    masks = [None if m is None else imaging.resize_mask(m, *display.shape) for m in (mask, truth)]
    return imaging.encode_image(draw.overlay(display, *masks))


def write_masks(batch: dict[str, np.ndarray], writer: MaskWriter) -> dict[str, list]:
    """Ray Data task (on GPU nodes): :meth:`MaskWriter.row` for every row; scalar columns out."""
    return _columns(writer.rows(batch))


def _columns(rows: Iterable[dict]) -> dict[str, list]:
    """Table rows as the columns of :data:`SCHEMA`, the batch a Ray Data stage hands on."""
    rows = list(rows)
    return {name: [row[name] for row in rows] for name in SCHEMA.names}


def calibration(model: modelfile.ModelFile, name: str) -> tuple[qc.Calibration, str | None]:
    """The quality-control calibration that scores a model's masks: its own (a lungseg trainer
    stores it in the model file); for a file without one, the bundled model's, with a
    warning, as scores in another model's units may send more or fewer images to review. The
    second value says why the model's own is not used (None where it is): the manifest
    records it and the report shows it."""
    if model.calibration is not None:
        return model.calibration, None
    why = (
        f"its calibration could not be measured ({model.calibration_missing})"
        if model.calibration_missing
        else "it has none (not trained by a lungseg trainer)"
    )
    logger.warning(
        "%s: %s: qc_score uses the bundled model's calibration, and may send more or fewer "
        "masks to review",
        name,
        why,
    )
    bundled = modelfile.describe(Path(BUNDLED_MODEL).read_bytes()).calibration
    assert bundled is not None, "the bundled model is calibrated"
    return bundled, f"the bundled model's: {why}"


@dataclass(frozen=True)
class SegmentPlan:
    """A segment job checked and catalogued before Ray starts: what :func:`segment_cases`
    runs. ``config`` has its precision made concrete; ``reads`` names every root and file the
    job reads, by option, for the overlap check."""

    config: SegmentConfig
    store: Store
    model: modelfile.ModelFile
    scoring: qc.Calibration | None  # None with ``--qc off``
    borrowed: str | None  # why ``scoring`` is not the model's own (:func:`calibration`)
    found: catalog.Catalog
    cases: tuple[catalog.Case, ...]
    reads: dict[str, str | None]
    selected: bool = False  # the cases are some of the catalog's (--ids, --limit, a split)

    def settings(self) -> dict:
        """Every setting that changes a segment job's outputs: what its manifest records, and
        what a resumed run must share with the run it goes on with."""
        config = self.config
        ids = "\n".join(case.id for case in self.cases)
        return {
            "input": config.input,
            "masks": config.masks,
            "ids": config.ids,
            "limit": config.limit,
            "ids_sha256": hashlib.sha256(ids.encode()).hexdigest() if self.selected else None,
            "model_sha256": self.model.sha256,
            "model_input_size": self.model.size,
            "qc": config.qc,
            "qc_calibration": None if self.scoring is None else asdict(self.scoring),
            "qc_calibration_borrowed": self.borrowed,
            "threshold": config.threshold,
            "precision": config.precision,
            "batch_size": config.batch_size,
            "overlays": config.overlays,
            "save_probabilities": config.save_probabilities,
            "dicom_seg": config.dicom_seg,
        }

    def writer(self) -> MaskWriter:
        config = self.config
        return MaskWriter(
            output=config.output,
            threshold=config.threshold,
            calibration=self.scoring,
            store=self.store,
            overlays=config.overlays,
            truth_required=config.masks is not None,
            probabilities=config.save_probabilities,
            dicom_seg=dicomseg.Algorithm(self.model.sha256, self.model.size, config.threshold)
            if config.dicom_seg
            else None,
        )

    def placed(self) -> tuple[SegmentPlan, tuple[pipeline.Pool, pipeline.Pool]]:
        """On the Ray cluster this process is attached to: the plan with its device,
        precision and batch made concrete (what the manifest records:
        :func:`lungseg.stages.pipeline.resolve_device`, :func:`~lungseg.stages.pipeline.
        resolve_precision`, :func:`~lungseg.stages.pipeline.resolve_batch`) and its
        preprocessing and model pools (:func:`lungseg.stages.pipeline.segment_pools`),
        refused where they could never start."""
        on = pipeline.cluster()
        resources = pipeline.resolve_device(self.config.resources, on)
        precision = pipeline.resolve_precision(self.config.precision, resources.use_gpu)
        batch = pipeline.resolve_batch(self.config.batch_size, resources.use_gpu)
        config = replace(self.config, resources=resources, precision=precision, batch_size=batch)
        plan = replace(self, config=config)
        preprocess, models = pipeline.segment_pools(on, resources, self.config.segment_actors)
        pipeline.check_fits(
            {"--preprocess-actors/--actor-cpus": preprocess, "--segment-actors": models}, on
        )
        return plan, (preprocess, models)

    def claimed(self, job: str) -> contextlib.AbstractContextManager[outputs.Claim]:
        """Hold the output root for this run (:func:`lungseg.runs.outputs.claimed`)."""
        return outputs.claimed(
            self.store,
            self.config.output,
            SEGMENT,
            job,
            self.settings(),
            reads=self.reads,
            resume=self.config.resume,
            overwrite=self.config.overwrite,
        )


def plan_segmentation(
    config: SegmentConfig,
    reads: dict[str, str | None] | None = None,
    wanted: tuple[str, ...] | None = None,
    meanwhile: Callable[[], None] | None = None,
) -> SegmentPlan:
    """Everything of a segment job that needs no Ray, checked before any work: where it reads
    and writes (apart), with ``dicom_seg`` highdicom, the catalog and the images of it to
    segment (``--ids``, ``--limit``: :meth:`lungseg.io.catalog.Catalog.select`), and the model:
    refused in one line unless Keras loads it and it maps one X-ray to one map of
    probabilities, checked in a process of its own while the catalog is listed
    (:func:`lungseg.model.loadcheck.checking`: TensorFlow never starts in the driver).
    ``reads`` adds to what the job reads (an evaluation's split file), ``wanted`` are the ids
    it chose (the split's). ``meanwhile`` (starting Ray) runs once the catalog is listed,
    while the model's check goes on: the two took 5.6 and 2.5-4.6 s one after the other here,
    more than half of a 400-image run's fixed cost."""
    if config.dicom_seg:
        dicomseg.require()
    store = Store.for_job(config.s3_endpoint)
    reads = {
        "--input": config.input,
        "--masks": config.masks,
        "--model": config.model,
        "--ids": config.ids,
    } | (reads or {})
    outputs.check_apart(store, config.output, reads)
    if config.ids is not None:
        wanted = catalog.read_ids(config.ids, store)
    for root, what in ((config.input, "images"), (config.masks, "masks")):
        if root is not None:  # the likeliest typos: before the model's check starts
            catalog.check_root(root, what, store)
    logger.info("checking model %s", config.model)
    data = store.read_bytes(config.model)
    model = modelfile.describe(data, config.model)
    with loadcheck.checking(data, model.size, config.model) as checked:
        found = catalog.find_cases(config.input, config.masks, store)
        logger.info("catalog: %s", found.summary())
        cases = found.select(wanted, config.limit, config.ids or "")
        if meanwhile is not None:
            meanwhile()
        checked()
    selected = wanted is not None or config.limit is not None
    scoring, borrowed = calibration(model, config.model) if config.qc == "on" else (None, None)
    return SegmentPlan(config, store, model, scoring, borrowed, found, cases, reads, selected)


def dry_run(plan: SegmentPlan, pools: tuple[pipeline.Pool, pipeline.Pool]) -> list[str]:
    """What a run of the :meth:`~SegmentPlan.placed` ``plan`` would do, a line each, from what is
    known before any actor starts: the images, the model, the pools, the files, and what the
    output root holds (a run there is refused, gone on with or replaced)."""
    config, model = plan.config, plan.model
    preprocess, models = pools
    res = config.resources
    earlier = outputs.read_manifest(plan.store, config.output)
    if earlier is None:
        held = "holds no earlier run"
    else:
        what = f"holds an earlier run ({earlier.get('job')}, {earlier.get('state')})"
        verb = "goes on with" if config.resume else "replaces" if config.overwrite else None
        held = f"{what}: this run {verb} it" if verb else f"{what}: refused without --resume"
    writer = plan.writer()
    per_image = ", ".join(key.split("/")[0] + "/" for key in writer.keys("x"))
    gpus = f", {models.gpus} GPU" if models.gpus else ""
    quality = "off" if plan.scoring is None else "on"
    if plan.borrowed:
        quality += f", with {plan.borrowed}"
    return [
        f"dry run: would segment {len(plan.cases)} of the catalog's {len(plan.found.cases)} "
        f"images into {config.output}, which {held}",
        f"model: {config.model} ({model.size} px, SHA-256 {model.sha256[:12]}), "
        f"threshold {config.threshold}, quality control {quality}",
        f"device: {res.device}, precision {config.precision}, batch {config.batch_size}",
        f"preprocessing tasks: up to {preprocess.max_size} at once, "
        f"{preprocess.cpus:g} CPUs each; model actors: {models.max_size}, {models.cpus:g} CPUs"
        f"{gpus} and {models.threads} threads each",
        f"files per image: {per_image}; then {SEGMENT_TABLE} and the manifest",
        "nothing started or written (--dry-run)",
    ]


def run_segmentation(
    config: SegmentConfig,
    progress: Progress | None = None,
    start_ray: Callable[[], None] = pipeline.attach,
) -> SegmentResult:
    """Segment every image under ``config.input``; masks and the Parquet table go to ``output``.

    Checks first (:func:`plan_segmentation`, which runs ``start_ray`` while the model is
    checked: the CLI's starts Ray and says so), then the output root is claimed
    (:func:`lungseg.runs.outputs.claimed`): never where the job reads, one job at a time, one
    run per root, every file in its ledger. ``progress`` sees every image as its row is
    written. With ``dry_run``, :func:`dry_run`'s lines are logged and
    nothing is claimed.
    """
    plan = plan_segmentation(config, meanwhile=start_ray)
    plan, pools = plan.placed()
    if config.dry_run:
        for line in dry_run(plan, pools):
            logger.info("%s", line)
        return SegmentResult(config.output, "", 0, 0, (), 0, None, planned=len(plan.cases))
    with plan.claimed("segment") as claim:
        result = segment_cases(plan, pools, claim, progress or Progress())
        claim.finish(**result.outcome())
    return result


def segment_cases(
    plan: SegmentPlan,
    pools: tuple[pipeline.Pool, pipeline.Pool],
    claim: outputs.Claim,
    progress: Progress,
) -> SegmentResult:
    """Segment the plan's cases with its ``pools`` (:meth:`SegmentPlan.pools`) into the claimed
    root: the images done by the earlier run that ``claim`` goes on with are kept where
    :func:`resumable` says so; the table holds both, as an uninterrupted run would."""
    config, store = plan.config, plan.store
    res = config.resources
    preprocess, models = pools
    claim.write_manifest(model=config.model)  # its file, for the report (the SHA-256 is a setting)
    table_uri = claim.uri(SEGMENT_TABLE)
    writer = plan.writer()
    kept = resumable(plan, table_uri) if claim.resumed else []
    done = {row["id"] for row in kept}
    todo = [case for case in plan.cases if case.id not in done]
    if claim.resumed:
        logger.info("resume: %d images done by an earlier run, %d to segment", len(kept), len(todo))
    rows = None
    if todo:
        claim.plan(key for case in todo for key in writer.keys(case.name))
        rows = pipeline.preprocessed(
            todo,
            plan.model.size,
            preprocess,
            store,
            draw.DISPLAY_SIZE if config.overlays else 0,
            header=config.dicom_seg,
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
                "writer": None if res.use_gpu else writer,
            },
            compute=models.strategy(),
            batch_size=config.batch_size,
            num_cpus=models.cpus,
            num_gpus=models.gpus,
        )
        if res.use_gpu:
            rows = rows.map_batches(
                write_masks,
                fn_kwargs={"writer": writer},
                batch_size=pipeline.task_batch(len(todo), preprocess.max_size),
                num_cpus=1,
            )
    dice: list[float] = []
    failed: list[str] = []
    review = 0
    segs = {"written": 0, "not_dicom": 0}

    def account(rows: pa.Table) -> None:  # every row, kept ones too, passes here once
        nonlocal review
        dice.extend(d for d in rows["dice"].to_pylist() if d is not None)
        review += rows["qc"].to_pylist().count(REVIEW)
        if config.dicom_seg:  # masks made without a SEG, of images that are not DICOM
            for row in rows.select(["dicom_seg", "mask", "error"]).to_pylist():
                if row["dicom_seg"] is not None:
                    segs["written"] += 1
                elif row["mask"] is not None and NO_DICOM_SEG not in (row["error"] or ""):
                    segs["not_dicom"] += 1
        errors = table.failed_ids(rows)
        failed.extend(errors)
        progress.advance(rows.num_rows, len(errors))

    progress.start("segment", len(plan.cases))
    statuses = table.write_table(
        pipeline.row_batches(rows),
        table_uri,
        SCHEMA,
        plan.cases,
        store,
        on_table=account,
        known=kept,
        resume=claim.resumed,
    )
    progress.finish()
    claim.record(SEGMENT_TABLE)
    if config.dicom_seg:
        logger.info(
            "dicom-seg: %d DICOM SEG objects in %s/%s/; %d images are not DICOM and got none",
            segs["written"],
            config.output,
            DICOM_SEG_DIR,
            segs["not_dicom"],
        )
    return SegmentResult(
        output=config.output,
        table=table_uri,
        images=len(plan.cases),
        flagged=statuses[FLAGGED],
        failed_ids=tuple(sorted(failed)),
        resumed=len(kept),
        mean_dice=float(np.mean(dice)) if dice else None,
        review=review,
        dicom_segs=segs["written"],
        not_dicom=segs["not_dicom"],
    )


_VERIFY_THREADS = 16  # files read at once to check an earlier run's rows (I/O, S3 above all)


def resumable(plan: SegmentPlan, table_uri: str) -> list[dict]:
    """The rows of earlier runs that a resumed run keeps: not an ``error``, of an image still in
    the catalog with the same source, whose inputs hold what they held (the listing's stamps
    say so, else their bytes are read and fingerprinted again) and whose written files are
    there with the bytes the row records. A ground-truth mask added since, or one gone, makes a
    row done again, as does a mask file that was cut short or changed."""
    by_id = {case.id: case for case in plan.cases}
    listing = plan.store.listing(plan.config.output)
    always = plan.writer().files()

    def files(row: dict) -> tuple[str, ...]:  # a SEG where the earlier run wrote one
        return (*always, "dicom_seg") if row["dicom_seg"] is not None else always

    candidates = [
        (row, by_id[row["id"]])
        for row in table.previous_rows(table_uri, SCHEMA, plan.store)
        if row["id"] in by_id
        and row["source"] == by_id[row["id"]].image
        and row["status"] != ERROR
        and all((row[f] is not None) == (f in always) for f in ("overlay", "probability"))
        and all(
            row[f] and listing.get(row[f]) == _size(row[f"{f}_fingerprint"]) for f in files(row)
        )
    ]

    def unchanged(pair: tuple[dict, catalog.Case]) -> dict | None:
        row, case = pair
        stamps = {
            "source": case.stamps[0] if case.stamps else "",
            "truth": ";".join(case.stamps[1:]),
        }
        inputs = {"source": (case.image,), "truth": case.masks}
        try:
            for key, stamp in stamps.items():
                if (row[f"{key}_stamp"] or "") != stamp:  # changed, or only touched: read it
                    now = ";".join(
                        storage.fingerprint(plan.store.read_bytes(u)) for u in inputs[key]
                    )
                    if now != (row[f"{key}_fingerprint"] or ""):
                        return None
            for f in files(row):
                data = plan.store.read_bytes(storage.join(plan.config.output, row[f]))
                if storage.fingerprint(data) != row[f"{f}_fingerprint"]:
                    return None
        except storage.StorageError:
            return None
        return row | {f"{key}_stamp": stamp or None for key, stamp in stamps.items()}

    with ThreadPoolExecutor(_VERIFY_THREADS) as pool:
        return [row for row in pool.map(unchanged, candidates) if row is not None]


def _size(fingerprint: str | None) -> int | None:
    return None if fingerprint is None else storage.fingerprint_size(fingerprint)
