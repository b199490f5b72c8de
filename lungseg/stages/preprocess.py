"""Reading X-rays for a model: read, decode, grayscale, stretch, resize, in batches of cases.

:class:`Preprocess` is a plain callable on a batch of :func:`case_batch`: Ray Data runs it in
tasks (:func:`preprocess_batch`, :func:`lungseg.stages.pipeline.preprocessed`), and a process
without Ray calls it directly (:func:`load_arrays`, the single-process trainer, the benchmark's
loop).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, fields

import cv2
import numpy as np

from lungseg.core import draw, imaging
from lungseg.core.layout import ERROR, FLAGGED, OK
from lungseg.io import storage
from lungseg.io.catalog import Case
from lungseg.io.storage import DEFAULT_STORE, Store

INFO_COLUMNS = tuple(f.name for f in fields(imaging.ImageInfo))
"""Header columns of :class:`Preprocess` output: strings (empty) and float64 (NaN) when unknown."""


FINGERPRINTS = ("source_fingerprint", "truth_fingerprint", "source_stamp", "truth_stamp")
"""What :class:`Preprocess` says of the files it read: their fingerprints
(:func:`lungseg.io.storage.fingerprint`; a mask pair's joined by ``;``, empty where unread) and the
catalog's stamps of them."""


def case_batch(cases: Sequence[Case]) -> dict[str, list]:
    """Catalog cases as the columns of a batch for :class:`Preprocess` (and of a dataset's
    block: :func:`lungseg.stages.pipeline.case_dataset`)."""
    return {
        "id": [c.id for c in cases],
        "name": [c.name for c in cases],
        "source": [c.image for c in cases],
        "truth": [list(c.masks) for c in cases],
        "source_stamp": [c.stamps[0] if c.stamps else "" for c in cases],
        "truth_stamp": [";".join(c.stamps[1:]) for c in cases],
    }


class Preprocess:
    """Read bytes through pyarrow, decode, grayscale, normalise, resize, a batch at a time.

    Output columns: ``id``, ``name`` (of the output files), ``source``, ``image`` (uint8 size x
    size), ``height``, ``width`` (the image's own size), the DICOM header's ``INFO_COLUMNS``,
    ``has_truth``, ``status``, ``error``, and where a case has masks, for ``train``: ``mask``
    (0/1 uint8 size x size, zeros without truth), else ``truth_png`` (the truth at full size as
    PNG bytes, for scoring; empty without truth). With ``display`` > 0 also ``display_png``,
    the normalised image shrunk to at most ``display`` pixels a side as PNG bytes (empty on
    error), for overlays. With ``header``, also ``dicom_header``: a DICOM image's header without
    its pixel data, as a small DICOM file (empty for PNG/JPEG and on error), for the DICOM
    Segmentation that references it. Only what the next stage needs crosses Ray's object
    store. A failing image becomes a row with ``status == "error"`` and the reason, never an
    exception; a lateral or oblique view (:class:`lungseg.core.imaging.NotFrontalError`) one
    with ``status == "flagged"``, its header fields and the reason, and no pixels.
    """

    def __init__(
        self,
        size: int,
        store: Store = DEFAULT_STORE,
        threads: int = 1,
        display: int = 0,
        train: bool = False,
        header: bool = False,
    ) -> None:
        cv2.setNumThreads(threads)
        self.size = size
        self.store = store
        self.display = display
        self.header = header
        self.truth = "mask" if train else "truth_png"

    def _one(self, source: str, truth: list[str]) -> dict:
        data = self.store.read_bytes(source)
        if self.header:
            image, info, header = imaging.load_image_with_header(data, source)
        else:
            (image, info), header = imaging.load_image_with_info(data, source), b""
        row = {
            "dicom_header": header,
            **asdict(info),
            "image": imaging.resize_image(image, self.size),
            "height": image.shape[0],
            "width": image.shape[1],
            self.truth: self._blank(),
            "source_fingerprint": storage.fingerprint(data),
            "truth_fingerprint": "",
        }
        if self.display:
            row["display_png"] = imaging.encode_image(draw.downscale(image, self.display))
        if truth:
            files = [self.store.read_bytes(uri) for uri in truth]
            row["truth_fingerprint"] = ";".join(map(storage.fingerprint, files))
            mask = imaging.load_mask(files, truth)
            if mask.shape != image.shape:
                raise ValueError(
                    f"mask {mask.shape[1]}x{mask.shape[0]} differs from image "
                    f"{image.shape[1]}x{image.shape[0]}: {', '.join(truth)}"
                )
            if self.truth == "mask":
                row["mask"] = imaging.resize_mask(mask, self.size, self.size)
            else:
                row["truth_png"] = imaging.encode_png(mask)
        return row

    def _unread(
        self, status: str, error: str, info: imaging.ImageInfo | None = None
    ) -> dict[str, object]:
        """The row of an image that goes no further: blank pixels, the header where known."""
        return {
            "image": np.zeros((self.size, self.size), np.uint8),
            self.truth: self._blank(),
            "display_png": b"",
            "dicom_header": b"",
            "height": -1,
            "width": -1,
            "source_fingerprint": "",
            "truth_fingerprint": "",
            **asdict(info or imaging.ImageInfo()),
            "status": status,
            "error": error,
        }

    def _blank(self) -> np.ndarray | bytes:
        return np.zeros((self.size, self.size), np.uint8) if self.truth == "mask" else b""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for source, truth in zip(batch["source"], batch["truth"], strict=True):
            truth = [str(t) for t in truth]
            try:
                rows.append({**self._one(str(source), truth), "status": OK, "error": ""})
            except imaging.NotFrontalError as exc:  # read, but not for this model: flagged
                rows.append(self._unread(FLAGGED, str(exc), exc.info))
            except Exception as exc:  # a bad image becomes an error row, never a crashed job
                rows.append(self._unread(ERROR, f"{type(exc).__name__}: {exc}"))
        read = ("source_fingerprint", "truth_fingerprint")
        out = {
            key: np.array([r[key] for r in rows])
            for key in ("height", "width", *INFO_COLUMNS, *read, "status", "error")
        }
        for key in ("source_stamp", "truth_stamp"):
            out[key] = np.asarray(batch[key]) if key in batch else np.full(len(rows), "")
        out["image"] = np.stack([r["image"] for r in rows])
        if self.truth == "mask":
            out["mask"] = np.stack([r["mask"] for r in rows])
        else:
            out["truth_png"] = np.array([r["truth_png"] for r in rows], dtype=object)
        for key, wanted in (("display_png", self.display), ("dicom_header", self.header)):
            if wanted:
                out[key] = np.array([r[key] for r in rows], dtype=object)
        out["id"] = batch["id"]
        out["name"] = batch["name"]
        out["source"] = batch["source"]
        out["has_truth"] = np.array([len(t) > 0 for t in batch["truth"]])
        return out


def preprocess_batch(batch: dict[str, np.ndarray], size: int, **settings) -> dict[str, np.ndarray]:
    """:class:`Preprocess` of one batch: what a Ray Data task runs
    (:func:`lungseg.stages.pipeline.preprocessed`); ``settings`` are its other arguments."""
    return Preprocess(size, **settings)(batch)
