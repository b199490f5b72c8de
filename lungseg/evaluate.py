"""Evaluate a model on a labelled set: the segment job plus a ``summary.json`` of its scores."""

from __future__ import annotations

import json
from dataclasses import replace
from statistics import mean, median

import pyarrow.parquet as pq

from lungseg import storage
from lungseg.config import SegmentConfig
from lungseg.pipeline import ERROR
from lungseg.segment import run_segmentation

SUMMARY_FILE = "summary.json"
WORST = 10


def dataset_of(case_id: str) -> str:
    """The dataset an id belongs to: its prefix before the first ``_`` (``MCUCXR``, ``CHNCXR``)."""
    return case_id.split("_", 1)[0]


def _stats(rows: list[dict]) -> dict:
    scored = [r for r in rows if r["dice"] is not None]
    out: dict = {"images": len(rows), "scored": len(scored)}
    for metric in ("dice", "iou"):
        values = [r[metric] for r in scored]
        out[metric] = (
            {"mean": mean(values), "median": median(values), "min": min(values)} if values else None
        )
    return out


def summarise(rows: list[dict], model: str) -> dict:
    """Mean/median/min Dice and IoU overall and per dataset, failures, and the worst ids.

    ``unscored`` lists the images segmented without a ground truth (``flagged`` when masks
    were given).
    """
    datasets = sorted({dataset_of(r["id"]) for r in rows})
    scored = sorted((r for r in rows if r["dice"] is not None), key=lambda r: (r["dice"], r["id"]))
    return {
        "model": model,
        "overall": _stats(rows),
        "datasets": {d: _stats([r for r in rows if dataset_of(r["id"]) == d]) for d in datasets},
        "failed": [{"id": r["id"], "error": r["error"]} for r in rows if r["status"] == ERROR],
        "unscored": sorted(r["id"] for r in rows if r["status"] != ERROR and r["dice"] is None),
        "worst": [{"id": r["id"], "dice": r["dice"], "iou": r["iou"]} for r in scored[:WORST]],
    }


def run_evaluation(config: SegmentConfig, split: str | None = None, subset: str = "val") -> dict:
    """Segment the labelled images (only ``subset`` of the ``split`` file, when given) and write
    ``summary.json`` beside the per-image Parquet; returns the summary."""
    if split is not None:
        ids = json.loads(storage.read_bytes(split, config.s3_endpoint))[subset]
        config = replace(config, ids=tuple(ids))
    result = run_segmentation(config)
    fs, path = storage.resolve(result.table, config.s3_endpoint)
    rows = pq.read_table(path, filesystem=fs).to_pylist()
    summary = summarise(rows, config.model)
    text = json.dumps(summary, indent=2).encode()
    storage.write_bytes(storage.join(config.output, SUMMARY_FILE), text, config.s3_endpoint)
    return summary
