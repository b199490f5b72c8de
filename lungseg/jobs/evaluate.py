"""Evaluate a model on a labelled set: the segment job plus a ``summary.json`` of its scores."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from statistics import mean, median

import pyarrow.parquet as pq

from lungseg.core import qc
from lungseg.core.config import EvaluateConfig
from lungseg.core.errors import UserError
from lungseg.core.layout import ERROR, REVIEW, SUMMARY_FILE
from lungseg.core.progress import Progress
from lungseg.io.catalog import read_split
from lungseg.io.storage import Store
from lungseg.jobs.segment import dry_run, plan_segmentation, segment_cases
from lungseg.stages import pipeline

logger = logging.getLogger(__name__)

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
    out["quality_control"] = qc.agreement(rows)
    return out


def summarise(rows: list[dict], model: str) -> dict:
    """Mean/median/min Dice and IoU and the quality control's figures
    (:func:`lungseg.core.qc.agreement`) overall and per dataset, failures, the worst ids, and
    the images sent to review.

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
        "review": [
            {k: r[k] for k in ("id", "qc_dice", "qc_score", "dice", "qc_reason")}
            for r in sorted((r for r in rows if r["qc"] == REVIEW), key=qc.review_order)
        ],
    }


def run_evaluation(
    config: EvaluateConfig,
    progress: Progress | None = None,
    start_ray: Callable[[], None] = pipeline.attach,
) -> dict:
    """Segment the labelled images (only ``config.subset`` of the ``config.split`` file, or
    those of ``config.ids``, when given; the first ``config.limit``) and write ``summary.json``
    beside the per-image Parquet; returns the summary. The same steps as
    :func:`lungseg.jobs.segment.run_segmentation`: plan, Ray, claim, segment, then the summary
    into the same claim. With ``dry_run``, what would run is logged and the summary is empty."""
    store = Store.for_job(config.s3_endpoint)
    wanted = None
    if config.split is not None:
        subsets = read_split(config.split, store)
        if config.subset not in subsets:
            raise UserError(
                f"{config.split} has no subset {config.subset!r}: it has {', '.join(subsets)}"
            )
        wanted = tuple(subsets[config.subset])
    plan = plan_segmentation(config, {"--split": config.split}, wanted, meanwhile=start_ray)
    plan, pools = plan.placed()
    if config.dry_run:  # what would run, said; no summary
        for line in dry_run(plan, pools):
            logger.info("%s", line)
        return {}
    with plan.claimed("evaluate") as claim:
        result = segment_cases(plan, pools, claim, progress or Progress())
        fs, path = store.resolve(result.table)
        summary = summarise(pq.read_table(path, filesystem=fs).to_pylist(), config.model)
        claim.write(SUMMARY_FILE, json.dumps(summary, indent=2).encode())
        claim.finish(**result.outcome())
    return summary
