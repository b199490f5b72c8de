"""Training in one process, without Ray: ``lungseg train --single-process``.

The same recipe as the Ray Train job (:mod:`lungseg.model.recipe`), the same run folder, for a
machine that has Keras (on any backend: TensorFlow, or JAX on a GPU box) but no Ray. The images
are read and preprocessed in this process, by the same
:class:`lungseg.stages.preprocess.Preprocess`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import keras
import numpy as np

from lungseg.core.config import PREPROCESS_BATCH, RecipeConfig, TrainConfig
from lungseg.core.layout import ERROR, OK
from lungseg.core.progress import Progress
from lungseg.io.catalog import Case
from lungseg.io.storage import Store
from lungseg.model import recipe
from lungseg.model.unet import (
    bce_dice_loss,
    build_unet,
    dice_per_image,
    iou_per_image,
    predict_in_batches,
    to_bytes,
)
from lungseg.runs.outputs import Claim
from lungseg.runs.runfolder import (
    TrainingData,
    TrainResult,
    finish_run,
    train_in_folder,
    write_data_table,
)
from lungseg.stages.preprocess import Preprocess, case_batch


def epoch_batches(
    images: np.ndarray, masks: np.ndarray, settings: RecipeConfig, epoch: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of ``(images, masks)`` training batches, float32 ``(n, size, size, 1)``:
    shuffled and augmented with the epoch's seed (as a Ray Train worker of rank 0 seeds its
    own)."""
    rng = np.random.default_rng([settings.seed, 0, epoch])
    order = rng.permutation(len(images))
    for start in range(0, len(order), settings.batch_size):
        chosen = order[start : start + settings.batch_size]
        x, y = images[chosen], masks[chosen]
        if settings.augment:
            x, y = recipe.augment_batch(x, y, rng)
        yield x[..., None].astype(np.float32), y[..., None].astype(np.float32)


def train_epoch(
    model: keras.Model, batches: Iterable[tuple[np.ndarray, np.ndarray]]
) -> dict[str, float]:
    """Train ``model`` on ``batches``: the mean loss and metrics over their images, as
    ``model.fit`` reports an epoch's. By ``train_on_batch``, not ``model.fit``: on TensorFlow
    that feeds an autotuned tf.data pipeline whose end stalled 4 epochs of 18 for 1.3-20 s (the
    docs' performance page)."""
    sums: dict[str, float] = {}
    count = 0
    for x, y in batches:
        logs = model.train_on_batch(x, y, return_dict=True)
        for name, value in logs.items():
            sums[name] = sums.get(name, 0.0) + float(value) * len(x)
        count += len(x)
    return {name: total / count for name, total in sums.items()}


@dataclass(frozen=True)
class FitResult:
    """A single-process run: its history, the kept epoch's model as ``.keras`` bytes and how
    well its quality control did on the validation split
    (:func:`lungseg.model.recipe.quality_check`)."""

    history: list[dict]
    model: bytes
    quality: dict | None = None


def fit(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    settings: RecipeConfig,
    on_epoch: Callable[[dict], None] | None = None,
) -> FitResult:
    """Train with Keras in this process, every step of the recipe, the kept model calibrated
    on the training images and masks and its quality control checked on the validation ones
    (:func:`lungseg.model.recipe.finished`).

    ``train`` and ``val`` are ``(images, masks)``: ``uint8`` arrays ``(n, size, size)`` of
    preprocessed X-rays and their 0/1 masks. ``on_epoch`` sees each history row as it is made.
    """
    keras.utils.set_random_seed(settings.seed)
    model = build_unet(**asdict(settings.model))
    model.compile(
        optimizer=keras.optimizers.Adam(settings.learning_rate),
        loss=bce_dice_loss,
        metrics=[dice_per_image, iou_per_image],
    )
    history: list[dict] = []
    best = b""
    for epoch in range(settings.epochs):
        if recipe.should_stop(history, settings.patience):
            break
        rate = recipe.learning_rate(settings, epoch)
        model.optimizer.learning_rate.assign(rate)
        started = time.perf_counter()
        scores = train_epoch(model, epoch_batches(*train, settings, epoch))
        row = {
            "epoch": epoch + 1,
            "learning_rate": rate,
            "loss": scores["loss"],
            "dice": scores["dice_per_image"],
            "iou": scores["iou_per_image"],
        }
        if len(val[0]):
            probability = predict_in_batches(model, val[0], settings.batch_size)
            truth = val[1][..., None].astype(np.float32)
            loss = keras.ops.convert_to_numpy(bce_dice_loss(truth, probability[..., None]))
            row["val_loss"] = float(np.mean(loss))
            row["val_dice"], row["val_iou"] = recipe.score_validation(probability, val[1])
        row["seconds"] = time.perf_counter() - started
        history.append(row)
        if recipe.best_epoch(history) == len(history):
            best = to_bytes(model)
        if on_epoch is not None:
            on_epoch(row)
    return FitResult(history, *recipe.finished(best, train, val))


def load_arrays(
    cases: Sequence[Case], size: int, store: Store
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Preprocess ``cases`` in this process: ``(images, masks)`` of the readable ones and a row
    (``id``, ``source``, ``status``, ``error``) for every case."""
    reader = Preprocess(size, store, train=True)
    images, masks, rows = [], [], []
    for start in range(0, len(cases), PREPROCESS_BATCH):
        out = reader(case_batch(cases[start : start + PREPROCESS_BATCH]))
        ok = out["status"] == OK
        images.append(out["image"][ok])
        masks.append(out["mask"][ok])
        rows.extend(
            {"id": i, "source": s, "status": st, "error": e or None}
            for i, s, st, e in zip(
                out["id"], out["source"], out["status"], out["error"], strict=True
            )
        )
    return np.concatenate(images), np.concatenate(masks), rows


def run_fit(config: TrainConfig, progress: Progress | None = None) -> TrainResult:
    """Train by the recipe in this process and write the run folder as :func:`run_training`
    does (no checkpoints: a single-process run does not resume)."""
    progress = progress or Progress()
    store = Store.for_job(config.s3_endpoint)
    return train_in_folder(
        config, store, lambda data, claim: _fit(config, data, claim, progress), resumes=False
    )


def _fit(config: TrainConfig, data: TrainingData, claim: Claim, progress: Progress) -> TrainResult:
    arrays, rows = {}, []
    progress.start("read", sum(len(cases) for cases in data.parts.values()))
    for name, cases in data.parts.items():
        images, masks, read = load_arrays(cases, config.recipe.model.size, claim.store)
        arrays[name] = (images, masks)
        rows.extend(row | {"split": name} for row in read)
        progress.advance(len(read), sum(row["status"] == ERROR for row in read))
    progress.finish()
    statuses = write_data_table(claim, data, rows, 1)

    progress.start("train", config.recipe.epochs, "epochs")

    def show(row: dict) -> None:
        progress.advance(1, **{key: row.get(key) for key in ("loss", "dice", "val_dice")})

    result = fit(arrays["train"], arrays["val"], config.recipe, show)
    progress.finish()
    trainer = f"single process, Keras {keras.__version__} on {keras.backend.backend()}"
    return finish_run(
        config, claim, result.model, result.history, rows, trainer, statuses, result.quality
    )
