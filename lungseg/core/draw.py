"""Pictures people look at: overlays, contact sheets, training curves and histograms.

Array pictures are drawn with OpenCV as ``uint8`` arrays (BGR when in colour), figures with
matplotlib as PNG bytes. Knows nothing of files, jobs or Ray. Overlay colours are fixed, so that
every picture reads the same way: true positives (lung in the prediction and in the truth) green
``#00ff00``, false positives (predicted, not in the truth) red ``#ff0000``, false negatives (in
the truth, missed) blue ``#0080ff``, blended over the X-ray (the errors more strongly than the
agreement, :data:`ALPHAS`, so that they stand out and the lung stays readable); the predicted
lung outline yellow ``#ffff00``.
"""

from __future__ import annotations

import io
import math
import statistics
from collections.abc import Sequence

import cv2
import numpy as np

# BGR, as OpenCV draws.
TP_COLOUR = (0, 255, 0)
FP_COLOUR = (0, 0, 255)
FN_COLOUR = (255, 128, 0)
OUTLINE_COLOUR = (0, 255, 255)
# Weight of each agreement colour over the X-ray: true positives, false positives, negatives.
ALPHAS = (0.3, 0.55, 0.55)
DISPLAY_SIZE = 512  # longest side of the X-ray copy that overlays are drawn on
CAPTION_HEIGHT = 24  # pixels of the caption band above each contact-sheet entry
GAP = 8  # pixels between contact-sheet entries
SHEET_BACKGROUND = 96
SHEET_COLUMNS = 4  # entries per row of the report's contact sheets
TILE = 256  # side of a report contact-sheet tile
_FONT = cv2.FONT_HERSHEY_SIMPLEX
LEGEND = (
    (TP_COLOUR, "true positive"),
    (FP_COLOUR, "false positive"),
    (FN_COLOUR, "false negative"),
)


def downscale(image: np.ndarray, longest: int = DISPLAY_SIZE) -> np.ndarray:
    """``image`` shrunk (area interpolation, aspect kept) to at most ``longest`` pixels a side."""
    height, width = image.shape[:2]
    scale = longest / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def fit(image: np.ndarray, side: int) -> np.ndarray:
    """``image`` scaled to fit a ``side`` square, aspect kept, centred on the sheet's gray."""
    height, width = image.shape[:2]
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    smaller = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    scaled = cv2.resize(image, size, interpolation=smaller)
    tile = np.full((side, side, *image.shape[2:]), SHEET_BACKGROUND, np.uint8)
    y, x = (side - size[1]) // 2, (side - size[0]) // 2
    tile[y : y + size[1], x : x + size[0]] = scaled
    return tile


def tint(pixels: np.ndarray, colour: tuple[int, int, int], alpha: float) -> np.ndarray:
    """BGR ``pixels`` blended with ``colour`` at weight ``alpha``, rounded to ``uint8``."""
    mixed = (1 - alpha) * pixels.astype(np.float64) + alpha * np.array(colour, np.float64)
    return np.rint(mixed).astype(np.uint8)


def overlay(image: np.ndarray, prediction: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """The X-ray in gray with the predicted lung outline and, given a truth, agreement colours.

    ``image`` is 2-D ``uint8``, the masks 0/1 of its size. With a ``truth``, true positive,
    false positive and false negative pixels are tinted (:func:`tint`, :data:`ALPHAS`); the
    outline of the prediction goes on top, and a legend naming the colours in the lower left
    corner. Returns BGR ``uint8`` of the image's size.
    """
    picture = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    predicted = prediction.astype(bool)
    legend = []
    if truth is not None:
        true = truth.astype(bool)
        wheres = (predicted & true, predicted & ~true, ~predicted & true)
        for (colour, label), alpha, where in zip(LEGEND, ALPHAS, wheres, strict=True):
            picture[where] = tint(picture[where], colour, alpha)
            legend.append((colour, label))
    contours, _ = cv2.findContours(
        predicted.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
    )
    thickness = max(1, round(max(image.shape) / 256))
    cv2.drawContours(picture, contours, -1, OUTLINE_COLOUR, thickness, cv2.LINE_8)
    _draw_legend(picture, [*legend, (OUTLINE_COLOUR, "predicted outline")], thickness)
    return picture


def _draw_legend(
    picture: np.ndarray, entries: list[tuple[tuple[int, int, int], str]], thickness: int
) -> None:
    """Colour swatches (the last entry a line: the outline) and labels on a darkened box."""
    scale = max(0.3, max(picture.shape[:2]) / 1400)
    (text_w, text_h), _ = cv2.getTextSize(max((e[1] for e in entries), key=len), _FONT, scale, 1)
    line, swatch, pad = round(text_h * 1.7), round(text_h * 1.6), round(text_h * 0.6)
    box_w, box_h = pad * 3 + swatch + text_w, pad * 2 + line * len(entries)
    x0, y0 = pad, picture.shape[0] - pad - box_h
    if x0 < 0 or y0 < 0 or box_w + pad > picture.shape[1]:
        return  # too small a picture to carry a legend
    box = picture[y0 : y0 + box_h, x0 : x0 + box_w]
    box[:] = (box * 0.3).astype(np.uint8)
    for k, (colour, label) in enumerate(entries):
        top = y0 + pad + k * line + (line - text_h) // 2
        left, right = x0 + pad, x0 + pad + swatch
        if k == len(entries) - 1:
            middle = top + text_h // 2
            cv2.line(picture, (left, middle), (right, middle), colour, thickness)
        else:
            cv2.rectangle(picture, (left, top), (right, top + text_h), colour, cv2.FILLED)
        cv2.putText(
            picture, label, (right + pad, top + text_h), _FONT, scale, (255,) * 3, 1, cv2.LINE_AA
        )


_CAPTION_SCALE, _MARGIN = 0.5, 6  # the caption font's size, pixels left free either side


def caption_scale(caption: str, width: int) -> float:
    """The font scale at which ``caption`` fits a band ``width`` pixels wide with its margins:
    the usual size, smaller for a long caption (a path id), which is never cut off."""
    text_w = cv2.getTextSize(caption, _FONT, _CAPTION_SCALE, 1)[0][0]
    room = width - 2 * _MARGIN
    return _CAPTION_SCALE if text_w <= room else _CAPTION_SCALE * room / text_w


def contact_sheet(entries: Sequence[tuple[str, Sequence[np.ndarray]]], columns: int) -> np.ndarray:
    """Captioned entries, each one or more equal ``uint8`` tiles side by side, in a grid.

    ``columns`` entries per row, :data:`GAP` pixels between entries, a black
    :data:`CAPTION_HEIGHT` band with the caption in white above each entry, smaller where it
    would not fit (:func:`caption_scale`). Every entry has as
    many tiles, all of one height and width; the sheet is BGR when any tile is, else gray.
    """
    colour = any(tile.ndim == 3 for _, tiles in entries for tile in tiles)
    height, width = entries[0][1][0].shape[:2]
    cols, rows = min(len(entries), columns), -(-len(entries) // columns)
    cell_w, cell_h = len(entries[0][1]) * width, CAPTION_HEIGHT + height
    shape = (rows * (cell_h + GAP) - GAP, cols * (cell_w + GAP) - GAP)
    sheet = np.full((*shape, 3) if colour else shape, SHEET_BACKGROUND, np.uint8)
    white = (255,) * 3 if colour else 255
    for k, (caption, tiles) in enumerate(entries):
        y, x = (k // columns) * (cell_h + GAP), (k % columns) * (cell_w + GAP)
        sheet[y : y + CAPTION_HEIGHT, x : x + cell_w] = 0
        scale = caption_scale(caption, cell_w)
        cv2.putText(sheet, caption, (x + _MARGIN, y + 17), _FONT, scale, white, 1, cv2.LINE_AA)
        for j, tile in enumerate(tiles):
            if colour and tile.ndim == 2:
                tile = cv2.cvtColor(tile, cv2.COLOR_GRAY2BGR)
            sheet[y + CAPTION_HEIGHT : y + cell_h, x + j * width : x + (j + 1) * width] = tile
    return sheet


def four_panel(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Input, ground truth, prediction and overlap (:func:`overlay`) in a titled row, as BGR."""
    panels = (
        ("input", image),
        ("ground truth", truth.astype(np.uint8) * 255),
        ("prediction", prediction.astype(np.uint8) * 255),
        ("overlap", overlay(image, prediction, truth)),
    )
    return contact_sheet([(title, [panel]) for title, panel in panels], columns=len(panels))


def _figure_png(draw, size: tuple[float, float]) -> bytes:
    """PNG bytes of a matplotlib figure of ``size`` inches at 100 dpi, filled by ``draw(plt)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=size, dpi=100)
    draw(figure)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def curves_png(history: list[dict]) -> bytes:
    """Loss, Dice and IoU per epoch, training and validation, side by side: 1500x400 PNG."""
    epochs = [row["epoch"] for row in history]

    def draw(figure) -> None:
        for k, metric in enumerate(("loss", "dice", "iou")):
            axis = figure.add_subplot(1, 3, k + 1)
            for prefix, style in (("", "-o"), ("val_", "--s")):
                values = [row.get(prefix + metric) for row in history]
                points = [(e, v) for e, v in zip(epochs, values, strict=True) if v is not None]
                if points:
                    axis.plot(*zip(*points, strict=True), style, label=prefix + metric)
            axis.set_xlabel("epoch")
            axis.xaxis.get_major_locator().set_params(integer=True)
            axis.set_title({"loss": "Loss", "dice": "Dice", "iou": "IoU"}[metric])
            axis.grid(alpha=0.3)
            axis.legend()

    return _figure_png(draw, (15, 4))


def histogram_png(values: Sequence[float], label: str) -> bytes:
    """Histogram of ``values`` in [0, 1], mean and median marked: 700x350 PNG.

    20 bins over the values' range widened to multiples of 0.05, so that a run whose Dice are
    all near 0.9 still shows their spread.
    """
    lo = math.floor(min(values) * 20) / 20
    hi = max(math.ceil(max(values) * 20) / 20, lo + 0.05)

    def draw(figure) -> None:
        axis = figure.add_subplot()
        axis.hist(values, bins=np.linspace(lo, hi, 21), color="#4878a8", edgecolor="white")
        for value, style, name in (
            (statistics.fmean(values), "-", "mean"),
            (statistics.median(values), "--", "median"),
        ):
            axis.axvline(value, color="#c03030", linestyle=style, label=f"{name} {value:.3f}")
        axis.set_xlim(lo, hi)
        axis.set_xlabel(label)
        axis.set_ylabel("images")
        axis.yaxis.get_major_locator().set_params(integer=True)
        axis.set_title(f"{label} of {len(values)} images")
        axis.legend(loc="best")

    return _figure_png(draw, (7, 3.5))
