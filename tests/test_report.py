"""Pictures and the HTML report: exact colours on synthetic masks, then a real segment job's
overlays and report, opened in a real headless Chromium."""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lungseg import __version__
from lungseg.core import draw, imaging
from lungseg.core.config import ReportConfig
from lungseg.core.draw import (
    ALPHAS,
    CAPTION_HEIGHT,
    FN_COLOUR,
    FP_COLOUR,
    GAP,
    OUTLINE_COLOUR,
    TP_COLOUR,
)
from lungseg.core.layout import MANIFEST_FILE
from lungseg.jobs import report
from lungseg.jobs.segment import SCHEMA
from tests.conftest import SAMPLE_IDS, copy_sample, labelled_config

REPO = Path(__file__).resolve().parents[1]
REQUIRE_BROWSER = "LUNGSEG_REQUIRE_BROWSER"
"""Set to 1 (CI does) to make a missing Chromium fail the browser test instead of skipping it."""


@pytest.fixture(scope="session")
def chromium() -> str:
    """The path of a Chromium to open the report in; skips (fails under REQUIRE_BROWSER=1)."""
    found = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    if found is None:
        why = (
            "no Chromium on PATH to open the report in: install it (Debian, Ubuntu: "
            "sudo apt-get install chromium) to run this test"
        )
        if os.environ.get(REQUIRE_BROWSER) == "1":
            pytest.fail(f"{why}; {REQUIRE_BROWSER}=1 requires it")
        pytest.skip(why)
    return found


def _tinted(gray: int, colour: tuple[int, int, int]) -> list[int]:
    alpha = ALPHAS[(TP_COLOUR, FP_COLOUR, FN_COLOUR).index(colour)]
    return [round((1 - alpha) * gray + alpha * c) for c in colour]


def _synthetic() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A flat gray 200x300 X-ray; truth columns 40-159 and prediction 100-219 of rows 20-99."""
    image = np.full((200, 300), 100, np.uint8)
    truth, prediction = np.zeros((2, 200, 300), np.uint8)
    truth[20:100, 40:160] = 1
    prediction[20:100, 100:220] = 1
    return image, truth, prediction


def _has(picture: np.ndarray, colour: tuple[int, int, int]) -> bool:
    return bool((picture == colour).all(axis=-1).any())


def test_overlay_colours_agreement_where_the_masks_say():
    image, truth, prediction = _synthetic()
    picture = draw.overlay(image, prediction, truth)
    assert picture.shape == (200, 300, 3) and picture.dtype == np.uint8
    assert picture[60, 130].tolist() == _tinted(100, TP_COLOUR)  # both
    assert picture[60, 190].tolist() == _tinted(100, FP_COLOUR)  # predicted only
    assert picture[60, 70].tolist() == _tinted(100, FN_COLOUR)  # truth only
    assert picture[10, 250].tolist() == [100] * 3  # neither
    green, red, blue = picture[60, 130], picture[60, 190], picture[60, 70]
    assert green[1] > max(green[0], green[2]) and red[2] > max(red[0], red[1]) and blue[0] > blue[2]
    # The outline runs along the prediction's border (1 pixel thick below 384 pixels a side).
    for y, x in [(20, 150), (99, 150), (60, 100), (60, 219)]:
        assert picture[y, x].tolist() == list(OUTLINE_COLOUR)
    assert picture[60, 218].tolist() == _tinted(100, FP_COLOUR)  # inside the border: fill
    # The legend (lower left) has pure swatches of the four colours; the masks have none.
    legend, masks = picture[110:, :150], picture[:110]
    for colour in (TP_COLOUR, FP_COLOUR, FN_COLOUR, OUTLINE_COLOUR):
        assert _has(legend, colour)
    for colour in (TP_COLOUR, FP_COLOUR, FN_COLOUR):
        assert not _has(masks, colour)
    assert (picture[110:, :150] < 100).any(), "the legend box darkens the X-ray"


def test_overlay_without_truth_is_the_xray_and_the_outline():
    image, _, prediction = _synthetic()
    picture = draw.overlay(image, prediction, None)
    inside, outside = picture[30:90, 110:210], picture[:110, 230:]
    assert (inside == 100).all() and (outside == 100).all()
    assert picture[20, 150].tolist() == list(OUTLINE_COLOUR)
    for colour in (TP_COLOUR, FP_COLOUR, FN_COLOUR):
        assert not _has(picture, colour)
    assert _has(picture[110:, :150], OUTLINE_COLOUR)


def test_four_panel_is_input_truth_prediction_overlap():
    image, truth, prediction = _synthetic()
    panel = draw.four_panel(image, truth, prediction)
    assert panel.shape == (CAPTION_HEIGHT + 200, 4 * 300 + 3 * GAP, 3)
    tiles = [panel[CAPTION_HEIGHT:, k * (300 + GAP) : k * (300 + GAP) + 300] for k in range(4)]
    assert (tiles[0] == 100).all()
    np.testing.assert_array_equal(tiles[1][..., 0], truth * 255)
    np.testing.assert_array_equal(tiles[2][..., 0], prediction * 255)
    np.testing.assert_array_equal(tiles[3], draw.overlay(image, prediction, truth))
    captions = panel[:CAPTION_HEIGHT, :300]
    assert (captions == 255).any() and (captions[:, :, 0] == 0).mean() > 0.8


def test_contact_sheet_grid_sizes_and_modes():
    gray = [(f"g{k}", [np.full((32, 40), k * 20, np.uint8)] * 2) for k in range(5)]
    sheet = draw.contact_sheet(gray, columns=3)
    assert sheet.shape == (2 * (CAPTION_HEIGHT + 32) + GAP, 3 * 80 + 2 * GAP)
    assert (sheet[CAPTION_HEIGHT + 32 + GAP + CAPTION_HEIGHT, 80 + GAP + 40] == 80).all()
    red = np.zeros((32, 40, 3), np.uint8)
    red[..., 2] = 255
    mixed = draw.contact_sheet([("c", [red])], 3)
    assert mixed.shape == (CAPTION_HEIGHT + 32, 40, 3)
    assert mixed[CAPTION_HEIGHT + 5, 5].tolist() == [0, 0, 255]


def _assert_captions_fit(sheet: np.ndarray, entries: int, width: int = 256) -> None:
    """Every caption's ink ends inside its band, short of the band's right edge."""
    for k in range(entries):
        band = sheet[:CAPTION_HEIGHT, k * (width + GAP) : k * (width + GAP) + width]
        inked = np.flatnonzero(
            (band > 0).any(axis=-1).any(axis=0) if band.ndim == 3 else band.any(0)
        )
        assert inked.size and inked[-1] < width - 2, f"caption {k} runs to the edge"


def test_a_long_caption_is_drawn_smaller_never_cut_off():
    tile = np.full((256, 256), 128, np.uint8)
    captions = ["MCUCXR_0001_0  0.973", "PAT1/SERIES-0001/IM000001.dcm  Dice 0.9731 and more"]
    sheet = draw.contact_sheet([(c, [tile]) for c in captions], 2)
    _assert_captions_fit(sheet, 2)
    assert draw.caption_scale(captions[0], 256) == 0.5 > draw.caption_scale(captions[1], 256)


def test_downscale_and_fit_keep_the_aspect_ratio():
    tall = np.zeros((1000, 600), np.uint8)
    assert draw.downscale(tall).shape == (512, 307)
    small = np.zeros((300, 400), np.uint8)
    assert draw.downscale(small) is small
    tile = draw.fit(np.full((100, 50, 3), 255, np.uint8), 256)
    assert tile.shape == (256, 256, 3)
    assert (tile[:, 64:192] == 255).all() and (tile[:, :64] == draw.SHEET_BACKGROUND).all()


def _colour_columns(png: bytes, rgb: tuple[int, int, int]) -> np.ndarray:
    """Columns of a decoded PNG holding pixels within 40 of ``rgb``."""
    picture = imaging.decode(png)[..., :3].astype(int)
    near = (np.abs(picture - rgb[::-1]).sum(axis=-1) < 40).any(axis=0)
    return np.flatnonzero(near)


def test_curves_png_shows_loss_dice_and_iou_for_training_and_validation():
    history = [
        {"epoch": e, "loss": 1 / e, "dice": 1 - 1 / (e + 1), "iou": 0.5 + e / 10}
        | {"val_loss": 1.2 / e, "val_dice": 0.8 - 0.5 / e, "val_iou": 0.4 + e / 20}
        for e in (1, 2, 3)
    ]
    png = draw.curves_png(history)
    assert imaging.decode(png).shape[:2] == (400, 1500)
    for rgb in ((31, 119, 180), (255, 127, 14)):  # matplotlib's first two colours
        columns = _colour_columns(png, rgb)
        assert {int(c) // 500 for c in columns} == {0, 1, 2}, "a line in each of the 3 panels"


def test_histogram_png():
    png = draw.histogram_png([0.2, 0.9, 0.91, 0.95], "Dice")
    assert imaging.decode(png).shape[:2] == (350, 700)
    assert len(_colour_columns(png, (0x48, 0x78, 0xA8))) > 20  # the bars


@pytest.fixture(scope="module")
def segmented(tmp_path_factory, s3_endpoint, local_ray, model_path) -> Path:
    """A real segment job with overlays on 3 sample images, a big and wide one, an unlabelled one
    and a broken file; and a run folder with a metrics.csv.

    ``s3_endpoint`` (session) starts first, so that the module's Ray has its keys for the bucket
    test.
    """
    from lungseg.jobs.segment import run_segmentation

    root = copy_sample(tmp_path_factory.mktemp("data"), SAMPLE_IDS[:3])
    image = cv2.imread(str(root / "images" / f"{SAMPLE_IDS[0]}.png"), cv2.IMREAD_UNCHANGED)
    mask = cv2.imread(str(root / "masks" / f"{SAMPLE_IDS[0]}.png"), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(root / "images" / "wide.png"), cv2.resize(image, (1000, 600)))
    cv2.imwrite(str(root / "masks" / "wide.png"), cv2.resize(mask, (1000, 600)))
    cv2.imwrite(str(root / "images" / "unlabelled.png"), cv2.resize(image, (256, 320)))
    (root / "images" / "broken.png").write_bytes(b"not a PNG")
    out = root / "out"
    result = run_segmentation(
        labelled_config(root, out, model=model_path, batch_size=2, overlays=True)
    )
    assert (result.images, result.failed) == (6, 1)
    run = root / "run"
    run.mkdir()
    (run / "metrics.csv").write_text(
        "epoch,loss,dice,iou,val_loss,val_dice,val_iou\n"
        "1,0.9,0.5,0.4,1.0,0.45,0.35\n2,0.5,0.8,0.7,0.7,0.7,0.6\n3,0.3,0.9,0.8,0.6,0.75,0.65\n"
    )
    return root


@pytest.mark.timeout(400)
def test_segment_overlays_are_drawn_where_the_masks_are(segmented):
    out = segmented / "out"
    rows = {r["id"]: r for r in pq.read_table(out / "segmentation.parquet").to_pylist()}
    sizes = {case_id: (512, 512) for case_id in SAMPLE_IDS[:3]}
    sizes |= {"wide": (307, 512), "unlabelled": (320, 256)}
    assert rows["broken"]["overlay"] is None
    assert sorted(p.stem for p in (out / "overlays").iterdir()) == sorted(sizes)
    for case_id, size in sizes.items():
        row = rows[case_id]
        assert row["overlay"] == f"overlays/{case_id}.png"  # relative to the output root
        written = cv2.imread(str(out / row["overlay"]), cv2.IMREAD_UNCHANGED)
        assert written.shape == (*size, 3)
        # The same picture again from the source, the written mask and the truth file.
        display = draw.downscale(imaging.load_image(Path(row["source"]).read_bytes()))
        mask = imaging.binarise(cv2.imread(str(out / row["mask"]), cv2.IMREAD_UNCHANGED))
        truth_file = segmented / "masks" / f"{case_id}.png"
        truth = None
        if truth_file.exists():
            truth = imaging.binarise(cv2.imread(str(truth_file), cv2.IMREAD_UNCHANGED))
            truth = imaging.resize_mask(truth, *size)
        expected = draw.overlay(display, imaging.resize_mask(mask, *size), truth)
        np.testing.assert_array_equal(written, expected)


class _Table(HTMLParser):
    """The ``data-value`` of each cell of each body row of the page's table, and its headings."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.sorted: dict[str, str] = {}
        self.body = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "tbody":
            self.body = True
        elif tag == "th" and "aria-sort" in values:
            self.sorted[values["data-column"] or ""] = values["aria-sort"] or ""
        elif tag == "tr" and self.body:
            self.rows.append([])
        elif tag == "td" and self.body:
            self.rows[-1].append(values["data-value"] or "")


def _chromium(browser: str, url: str, tmp: Path, *options: str) -> str:
    """Run Chromium headless on ``url``; its stdout."""
    done = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--user-data-dir={tmp / 'chromium-profile'}",
            *options,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _table(browser: str, url: str, tmp: Path) -> _Table:
    table = _Table()
    table.feed(_chromium(browser, url, tmp, "--dump-dom"))
    return table


def _found(screenshot: np.ndarray, picture: np.ndarray) -> tuple[np.ndarray, int]:
    """The region of ``screenshot`` where ``picture`` matches best, and its top row."""
    scores = cv2.matchTemplate(screenshot, picture, cv2.TM_CCOEFF_NORMED)
    _, _, _, (x, y) = cv2.minMaxLoc(scores)
    return screenshot[y : y + picture.shape[0], x : x + picture.shape[1]], y


@pytest.mark.timeout(400)
def test_report_job_writes_a_page_chromium_renders_and_sorts(segmented, tmp_path, chromium):
    out = segmented / "out"
    done = subprocess.run(
        [sys.executable, "jobs/report.py", str(out), "--sheet", "2", "--run", segmented / "run"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"report of 6 images (1 failed): {out / 'report.html'}" in done.stdout
    assets = out / "report"
    rows = pq.read_table(out / "segmentation.parquet").to_pylist()
    review = ["review.png"] if any(r["qc"] == "review" for r in rows) else []
    assert sorted(p.name for p in assets.iterdir()) == sorted(
        ["best.png", "curves.png", "histogram.png", "worst.png", *review]
    )
    worst = cv2.imread(str(assets / "worst.png"))
    assert worst.shape == (CAPTION_HEIGHT + 256, 2 * 256 + GAP, 3)
    scored = sorted((r for r in rows if r["dice"] is not None), key=lambda r: (r["dice"], r["id"]))
    overlay = cv2.imread(str(out / scored[0]["overlay"]))
    np.testing.assert_array_equal(worst[CAPTION_HEIGHT:, :256], draw.fit(overlay, 256))

    _assert_captions_fit(worst, 2)
    text = (out / "report.html").read_text()
    assert "true positive" in text and "predicted outline" in text  # scored: agreement colours
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    settings = manifest["settings"]
    made = dict(report.provenance(manifest, "NOW"))
    assert made == {
        "model": f"{manifest['model']} (SHA-256 {settings['model_sha256']})",
        "threshold": "0.5",
        "input": f"{segmented / 'images'}, ground truth {segmented / 'masks'}",
        "made by": f"lungseg {__version__} segment, complete {manifest['finished']}",
        "report": f"lungseg {__version__}, NOW",
    }
    assert manifest["model"].endswith("model.keras") and len(settings["model_sha256"]) == 64
    for name, value in made.items():
        if name != "report":
            assert f"<dt>{name}</dt><dd>{html.escape(value)}</dd>" in text

    page = (out / "report.html").as_uri()
    shown = _table(chromium, page, tmp_path)
    assert len(shown.rows) == len(rows) == 6
    assert all(len(cells) == 13 for cells in shown.rows)
    ids = [cells[0] for cells in shown.rows]
    assert sorted(ids) == sorted(r["id"] for r in rows)
    assert [float(c[1]) for c in shown.rows[:4]] == [r["dice"] for r in scored]  # worst first
    first = shown.rows[ids.index(SAMPLE_IDS[0])]
    by_id = {r["id"]: r for r in rows}
    assert first[8:11] == [
        f"masks/{SAMPLE_IDS[0]}.png",
        f"overlays/{SAMPLE_IDS[0]}.png",
        Path(by_id[SAMPLE_IDS[0]]["source"]).as_uri(),
    ]
    broken = shown.rows[ids.index("broken")]
    assert broken[8:11] == ["", "", Path(by_id["broken"]["source"]).as_uri()]
    assert (out / first[8]).is_file() and Path(first[10].removeprefix("file://")).is_file()
    qc_cells = {cells[0]: cells[4:7] for cells in shown.rows}
    assert qc_cells == {
        r["id"]: ["" if r[k] is None else repr(r[k]) for k in ("qc_dice", "qc_score")]
        + [r["qc"] or ""]
        for r in rows
    }

    by_id = _table(chromium, page + "#sort=id", tmp_path)
    assert [c[0] for c in by_id.rows] == sorted(ids, key=str.casefold)  # as people sort
    assert by_id.sorted == {"id": "ascending"}
    by_dice = _table(chromium, page + "#sort=-dice", tmp_path)
    assert [c[1] for c in by_dice.rows[:4]] == [repr(r["dice"]) for r in scored[::-1]]
    assert [c[1] for c in by_dice.rows[4:]] == ["", ""]  # no Dice: last either way
    assert by_dice.sorted == {"dice": "descending"}

    _chromium(
        chromium, page, tmp_path, f"--screenshot={tmp_path / 'shot.png'}", "--window-size=1280,2400"
    )
    shot = cv2.imread(str(tmp_path / "shot.png"))
    assert shot.shape == (2400, 1280, 3)
    bottom = 0
    for name in ("histogram", "worst", "best"):
        picture = cv2.imread(str(assets / f"{name}.png"))
        region, y = _found(shot, picture)
        assert np.abs(region.astype(int) - picture).mean() < 2, f"{name}.png is not shown"
        inked = [(p != 255).any(axis=-1).mean() for p in (region, picture)]
        assert inked[0] > 0.9 * inked[1] > 0.05, f"{name}.png is shown blank"
        bottom = max(bottom, y + picture.shape[0])
    # The table: its heading row's colour below the pictures, then dark text on each line.
    heading = np.flatnonzero(((shot == (241, 231, 223)).all(axis=-1)).sum(axis=1) > 500)
    assert heading.size and heading[0] > bottom
    lines = shot[heading[-1] + 1 : heading[-1] + 1 + 6 * 22]
    assert ((lines < 100).all(axis=-1).sum(axis=1) > 0).sum() > 6 * 5


@pytest.mark.timeout(400)
def test_the_review_sheet_shows_what_quality_control_sent_lowest_dice_first(segmented, tmp_path):
    out = tmp_path / "review"
    shutil.copytree(segmented / "out", out)  # its files; the table is changed below
    rows = pq.read_table(segmented / "out" / "segmentation.parquet").to_pylist()
    done = sorted((r for r in rows if r["status"] != "error"), key=lambda r: r["id"])
    sent = {done[0]["id"]: 0.91, done[1]["id"]: 0.82, done[2]["id"]: 0.93}
    for row in rows:
        if row["id"] in sent:
            why = f"why {row['id']}"
            row |= {"qc": "review", "qc_dice": sent[row["id"]], "qc_score": 0.2, "qc_reason": why}
        elif row["status"] != "error":
            row |= {"qc": "ok", "qc_dice": 0.97, "qc_score": 0.8, "qc_reason": None}
    pq.write_table(pa.Table.from_pylist(rows, SCHEMA), out / "segmentation.parquet")
    report.run_report(ReportConfig(output=str(out), sheet=1, review=2))
    page = (out / "report.html").read_text()
    assert "3 of 5 assessed by quality control (60.0%)" in page
    assert "the 2 lowest predicted Dice of 3" in page
    lowest = sorted(sent, key=sent.get)[:2]
    assert [f"<li>{i}: why {i}</li>" in page for i in sent] == [i in lowest for i in sent]
    sheet = cv2.imread(str(out / "report" / "review.png"))
    assert sheet.shape == (CAPTION_HEIGHT + 256, 2 * 256 + GAP, 3)
    first = next(r for r in rows if r["id"] == lowest[0])
    np.testing.assert_array_equal(
        sheet[CAPTION_HEIGHT:, :256], draw.fit(cv2.imread(str(out / first["overlay"])), 256)
    )


def test_a_table_from_before_quality_control_still_makes_a_report(segmented, tmp_path):
    out = tmp_path / "old"
    shutil.copytree(segmented / "out", out)  # its files; the table is changed below
    table = pq.read_table(segmented / "out" / "segmentation.parquet")
    pq.write_table(
        table.drop_columns(["qc_dice", "qc_score", "qc", "qc_reason"]),
        out / "segmentation.parquet",
    )
    result = report.run_report(ReportConfig(output=str(out)))
    assert (result.images, result.failed) == (6, 1)
    assert "0 of 0 assessed by quality control" in (out / "report.html").read_text()
    assert not (out / "report" / "review.png").exists()


@pytest.mark.timeout(400)
def test_report_without_overlays_or_truth_draws_from_sources(segmented, tmp_path):
    """No overlay and no Dice: sheets rank by lung fraction and are drawn from source + mask."""
    out = tmp_path / "bare"
    shutil.copytree(segmented / "out", out)  # its files; the table is changed below
    table = pq.read_table(segmented / "out" / "segmentation.parquet")
    nulls = {
        name: pa.nulls(table.num_rows, table.schema.field(name).type)
        for name in ("overlay", "dice", "iou", "tp", "fp", "fn")
    }
    for name, column in nulls.items():
        table = table.set_column(table.schema.get_field_index(name), name, column)
    pq.write_table(table, out / "segmentation.parquet")
    shutil.rmtree(out / "overlays")  # as the table says: a run without them
    result = report.run_report(ReportConfig(output=str(out), sheet=1))
    assert (result.images, result.failed) == (6, 1)
    page = (out / "report.html").read_text()
    assert "The smallest lung fractions" in page and "report/curves.png" not in page
    # No ground truth: the legend names the outline alone, no agreement colours.
    assert "predicted outline" in page
    assert not any(label in page for _, label in draw.LEGEND)
    rows = [r for r in table.to_pylist() if r["lung_fraction"] is not None]
    smallest = min(rows, key=lambda r: (r["lung_fraction"], r["id"]))
    image = draw.downscale(imaging.load_image(Path(smallest["source"]).read_bytes()))
    mask = imaging.binarise(cv2.imread(str(out / smallest["mask"]), cv2.IMREAD_UNCHANGED))
    expected = draw.fit(draw.overlay(image, imaging.resize_mask(mask, *image.shape), None), 256)
    worst = cv2.imread(str(out / "report" / "worst.png"))
    np.testing.assert_array_equal(worst[CAPTION_HEIGHT:], expected)


@pytest.mark.timeout(400)
@pytest.mark.usefixtures("local_ray")
def test_overlays_and_report_in_a_bucket(s3, s3_endpoint, model_path):
    from lungseg.jobs.segment import run_segmentation
    from tests.conftest import upload_sample

    data = upload_sample(s3, "xrays", "report", SAMPLE_IDS[:2])
    s3.create_bucket(Bucket="reports")
    output = "s3://reports/batch1"
    run_segmentation(
        labelled_config(data, output, model=model_path, s3_endpoint=s3_endpoint, overlays=True)
    )
    result = report.run_report(ReportConfig(output=output, sheet=1, s3_endpoint=s3_endpoint))
    assert result.html == f"{output}/report.html"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="reports")["Contents"]}
    for case_id in SAMPLE_IDS[:2]:
        assert f"batch1/overlays/{case_id}.png" in keys
    for name in ("report.html", "report/worst.png", "report/best.png", "report/histogram.png"):
        assert f"batch1/{name}" in keys
    page = s3.get_object(Bucket="reports", Key="batch1/report.html")["Body"].read().decode()
    assert f'href="overlays/{SAMPLE_IDS[0]}.png"' in page


def test_report_job_help_is_the_cli_help():
    from lungseg.cli import build_parser

    def help_of(*command: str) -> str:
        return subprocess.run(
            [*command, "--help"], capture_output=True, text=True, check=True, cwd=REPO
        ).stdout

    job_help = help_of(sys.executable, "jobs/report.py")
    assert job_help == help_of(sys.executable, "-m", "lungseg.cli", "report")
    subparser = build_parser()._subparsers._group_actions[0].choices["report"]
    for action in subparser._actions:
        assert action.help, f"report {action.option_strings} has no help text"
