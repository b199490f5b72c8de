"""OpenCV-only cleaning of unlabelled chest X-rays: rough foreground masks by Otsu's threshold.

Array functions (pure NumPy/OpenCV, as in imaging.py) compose into :func:`clean_image`:
normalise to 8 bits, resize, optional CLAHE, Gaussian denoising, Otsu's threshold, inversion by
the border rule, opening and closing, and masking of the image. :func:`clean_batch` runs them in
Ray Data tasks that write ``cleaned/<name>.png`` and ``masks/<name>.png`` (``name``:
:func:`lungseg.io.catalog.output_name` of the id) under the output
root and return scalar rows; :func:`run_cleaning` drives those into ``cleaning.parquet`` and
draws a contact sheet of the first inputs beside their cleaned results.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import pyarrow as pa

from lungseg.core import imaging
from lungseg.core.config import CleanConfig, CleanParams
from lungseg.core.draw import contact_sheet
from lungseg.core.layout import (
    CLEAN,
    CLEAN_TABLE,
    CLEANED_DIR,
    CONTACT_SHEET,
    ERROR,
    FLAGGED,
    MASKS_DIR,
    OK,
)
from lungseg.core.progress import Progress
from lungseg.io import catalog, storage
from lungseg.io.storage import Store
from lungseg.runs import outputs, table
from lungseg.stages import pipeline

__all__ = ["CleanParams", "CleanResult", "clean_batch", "clean_image", "run_cleaning"]

logger = logging.getLogger(__name__)

SHEET_COLUMNS = 4  # input/cleaned pairs per row of the contact sheet
DEFAULT_PARAMS = CleanParams()
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("cleaned", pa.string()),
        ("mask", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("otsu_threshold", pa.float64()),
        ("inverted", pa.bool_()),
        ("foreground_fraction", pa.float64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("source_fingerprint", pa.string()),
        ("cleaned_fingerprint", pa.string()),
        ("mask_fingerprint", pa.string()),
    ]
)


class FlaggedImage(ValueError):
    """An image that decodes but cannot be thresholded meaningfully (e.g. every pixel equal)."""


@dataclass(frozen=True)
class CleanResult:
    """One cleaned image: ``cleaned`` and ``mask`` are ``size`` x ``size`` ``uint8``."""

    cleaned: np.ndarray  # the normalised, resized image with everything outside the mask set to 0
    mask: np.ndarray  # 0/1, 1 = foreground
    threshold: float  # Otsu's threshold on the denoised image (foreground is strictly above it)
    inverted: bool  # whether the thresholded mask was inverted by the rule
    foreground_fraction: float  # share of mask pixels that are foreground


def check_varies(gray: np.ndarray) -> None:
    """Raise :class:`FlaggedImage` naming the value when every pixel of ``gray`` is equal.

    ``all-white`` is the integer dtype's maximum; float images (e.g. DICOM) can only be
    ``all-black`` or ``constant``.
    """
    lo, hi = gray.min().item(), gray.max().item()
    if hi > lo:
        return
    top = np.iinfo(gray.dtype).max if np.issubdtype(gray.dtype, np.integer) else None
    kind = "all-black" if lo == 0 else "all-white" if lo == top else "constant"
    raise FlaggedImage(f"{kind} image (every pixel is {lo:g}): nothing to threshold")


def denoise(image: np.ndarray, kernel: int, sigma: float) -> np.ndarray:
    """Gaussian blur with an odd ``kernel`` side (1: unchanged); sigma 0 is derived by OpenCV."""
    return cv2.GaussianBlur(image, (kernel, kernel), sigma)


def otsu(image: np.ndarray) -> tuple[float, np.ndarray]:
    """Otsu's threshold of a ``uint8`` image and its 0/1 mask of pixels strictly above it."""
    threshold, mask = cv2.threshold(image, 0, 1, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    return float(threshold), mask


def border_ring(mask: np.ndarray) -> np.ndarray:
    """The 1-pixel-wide outer ring of a 2-D array, each pixel once (``2h + 2w - 4`` values)."""
    return np.concatenate([mask[0, :], mask[-1, :], mask[1:-1, 0], mask[1:-1, -1]])


def should_invert(mask: np.ndarray, rule: str = "border") -> bool:
    """Whether to invert a 0/1 mask so that its foreground is the object, not the background.

    ``border``: invert when strictly more than half of the pixels of the 1-pixel-wide border
    ring (:func:`border_ring`) are foreground, since an object seldom covers most of the image's
    edge; ``never`` and ``always`` do what they say.
    """
    if rule == "never":
        return False
    if rule == "always":
        return True
    if rule != "border":
        raise ValueError(f"unknown inversion rule {rule!r}")
    ring = border_ring(mask)
    return 2 * int(np.count_nonzero(ring)) > ring.size


def morphology(mask: np.ndarray, open_kernel: int, close_kernel: int) -> np.ndarray:
    """Opening (removes foreground specks) then closing (fills small gaps) of a 0/1 mask.

    Each uses an elliptical structuring element of the given side; 0 (or 1) skips the step.
    """
    for op, side in ((cv2.MORPH_OPEN, open_kernel), (cv2.MORPH_CLOSE, close_kernel)):
        if side > 1:
            element = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))
            mask = cv2.morphologyEx(mask, op, element)
    return mask


def clean_image(gray: np.ndarray, params: CleanParams = DEFAULT_PARAMS) -> CleanResult:
    """Clean one 2-D grayscale image (8 or 16-bit, any size) into a rough foreground mask.

    1. :func:`check_varies` (a constant image raises :class:`FlaggedImage`);
    2. :func:`imaging.normalise` to ``uint8`` 0-255, :func:`imaging.resize_image` to ``size``;
    3. CLAHE when ``params.clahe``; Gaussian denoising (``blur_kernel``, ``blur_sigma``);
    4. Otsu's threshold: foreground is the denoised pixels strictly above it;
    5. inversion by ``params.invert``; with ``border`` (the default) the mask is inverted when
       strictly more than half of its 1-pixel-wide border ring is foreground, so a bright object
       on a dark background and the same object dark on bright give the same mask;
    6. opening (``open_kernel``) then closing (``close_kernel``);
    7. the normalised, resized image (before CLAHE and blur) is kept where the mask is 1.
    """
    check_varies(gray)
    image = imaging.resize_image(imaging.normalise(gray), params.size)
    smooth = image
    if params.clahe:
        smooth = imaging.equalise(image, params.clahe_clip, params.clahe_tile)
    threshold, mask = otsu(denoise(smooth, params.blur_kernel, params.blur_sigma))
    inverted = should_invert(mask, params.invert)
    if inverted:
        mask = 1 - mask
    mask = morphology(mask, params.open_kernel, params.close_kernel)
    return CleanResult(
        cleaned=cv2.bitwise_and(image, image, mask=mask),
        mask=mask,
        threshold=threshold,
        inverted=inverted,
        foreground_fraction=float(np.count_nonzero(mask)) / mask.size,
    )


def output_keys(name: str) -> tuple[str, str]:
    """The cleaned image and the mask written for the case whose output name is ``name``,
    relative to the output root."""
    return f"{CLEANED_DIR}/{name}.png", f"{MASKS_DIR}/{name}.png"


def clean_one(
    case_id: str,
    name: str,
    source: str,
    output: str,
    params: CleanParams = DEFAULT_PARAMS,
    store: Store = storage.DEFAULT_STORE,
) -> dict:
    """Read, clean and write one image; its Parquet row (``SCHEMA``), never an exception.

    The row names the written files relative to ``output``, with their fingerprints and the
    source's. ``error`` rows: unreadable or empty files, failed writes. ``flagged`` rows: a
    constant image or a lateral view (nothing written), or a mask that came out empty or full
    (files written).
    """
    row = dict.fromkeys(SCHEMA.names) | {"id": case_id, "source": source}
    try:
        data = store.read_bytes(source)
        row["source_fingerprint"] = storage.fingerprint(data)
        gray = imaging.to_grayscale(imaging.decode(data, source))
        row |= {"height": gray.shape[0], "width": gray.shape[1]}
        result = clean_image(gray, params)
        cleaned, mask = output_keys(name)
        pngs = {
            cleaned: imaging.encode_image(result.cleaned),
            mask: imaging.encode_png(result.mask),
        }
        for key, png in pngs.items():
            store.write_bytes(storage.join(output, key), png)
        written = {key: storage.fingerprint(png) for key, png in pngs.items()}
    except (FlaggedImage, imaging.NotFrontalError) as exc:
        return row | {"status": FLAGGED, "error": str(exc)}
    except Exception as exc:  # a bad image becomes an error row, never a crashed job
        return row | {"status": ERROR, "error": f"{type(exc).__name__}: {exc}"}
    row |= {
        "cleaned": cleaned,
        "mask": mask,
        "cleaned_fingerprint": written[cleaned],
        "mask_fingerprint": written[mask],
        "otsu_threshold": result.threshold,
        "inverted": result.inverted,
        "foreground_fraction": result.foreground_fraction,
        "status": OK,
    }
    if result.foreground_fraction in (0.0, 1.0):
        covers = "no pixel" if result.foreground_fraction == 0.0 else "every pixel"
        why = f"the mask covers {covers} after opening and closing"
        row |= {"status": FLAGGED, "error": why}
    return row


def clean_batch(
    batch: dict[str, np.ndarray], output: str, params: CleanParams, store: Store
) -> dict[str, list]:
    """What a Ray Data task runs: clean each image of a batch, write its PNGs, return scalar
    rows."""
    cv2.setNumThreads(1)  # a task per CPU: OpenCV's own threads would oversubscribe them
    rows = [
        clean_one(str(i), str(n), str(s), output, params, store)
        for i, n, s in zip(batch["id"], batch["name"], batch["source"], strict=True)
    ]
    return {name: [row[name] for row in rows] for name in SCHEMA.names}


def _tile(uri: str | None, size: int, store: Store, stretch: bool) -> np.ndarray:
    """An image file as a ``size`` x ``size`` tile (contrast-stretched if asked); black if absent.

    Unreadable inputs and missing outputs are shown as black tiles: the sheet is for looking at,
    and the row's status says what went wrong.
    """
    if uri is None:
        return np.zeros((size, size), np.uint8)
    try:
        gray = imaging.to_grayscale(imaging.decode(store.read_bytes(uri), uri))
    except (OSError, ValueError):
        return np.zeros((size, size), np.uint8)
    return imaging.resize_image(imaging.normalise(gray) if stretch else gray, size)


def contact_sheet_png(rows: Sequence[dict], output: str, size: int, store: Store) -> bytes:
    """Each row's input (normalised, as cleaned) beside its cleaned image (a key under
    ``output``), captioned with its id. A row that is not ``ok`` has its status after the id.
    """
    pairs = [
        (
            row["id"] if row["status"] == OK else f"{row['id']} [{row['status']}]",
            [
                _tile(row["source"], size, store, stretch=True),
                _tile(row["cleaned"] and storage.join(output, row["cleaned"]), size, store, False),
            ],
        )
        for row in rows
    ]
    return imaging.encode_image(contact_sheet(pairs, SHEET_COLUMNS))


@dataclass(frozen=True)
class CleanSummary:
    """Where the outputs went and how the images fared."""

    output: str
    table: str
    sheet: str | None
    images: int
    flagged: int
    failed_ids: tuple[str, ...]  # the ids of the ``error`` rows, in id order

    @property
    def failed(self) -> int:
        return len(self.failed_ids)


def run_cleaning(
    config: CleanConfig,
    progress: Progress | None = None,
    start_ray: Callable[[], None] = pipeline.attach,
) -> CleanSummary:
    """Clean every image under ``config.input`` (mask files are skipped) in OpenCV tasks.

    Writes ``cleaned/<name>.png``, ``masks/<name>.png``, one Parquet row per image in
    ``cleaning.parquet`` and, unless ``config.sheet`` is 0, ``contact_sheet.png`` of the first
    ``config.sheet`` images by id. ``progress`` sees every image as its row is written. The
    catalog comes first, then ``start_ray``, then the output root is claimed
    (:func:`lungseg.runs.outputs.claimed`): an earlier run's outputs there are replaced only with
    ``config.overwrite``.
    """
    progress = progress or Progress()
    store = Store.for_job(config.s3_endpoint)
    outputs.check_apart(store, config.output, {"--input": config.input})
    found = catalog.find_cases(config.input, store=store)
    logger.info("catalog: %s", found.summary())
    start_ray()
    pool = _pool(config)
    with outputs.claimed(
        store,
        config.output,
        CLEAN,
        "clean",
        {"input": config.input, "params": asdict(config.params)},
        reads={"--input": config.input},
        resume=False,
        overwrite=config.overwrite,
    ) as claim:
        summary = _clean(config, found.cases, store, pool, claim, progress)
        claim.finish(**outputs.outcome(summary.images, summary.flagged, summary.failed_ids))
    return summary


def _pool(config: CleanConfig) -> pipeline.Pool:
    """The cleaning tasks' pool, refused where it could never start."""
    on = pipeline.cluster()
    pool = pipeline.preprocess_pool(on, config.resources)
    pipeline.check_fits({"--preprocess-actors/--actor-cpus": pool}, on)
    return pool


def _clean(
    config: CleanConfig,
    cases: Sequence[catalog.Case],
    store: Store,
    pool: pipeline.Pool,
    claim: outputs.Claim,
    progress: Progress,
) -> CleanSummary:
    batch_size = pipeline.task_batch(len(cases), pool.max_size, config.batch_size)
    claim.plan(key for case in cases for key in output_keys(case.name))
    rows = pipeline.case_dataset(cases, batch_size).map_batches(
        clean_batch,
        fn_kwargs={"output": config.output, "params": config.params, "store": store},
        compute=pool.strategy(),
        batch_size=batch_size,
        num_cpus=pool.cpus,
    )
    first = {case.id for case in cases[: config.sheet]}
    shown: list[dict] = []
    failed: list[str] = []

    def account(rows: pa.Table) -> None:
        shown.extend(row for row in rows.to_pylist() if row["id"] in first)
        errors = table.failed_ids(rows)
        failed.extend(errors)
        progress.advance(rows.num_rows, len(errors))

    table_uri = claim.uri(CLEAN_TABLE)
    progress.start("clean", len(cases))
    statuses = table.write_table(
        pipeline.row_batches(rows), table_uri, SCHEMA, cases, store, on_table=account
    )
    progress.finish()
    claim.record(CLEAN_TABLE)
    sheet_uri = None
    if shown:
        shown.sort(key=lambda row: row["id"])
        sheet = contact_sheet_png(shown, config.output, config.params.size, store)
        sheet_uri = claim.write(CONTACT_SHEET, sheet)
    return CleanSummary(
        output=config.output,
        table=table_uri,
        sheet=sheet_uri,
        images=len(cases),
        flagged=statuses[FLAGGED],
        failed_ids=tuple(sorted(failed)),
    )
