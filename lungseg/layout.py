"""Fixed names: what each job writes under its output root, and the statuses of its rows.

One place for these, so that a job, the report that reads its output and the tests agree (as
nnU-Net fixes its output names). Imports nothing of lungseg.
"""

from __future__ import annotations

OK, FLAGGED, ERROR = "ok", "flagged", "error"
"""Row statuses: done; done but worth a look (why in ``error``); failed (why in ``error``)."""

REVIEW = "review"
"""A row's ``qc`` when a person should look at its mask (``ok`` otherwise): :mod:`lungseg.qc`."""

LOST = "lost by the pipeline: its batch failed (see the Ray Data logs)"
"""The ``error`` of an image whose batch never came out of Ray Data."""
NO_TRUTH = "no ground-truth mask found: not scored"
"""The ``error`` of a ``flagged`` image without a mask when masks were given."""

# segment and evaluate
SEGMENT_TABLE = "segmentation.parquet"
MASKS_DIR = "masks"
LABELS_DIR = "labels"
OVERLAYS_DIR = "overlays"
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
# every output root and run folder
MANIFEST_FILE = "lungseg.json"
LOCK_FILE = ".lungseg.lock"
