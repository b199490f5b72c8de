"""Fixed names: what each job writes under its output root, and the statuses of its rows.

One place for these, so that a job, the report that reads its output and the tests agree (as
nnU-Net fixes its output names). Imports nothing of lungseg.
"""

from __future__ import annotations

from dataclasses import dataclass

OK, FLAGGED, ERROR = "ok", "flagged", "error"
"""Row statuses: done; done but worth a look (why in ``error``); failed (why in ``error``)."""

REVIEW = "review"
"""A row's ``qc`` when a person should look at its mask (``ok`` otherwise):
:mod:`lungseg.core.qc`."""

LOST = "lost by the pipeline: its batch failed (see the Ray Data logs)"
"""The ``error`` of an image whose batch never came out of Ray Data."""
NO_TRUTH = "no ground-truth mask found: not scored"
"""The ``error`` of a ``flagged`` image without a mask when masks were given."""

# segment and evaluate
SEGMENT_TABLE = "segmentation.parquet"
MASKS_DIR = "masks"
LABELS_DIR = "labels"
OVERLAYS_DIR = "overlays"
DICOM_SEG_DIR = "dicom-seg"
NO_DICOM_SEG = "no DICOM SEG written"
"""The start of the ``error`` of a ``flagged`` DICOM image whose SEG could not be made."""
PROBABILITIES_DIR = "probabilities"
SUMMARY_FILE = "summary.json"
# report (beside a segment output)
REPORT_FILE = "report.html"
REPORT_ASSETS = "report"
# clean
CLEAN_TABLE = "cleaning.parquet"
CLEANED_DIR = "cleaned"
CONTACT_SHEET = "contact_sheet.png"
# a training run folder
MODEL_FILE = "model.keras"
METRICS_FILE = "metrics.csv"
CURVES_FILE = "curves.png"
CONFIG_FILE = "config.json"
DATA_FILE = "data.parquet"
PROVENANCE_FILE = "provenance.json"
CHECKPOINTS_DIR = "checkpoints"
"""Ray Train's folder in a run folder: its checkpoints and state, written by Ray alone."""
# export
SAVED_MODEL = ("saved_model.pb", "fingerprint.pb", "variables", "assets")
# every output root and run folder
MANIFEST_FILE = "lungseg.json"
LOCK_FILE = ".lungseg.lock"
WRITE_PROBE = ".lungseg-write-check"
LEDGER_DIR = ".lungseg"
"""lungseg's own folder in an output root: what a running job may write (its plan)."""
JOURNAL_SUFFIX = ".parts"
"""A job's table while it runs: ``<table>.parts/``, the rows written so far."""


@dataclass(frozen=True)
class Layout:
    """What one kind of job writes under its output root, for the ledger of
    :mod:`lungseg.runs.outputs`.

    ``makes`` are the top-level names it writes (files or folders): the only places where it
    ever writes, so a file of someone else's found there stops it. ``table`` is its Parquet
    table, whose ``row_files`` columns name the files written for each image (relative to the
    root), each with its fingerprint in ``<column>_fingerprint``. ``owned`` folders are written
    for the job by another program (Ray Train's checkpoints): everything in them is the job's.
    """

    kind: str
    makes: tuple[str, ...]
    table: str | None = None
    row_files: tuple[str, ...] = ()
    owned: tuple[str, ...] = ()


SEGMENT = Layout(
    "segment",
    (
        SEGMENT_TABLE,
        SEGMENT_TABLE + JOURNAL_SUFFIX,
        MASKS_DIR,
        LABELS_DIR,
        OVERLAYS_DIR,
        DICOM_SEG_DIR,
        PROBABILITIES_DIR,
        SUMMARY_FILE,
        REPORT_FILE,
        REPORT_ASSETS,
    ),
    SEGMENT_TABLE,
    ("mask", "labels", "overlay", "probability", "dicom_seg"),
)
"""A segment or evaluate job's output root, and the report written into it."""
CLEAN = Layout(
    "clean",
    (CLEAN_TABLE, CLEAN_TABLE + JOURNAL_SUFFIX, CLEANED_DIR, MASKS_DIR, CONTACT_SHEET),
    CLEAN_TABLE,
    ("cleaned", "mask"),
)
TRAIN = Layout(
    "train",
    (
        MODEL_FILE,
        METRICS_FILE,
        CURVES_FILE,
        PROVENANCE_FILE,
        CONFIG_FILE,
        DATA_FILE,
        DATA_FILE + JOURNAL_SUFFIX,
        CHECKPOINTS_DIR,
    ),
    owned=(CHECKPOINTS_DIR,),
)
"""A training run folder."""
EXPORT = Layout("export", SAVED_MODEL)
"""A SavedModel folder."""
LAYOUTS = {layout.kind: layout for layout in (SEGMENT, CLEAN, TRAIN, EXPORT)}
