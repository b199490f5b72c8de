"""``lungseg report``: a static HTML page of a segment job's output, with its pictures.

:func:`run_report` reads the job's table and writes ``report.html`` with ``report/*.png`` beside
it: summary numbers, a histogram, contact sheets of the worst and best images and of those
that quality control sent to review (drawn by :mod:`lungseg.core.draw`) and a sortable table of
every image. Runs without Ray or Keras.
"""

from __future__ import annotations

import csv
import datetime
import html
import io
import os
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pyarrow.parquet as pq

from lungseg import __version__
from lungseg.core import draw, imaging, qc
from lungseg.core.config import ReportConfig
from lungseg.core.layout import (
    ERROR,
    METRICS_FILE,
    REPORT_ASSETS,
    REPORT_FILE,
    REVIEW,
    SEGMENT,
    SEGMENT_TABLE,
)
from lungseg.io import storage
from lungseg.io.storage import Store
from lungseg.runs import outputs


def read_metrics(run: str, store: Store) -> list[dict]:
    """A training run's ``metrics.csv`` as one dict per epoch (numbers; None where empty)."""
    text = store.read_bytes(storage.join(run, METRICS_FILE)).decode()
    return [
        {key: (float(value) if value else None) for key, value in row.items()}
        | {"epoch": int(row["epoch"])}
        for row in csv.DictReader(io.StringIO(text))
    ]


QC_COLUMNS = ("qc_dice", "qc_score", "qc", "qc_reason")
"""Quality control's columns, null in a table written before lungseg had them."""

# What the report ranks images by: Dice where any image has a ground truth, else lung fraction.
_RANKINGS = {
    "dice": ("Dice", "The worst images by Dice", "The best images by Dice"),
    "lung_fraction": (
        "lung fraction",
        "The smallest lung fractions (no ground truth)",
        "The largest lung fractions (no ground truth)",
    ),
}


@dataclass(frozen=True)
class ReportResult:
    """Where the report went and what it shows."""

    html: str
    images: int
    failed: int


def _sheet_tile(row: dict, root: str, store: Store) -> np.ndarray:
    """A row's overlay as a :data:`draw.TILE` square; without one, drawn from source and mask
    (the row's files are keys under the output ``root``).

    Unreadable files give a blank tile: the sheet is for looking at, the table says the rest.
    """
    try:
        if row["overlay"] is not None:
            data = store.read_bytes(storage.join(root, row["overlay"]))
            picture = imaging.decode(data, "overlay")
        else:
            source = imaging.load_image(store.read_bytes(row["source"]), row["source"])
            image = draw.downscale(source)
            data = store.read_bytes(storage.join(root, row["mask"]))
            mask = imaging.binarise(imaging.decode(data, row["mask"]))
            picture = draw.overlay(image, imaging.resize_mask(mask, *image.shape), None)
    except (OSError, ValueError):
        picture = np.full((draw.TILE, draw.TILE, 3), draw.SHEET_BACKGROUND, np.uint8)
    return draw.fit(picture, draw.TILE)


def _sheet_png(rows: list[dict], key: str, root: str, store: Store) -> bytes:
    """A contact sheet of ``rows``' overlays, captioned with id and ``row[key]`` (the page says
    what the number is: a caption with its name no longer fits a tile)."""

    def caption(value: float | None) -> str:  # no qc_dice: an implausible mask
        return "n/a" if value is None else f"{value:.3f}"

    entries = [
        (f"{row['id']}  {caption(row[key])}", [_sheet_tile(row, root, store)]) for row in rows
    ]
    return imaging.encode_image(draw.contact_sheet(entries, draw.SHEET_COLUMNS))


def _stats(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean, median = statistics.fmean(values), statistics.median(values)
    return f"mean {mean:.4f}, median {median:.4f}, min {min(values):.4f}"


def _summary(rows: list[dict], borrowed: str | None = None) -> list[tuple[str, str]]:
    """The report's headline numbers as (name, value) pairs; ``borrowed`` is why quality
    control scored with another model's calibration (the manifest's), None where it did not."""
    statuses = Counter(row["status"] for row in rows)
    scored = [row for row in rows if row["dice"] is not None]
    lungs = [row["lung_fraction"] for row in rows if row["lung_fraction"] is not None]
    assessed = [row for row in rows if row["qc"] is not None]
    review = sum(row["qc"] == REVIEW for row in assessed)
    share = f" ({review / len(assessed):.1%})" if assessed else ""
    return [
        ("images", str(len(rows))),
        ("status", ", ".join(f"{n} {status}" for status, n in sorted(statuses.items()))),
        ("with ground truth", str(len(scored))),
        ("Dice", _stats([row["dice"] for row in scored])),
        ("IoU", _stats([row["iou"] for row in scored])),
        ("lung fraction", _stats(lungs)),
        ("sent to review", f"{review} of {len(assessed)} assessed by quality control{share}"),
        *((("quality-control calibration", borrowed),) if borrowed else ()),
    ]


def provenance(manifest: Mapping, now: str) -> list[tuple[str, str]]:
    """What made the outputs the report shows, from their manifest (``lungseg.json``), and the
    report itself (written ``now``), as (name, value) pairs: a page that reaches a colleague
    without its folder still says which model, cut and images it shows."""
    settings = manifest.get("settings", {})
    unknown = "not recorded"
    model = manifest.get("model") or unknown
    inputs = str(settings.get("input") or unknown)
    if settings.get("masks"):
        inputs += f", ground truth {settings['masks']}"
    chosen = [f"--ids {settings['ids']}"] * bool(settings.get("ids"))
    chosen += [f"--limit {settings['limit']}"] * bool(settings.get("limit"))
    if chosen:
        inputs += f" ({', '.join(chosen)})"
    when = manifest.get("finished") or manifest.get("started") or unknown
    return [
        ("model", f"{model} (SHA-256 {settings.get('model_sha256') or unknown})"),
        ("threshold", str(settings.get("threshold", unknown))),
        ("input", inputs),
        ("made by", f"lungseg {manifest.get('lungseg') or unknown} {manifest.get('job', '')}, "
                    f"{manifest.get('state', unknown)} {when}"),
        ("report", f"lungseg {__version__}, {now}"),
    ]  # fmt: skip


# Table columns: (row key, heading, numeric).
_COLUMNS = (
    ("id", "id", False),
    ("dice", "Dice", True),
    ("iou", "IoU", True),
    ("lung_fraction", "lung fraction", True),
    ("qc_dice", "QC Dice", True),
    ("qc_score", "QC score", True),
    ("qc", "QC", False),
    ("status", "status", False),
    ("mask", "mask", False),
    ("overlay", "overlay", False),
    ("source", "source", False),
    ("error", "error", False),
    ("qc_reason", "QC reason", False),
)

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
img { max-width: 100%; display: block; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; }
dt { font-weight: 600; } dd { margin: 0; }
.swatch { display: inline-block; width: 14px; height: 10px; margin: 0 4px 0 12px; }
table { border-collapse: collapse; width: 100%; }
th, td { padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: left; }
th { background: #dfe7f1; cursor: pointer; user-select: none; }
th[aria-sort=ascending]::after { content: " \\25b2"; }
th[aria-sort=descending]::after { content: " \\25bc"; }
th[data-type=number], td.number { text-align: right; font-variant-numeric: tabular-nums; }
tr.error td { color: #a00; }
"""

# Click a heading to sort by it (again: the other way); empty cells stay last. The page's hash
# sorts on opening too: report.html#sort=dice ascending, #sort=-dice descending.
_SCRIPT = """
const table = document.getElementById("images");
let sorted = null, descending = false;
function sortBy(column, desc) {
  const heading = table.querySelector(`th[data-column="${column}"]`);
  if (!heading) return;
  const index = heading.cellIndex, numeric = heading.dataset.type === "number";
  const body = table.tBodies[0];
  const value = (row) => row.cells[index].dataset.value;
  const rows = [...body.rows].sort((a, b) => {
    const x = value(a), y = value(b);
    if (x === "" || y === "") return (x === "") - (y === "");
    const order = numeric ? Number(x) - Number(y) : x.localeCompare(y);
    return desc ? -order : order;
  });
  body.append(...rows);
  for (const th of table.tHead.rows[0].cells) th.removeAttribute("aria-sort");
  heading.setAttribute("aria-sort", desc ? "descending" : "ascending");
  sorted = column;
  descending = desc;
}
for (const th of table.tHead.rows[0].cells) {
  th.addEventListener("click", () => {
    const column = th.dataset.column;
    sortBy(column, column === sorted && !descending);
  });
}
const wanted = /^#sort=(-?)(\\w+)$/.exec(location.hash);
if (wanted) sortBy(wanted[2], wanted[1] === "-");
"""


def _hex(colour: tuple[int, int, int]) -> str:
    blue, green, red = colour
    return f"#{red:02x}{green:02x}{blue:02x}"


def _cell(row: dict, key: str, numeric: bool) -> str:
    value = row[key]
    if value is None:
        return '<td data-value=""></td>'
    if key in ("mask", "overlay") or (key == "source" and not storage.is_remote(value)):
        # mask and overlay: keys under the output root, where the page is; a local source: its
        # path (absolute, or relative to the output root)
        absolute = key == "source" and os.path.isabs(value)
        link = html.escape(Path(value).as_uri() if absolute else quote(value))
        return f'<td data-value="{link}"><a href="{link}">{key}</a></td>'
    if numeric:
        return f'<td class="number" data-value="{value!r}">{value:.4f}</td>'
    text = html.escape(str(value))
    return f'<td data-value="{text}">{text}</td>'


def _pairs(pairs: Iterable[tuple[str, str]]) -> str:
    items = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in pairs)
    return f"<dl>{items}</dl>"


def render_html(
    rows: list[dict],
    summary: list[tuple[str, str]],
    pictures: dict[str, str],
    key: str,
    review: list[dict] = (),
    made: list[tuple[str, str]] = (),
) -> str:
    """The report page: what ``made`` it (:func:`provenance`), summary, pictures (``name ->
    relative path``), the reasons of the ``review`` sheet's images, and the sortable table.
    Without a ground truth (``key`` is not Dice) the legends name the outline only."""
    _, worst_title, best_title = _RANKINGS[key]
    sent = sum(row["qc"] == REVIEW for row in rows)
    titles = {
        "histogram": "Distribution",
        "review": f"Sent to review by quality control: the {len(review)} lowest predicted "
        f"Dice of {sent}",
        "worst": worst_title,
        "best": best_title,
        "curves": "Training curves",
    }
    agreement = draw.LEGEND if key == "dice" else ()
    legend = "".join(
        f'<span class="swatch" style="background:{_hex(c)}"></span>{label}'
        for c, label in (*agreement, (draw.OUTLINE_COLOUR, "predicted outline"))
    )
    parts = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        f"<title>lungseg report</title><style>{_STYLE}</style></head><body>",
        "<h1>Lung segmentation report</h1>",
        *(_pairs(pairs) for pairs in (made, summary) if pairs),
    ]
    for name, path in pictures.items():
        parts.append(f"<h2>{titles[name]}</h2>")
        if name in ("worst", "best"):
            parts.append(f"<p>Overlays, captioned with id and {_RANKINGS[key][0]}: {legend}</p>")
        if name == "review":
            parts.append(
                "<p>Masks to check by eye, captioned with id and QC Dice, the Dice quality "
                "control predicts for the mask without a ground truth (n/a: no lungs to "
                "predict it for; the table sorts by it). Why each was sent:</p><ul>"
            )
            parts.extend(
                f"<li>{html.escape(row['id'])}: {html.escape(row['qc_reason'] or '')}</li>"
                for row in review
            )
            parts.append("</ul>")
        parts.append(f'<img src="{html.escape(path)}" alt="{titles[name]}">')
    parts.append(f"<h2>Every image ({len(rows)})</h2><p>Click a heading to sort.</p>")
    headings = "".join(
        f'<th data-column="{k}" data-type="{"number" if n else "text"}">{title}</th>'
        for k, title, n in _COLUMNS
    )
    parts.append(f'<table id="images"><thead><tr>{headings}</tr></thead><tbody>')
    for row in rows:
        cells = "".join(_cell(row, k, n) for k, _, n in _COLUMNS)
        parts.append(f'<tr class="{html.escape(row["status"])}">{cells}</tr>')
    parts.append(f"</tbody></table><script>{_SCRIPT}</script></body></html>\n")
    return "\n".join(parts)


def run_report(config: ReportConfig) -> ReportResult:
    """Write ``report.html`` and its pictures (``report/*.png``) for a segment job's output.

    Reads ``segmentation.parquet`` under ``config.output``; rows are listed worst Dice first.
    Contact sheets of the ``config.sheet`` worst and best images by Dice (by lung fraction when
    no image has a ground truth; no image on both) and of the ``config.review`` lowest QC
    scores among the images sent to review use the job's overlays where written. With
    ``config.run``, the training curves of its ``metrics.csv`` are included.
    """
    store = Store.for_job(config.s3_endpoint)
    with outputs.amended(
        store,
        config.output,
        SEGMENT,
        "report",
        (REPORT_FILE, REPORT_ASSETS),
        reads={"--run": config.run},
    ) as claim:
        result = _report(config, claim, store)
        claim.finish()
    return result


def _report(config: ReportConfig, claim: outputs.Claim, store: Store) -> ReportResult:
    table_uri = claim.uri(SEGMENT_TABLE)
    fs, path = store.resolve(table_uri)
    with storage.explained(table_uri):
        rows = [
            dict.fromkeys(QC_COLUMNS) | row
            for row in pq.read_table(path, filesystem=fs).to_pylist()
        ]
    key = "dice" if any(row["dice"] is not None for row in rows) else "lung_fraction"
    ranked = sorted((row for row in rows if row[key] is not None), key=lambda r: (r[key], r["id"]))
    rows.sort(key=lambda r: (r[key] is None, r[key] or 0.0, r["id"]))
    worst = ranked[: config.sheet]
    best = ranked[len(worst) :][::-1][: config.sheet]
    review = sorted((row for row in rows if row["qc"] == REVIEW), key=qc.review_order)[
        : config.review
    ]
    pngs: dict[str, bytes] = {}
    if ranked:
        pngs["histogram"] = draw.histogram_png([row[key] for row in ranked], _RANKINGS[key][0])
    if review:
        pngs["review"] = _sheet_png(review, "qc_dice", config.output, store)
    for name, chosen in (("worst", worst), ("best", best)):
        if chosen:
            pngs[name] = _sheet_png(chosen, key, config.output, store)
    if config.run is not None:
        pngs["curves"] = draw.curves_png(read_metrics(config.run, store))
    pictures = {name: f"{REPORT_ASSETS}/{name}.png" for name in pngs}
    for name, data in pngs.items():
        claim.write(pictures[name], data)
    borrowed = claim.manifest.get("settings", {}).get("qc_calibration_borrowed")
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    made = provenance(claim.manifest, now)
    page = render_html(rows, _summary(rows, borrowed), pictures, key, review, made)
    html_uri = claim.write(REPORT_FILE, page.encode())
    return ReportResult(
        html=html_uri,
        images=len(rows),
        failed=sum(row["status"] == ERROR for row in rows),
    )
