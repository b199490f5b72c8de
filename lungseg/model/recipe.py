"""The training recipe, one for every trainer.

:mod:`lungseg.jobs.train` (Ray Train, TensorFlow, any number of workers) and :func:`fit` (one
process, any Keras backend: TensorFlow here, JAX on a GPU box without Ray) train alike: the loss
(:func:`lungseg.model.unet.bce_dice_loss`), Adam with :func:`learning_rate`'s cosine decay,
:func:`augment_batch` on every training image, validation by :func:`score_validation` (the Dice
of the masks that ``segment`` would write, post-processed, at the model's size), early stopping
by :func:`should_stop`, the epoch kept by :func:`best_epoch`, and the kept model's
quality-control calibration by :func:`calibrated`. Knows nothing of Ray or files: what a run
leaves behind comes out of :func:`run_files` as bytes.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np

from lungseg import __version__
from lungseg.core import draw, imaging, qc
from lungseg.core.config import MODEL_BATCH, THRESHOLD, RecipeConfig
from lungseg.core.layout import (
    CURVES_FILE,
    METRICS_FILE,
    MODEL_FILE,
    OK,
    PROVENANCE_FILE,
    REVIEW,
)
from lungseg.core.metrics import Confusion, confusion
from lungseg.model import modelfile

if TYPE_CHECKING:
    import keras

COLUMNS = (
    "epoch", "learning_rate", "loss", "dice", "iou", "val_loss", "val_dice", "val_iou", "seconds"
)  # fmt: skip
"""One row of a run's history, as ``metrics.csv`` holds it (see :func:`score_validation`)."""
CALIBRATION_FILMS = 512
"""The most training images on which a trainer fits its model's calibration, and the most
validation images on which it checks it (:func:`quality_check`)."""


def learning_rate(recipe: RecipeConfig, epoch: int) -> float:
    """Adam's rate in ``epoch`` (0-based): cosine decay from the recipe's towards 0 at the end."""
    return recipe.learning_rate * 0.5 * (1 + math.cos(math.pi * epoch / recipe.epochs))


def augment_batch(
    images: np.ndarray, masks: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Each pair of a ``(n, size, size)`` batch through :func:`lungseg.core.imaging.augment`."""
    pairs = [imaging.augment(x, y, rng) for x, y in zip(images, masks, strict=True)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def image_scores(counts: np.ndarray) -> tuple[float, float]:
    """Mean per-image Dice and IoU of an ``(n, 3)`` array of tp/fp/fn counts."""
    cases = [Confusion(*map(int, row)) for row in counts]
    return float(np.mean([c.dice for c in cases])), float(np.mean([c.iou for c in cases]))


def score_validation(
    probabilities: np.ndarray, masks: np.ndarray, threshold: float = THRESHOLD
) -> tuple[float, float]:
    """Mean per-image Dice and IoU of the post-processed masks (threshold, two largest
    components, holes filled: what ``segment`` writes) against ``masks``, at the model's size.

    The kept epoch is chosen by this Dice, so that it is the best for the masks users get.
    """
    cases = [
        confusion(imaging.postprocess(p, threshold), m)
        for p, m in zip(probabilities, masks, strict=True)
    ]
    return float(np.mean([c.dice for c in cases])), float(np.mean([c.iou for c in cases]))


def _probabilities(model: bytes, films: np.ndarray, network: keras.Model | None) -> np.ndarray:
    """The probabilities of ``model`` (``.keras`` bytes) of uint8 ``films`` at the uint8 steps
    ``segment`` sees; ``network``: the model already loaded, where the caller has it (a load
    costs 0.4-0.5 s here, and its first prediction traces the model again)."""
    from lungseg.model.unet import load_model, predict_in_batches  # Keras, where a model runs

    if network is None:
        network = load_model(model)
    probability = predict_in_batches(network, films, MODEL_BATCH["cpu"])
    return imaging.probability_bytes(probability) / 255.0


def calibrated(
    model: bytes, images: np.ndarray, masks: np.ndarray, network: keras.Model | None = None
) -> bytes:
    """``model`` (``.keras`` bytes) with its :class:`lungseg.core.qc.Calibration` inside, fitted
    on the first :data:`CALIBRATION_FILMS` of ``images`` (uint8 ``(n, size, size)`` X-rays of its
    training split) and their 0/1 ``masks``; where :func:`lungseg.core.qc.calibrate` has too
    little to fit, with why in its place (:func:`lungseg.model.modelfile.with_calibration`).
    ``network``: ``model`` already loaded, where the caller has it."""
    films = images[:CALIBRATION_FILMS]
    probability = _probabilities(model, films, network)
    calibration = qc.calibrate(films, probability, masks[: len(films)], THRESHOLD)
    missing = (
        f"the model drew fewer than {qc.MIN_FILMS} plausible lungs on its {len(films)} "
        "training films"
    )
    return modelfile.with_calibration(model, calibration, "" if calibration else missing)


def quality_check(
    model: bytes, images: np.ndarray, masks: np.ndarray, network: keras.Model | None = None
) -> dict | None:
    """How well the quality control of ``model`` (its calibration, inside the file) foretells
    the Dice of its masks of the first :data:`CALIBRATION_FILMS` of ``images`` (uint8, the
    run's validation split) against their 0/1 ``masks``, at the model's size: the figures of
    :func:`lungseg.core.qc.agreement`, which ``evaluate`` reports too. None where there is
    nothing to check: no calibration, or no validation image whose mask holds lung.
    ``network``: as for :func:`calibrated`."""
    calibration = modelfile.describe(model).calibration
    films, truths = images[:CALIBRATION_FILMS], masks[:CALIBRATION_FILMS]
    keep = [i for i, truth in enumerate(truths) if truth.any()]
    if calibration is None or not keep:
        return None
    films, truths = films[keep], truths[keep]
    rows = []
    probabilities = _probabilities(model, films, network)
    for image, probability, truth in zip(films, probabilities, truths, strict=True):
        mask = imaging.postprocess(probability, THRESHOLD)
        quality = qc.assess(mask, probability, image, calibration)
        rows.append(
            {
                "dice": confusion(mask, truth).dice,
                "qc_dice": quality.dice,
                "qc_score": quality.score,
                "qc": REVIEW if quality.review else OK,
            }
        )
    return qc.agreement(rows)


def finished(
    model: bytes, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray]
) -> tuple[bytes, dict | None]:
    """The last step of every trainer: the kept ``model`` :func:`calibrated` on the ``train``
    split's ``(images, masks)``, and its :func:`quality_check` on the ``val`` split's, loading
    the model once for both (the calibration changes the file, not the weights)."""
    from lungseg.model.unet import load_model  # Keras, only where a model runs

    network = load_model(model)
    model = calibrated(model, *train, network=network)
    return model, quality_check(model, *val, network=network)


def should_stop(history: Sequence[dict], patience: int) -> bool:
    """Early stopping: ``patience`` epochs in a row without a better validation Dice (0: never)."""
    if not patience or not history or history[-1].get("val_dice") is None:
        return False
    return len(history) - best_epoch(history) >= patience


def best_epoch(history: Sequence[dict]) -> int:
    """The epoch (1-based) whose model a run keeps: the highest validation Dice, the earliest
    of equals; without validation scores, the last epoch."""
    scores = [row.get("val_dice") for row in history]
    if not history or any(score is None for score in scores):
        return len(history)
    return 1 + max(range(len(scores)), key=lambda i: (scores[i], -i))


def history_csv(history: Sequence[dict]) -> bytes:
    """``metrics.csv``: a row per epoch, :data:`COLUMNS`."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    return text.getvalue().encode()


def provenance(
    recipe: RecipeConfig,
    split: dict[str, list[str]],
    history: Sequence[dict],
    model: modelfile.ModelFile,
    trainer: str,
    data: str,
    quality: dict | None = None,
) -> dict:
    """What made a model: recipe, split ids, history, the kept epoch, the model file's SHA-256,
    its quality-control calibration and how well that did on the validation split
    (``quality``, :func:`quality_check`)."""
    return {
        "lungseg": __version__,
        "trainer": trainer,
        "data": data,
        "recipe": asdict(recipe),
        "split": {name: sorted(ids) for name, ids in split.items()},
        "history": list(history),
        "selected_epoch": best_epoch(history),
        "selection": f"highest validation Dice after post-processing at {THRESHOLD}",
        "model_sha256": model.sha256,
        "qc_calibration": None if model.calibration is None else asdict(model.calibration),
        "qc_validation": quality,
    }


def run_files(model: bytes, history: Sequence[dict], record: dict) -> dict[str, bytes]:
    """The files a finished run leaves in its folder: the kept model, ``metrics.csv``,
    ``curves.png`` and ``provenance.json`` (``record``, from :func:`provenance`)."""
    return {
        MODEL_FILE: model,
        METRICS_FILE: history_csv(history),
        CURVES_FILE: draw.curves_png(list(history)),
        PROVENANCE_FILE: json.dumps(record, indent=2).encode(),
    }
