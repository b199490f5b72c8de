"""Data-parallel U-Net training on Ray Train: the per-worker loop and :func:`run_training`.

The recipe (schedule, augmentation, validation, early stopping, the kept epoch) is
:mod:`lungseg.model.recipe`'s, shared with the single-process trainer (:mod:`lungseg.jobs.fit`).

Why a custom training loop: Keras 3 ``model.fit`` under ``MultiWorkerMirroredStrategy`` fails
with two or more workers (ray-project/ray#47464, keras-team/keras#20585), and tf-keras ``fit``
hangs unless every rank saves. ``strategy.run`` around a ``tf.GradientTape`` step is public API,
correct for any number of workers (the Keras 3 optimizer all-reduces gradients in replica
context), and leaves saving to rank 0 alone.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import ray
import ray.train
import ray.train.collective
from ray.data.expressions import col

from lungseg.core.config import RecipeConfig, TrainConfig
from lungseg.core.errors import UserError
from lungseg.core.layout import CHECKPOINTS_DIR, ERROR, OK
from lungseg.core.progress import Progress
from lungseg.io import storage
from lungseg.io.storage import Store
from lungseg.model import recipe
from lungseg.runs.outputs import Claim
from lungseg.runs.runfolder import (
    TrainingData,
    TrainResult,
    finish_run,
    train_in_folder,
    write_data_table,
)
from lungseg.stages import pipeline

logger = logging.getLogger(__name__)

CHECKPOINT_MODEL = "model.keras"  # in a checkpoint: the last epoch's model and optimizer
BEST_FILE = "best.keras"  # in a checkpoint: the kept epoch's model so far
STATE_FILE = "state.json"  # in a checkpoint: the history so far
MAX_FAILURES = 2
"""Times a run restarts its workers from the last checkpoint after one of them died."""


def _batches(shard, batch_size: int, shuffle: int | None = None, rng=None):
    """``(images, masks)`` arrays of a dataset shard, augmented when ``rng`` is given."""
    for batch in shard.iter_batches(
        batch_size=batch_size,
        batch_format="numpy",
        local_shuffle_buffer_size=shuffle,
        local_shuffle_seed=None if rng is None else int(rng.integers(2**31)),
    ):
        images, masks = batch["image"], batch["mask"]
        if rng is not None:
            images, masks = recipe.augment_batch(images, masks, rng)
        yield images[..., None], masks[..., None]


def loop_config(config: TrainConfig, progress=None) -> dict:
    """The settings :func:`train_loop_per_worker` reads: the recipe, and where rank 0 sends
    each epoch's row for the driver to show (a ``ray.util.queue.Queue``, or None)."""
    return {"recipe": config.recipe, "progress": progress}


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: build or restore the model, then train, validate, report per epoch.

    Rank 0 validates, keeps the best epoch's model and decides when to stop; the others follow
    its decision, broadcast at the start of each epoch. Test hook:
    ``LUNGSEG_FAULT_TRAIN_RANK<r>=<epoch>`` makes rank r exit once after the training steps of
    that epoch, before it is validated and reported (:func:`pipeline.inject_fault`).
    """
    import keras
    import tensorflow as tf

    from lungseg.model.unet import bce_dice_loss, build_unet, overlap_counts, to_bytes

    settings: RecipeConfig = config["recipe"]
    queue = config["progress"]
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    context = ray.train.get_context()
    rank, workers = context.get_world_rank(), context.get_world_size()
    keras.utils.set_random_seed(settings.seed)

    history: list[dict] = []
    best = b""  # the .keras bytes of the kept epoch so far (rank 0)
    checkpoint = ray.train.get_checkpoint()
    with strategy.scope():
        if checkpoint:
            with checkpoint.as_directory() as folder:
                model = keras.models.load_model(os.path.join(folder, CHECKPOINT_MODEL))
                with open(os.path.join(folder, STATE_FILE)) as f:
                    history = json.load(f)["history"]
                with open(os.path.join(folder, BEST_FILE), "rb") as f:
                    best = f.read()
        else:
            model = build_unet(**asdict(settings.model))
            model.compile(optimizer=keras.optimizers.Adam(settings.learning_rate))
        optimizer = model.optimizer
    if rank == 0 and queue is not None and history:
        where = f"{CHECKPOINTS_DIR}/{posixpath.basename(checkpoint.path.rstrip('/'))}"
        queue.put({"resumed": history, "checkpoint": where})

    def step(images, masks):
        with tf.GradientTape() as tape:
            probability = model(images, training=True)
            per_image = bce_dice_loss(masks, probability)
            loss = tf.nn.compute_average_loss(per_image)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return tf.reduce_sum(per_image), overlap_counts(masks, probability)

    @tf.function
    def distributed_step(images, masks):
        loss_sum, counts = strategy.run(step, args=(images, masks))
        return (
            strategy.reduce(tf.distribute.ReduceOp.SUM, loss_sum, axis=None),
            strategy.gather(counts, axis=0),
        )

    @tf.function
    def predict(images):
        return model(images, training=False)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    batch_size = settings.batch_size // workers
    for epoch in range(len(history), settings.epochs):
        # Rank 0 alone has the validation scores: it decides, every worker follows.
        stop = rank == 0 and recipe.should_stop(history, settings.patience)
        if ray.train.collective.broadcast_from_rank_zero(stop):
            break
        optimizer.learning_rate.assign(recipe.learning_rate(settings, epoch))
        started = time.perf_counter()
        rng = np.random.default_rng([settings.seed, rank, epoch]) if settings.augment else None
        loss_total, counts = 0.0, []
        for images, masks in _batches(train_shard, batch_size, 4 * batch_size, rng):
            loss_sum, batch_counts = distributed_step(images, masks)
            loss_total += float(loss_sum)
            counts.append(batch_counts.numpy())
        pipeline.inject_fault(f"train_rank{rank}", epoch + 1)
        counts = np.concatenate(counts)
        dice, iou = recipe.image_scores(counts)
        row = {"epoch": epoch + 1, "loss": loss_total / len(counts), "dice": dice, "iou": iou}
        row["learning_rate"] = float(optimizer.learning_rate.numpy())
        checkpoint = None
        if rank == 0:
            val_loss, probabilities, truths = 0.0, [], []
            for images, masks in _batches(val_shard, batch_size):
                probability = predict(images)
                val_loss += float(tf.reduce_sum(bce_dice_loss(masks, probability)))
                probabilities.append(probability.numpy()[..., 0])
                truths.append(masks[..., 0])
            if probabilities:
                row["val_loss"] = val_loss / sum(len(p) for p in probabilities)
                row["val_dice"], row["val_iou"] = recipe.score_validation(
                    np.concatenate(probabilities), np.concatenate(truths)
                )
            row["seconds"] = time.perf_counter() - started
            history.append(row)
            if recipe.best_epoch(history) == len(history):
                best = to_bytes(model)
            folder = tempfile.mkdtemp()
            model.save(os.path.join(folder, CHECKPOINT_MODEL))
            with open(os.path.join(folder, BEST_FILE), "wb") as f:
                f.write(best)
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump({"history": history}, f)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
            if queue is not None:
                queue.put(row)
        else:
            row["seconds"] = time.perf_counter() - started
            history.append(row)
        ray.train.report(row, checkpoint=checkpoint)
        if checkpoint is not None:
            shutil.rmtree(folder)


def _read_checkpoint(checkpoint: ray.train.Checkpoint) -> tuple[bytes, list[dict]]:
    """The kept model's bytes and the history in a run's last checkpoint."""
    with checkpoint.as_directory() as folder:
        with open(os.path.join(folder, BEST_FILE), "rb") as f:
            model = f.read()
        with open(os.path.join(folder, STATE_FILE)) as f:
            history = json.load(f)["history"]
    return model, history


def _follow(queue, progress: Progress, done: threading.Event, trained: set[int]) -> None:
    """Show each epoch row that rank 0 puts in ``queue`` until ``done`` (a driver thread), and
    the checkpoint that the workers went on from; ``trained`` gets the epochs trained here."""
    from ray.util.queue import Empty

    while not (done.is_set() and queue.empty()):
        try:
            row = queue.get(timeout=0.5)
        except Empty:
            continue
        if "resumed" in row:
            epochs = len(row["resumed"])
            if trained:  # this run's own checkpoint: a worker died
                logger.warning(
                    "a worker died: going on from the checkpoint of epoch %d (%s)",
                    epochs,
                    row["checkpoint"],
                )
            else:
                logger.info(
                    "resume: going on from the checkpoint of epoch %d (%s)",
                    epochs,
                    row["checkpoint"],
                )
                progress.advance(epochs)
        else:
            trained.add(row["epoch"])
            figures = {key: row.get(key) for key in ("loss", "dice", "val_dice")}
            progress.advance(1, **figures)


def run_training(
    config: TrainConfig,
    progress: Progress | None = None,
    start_ray: Callable[[], None] = pipeline.attach,
) -> TrainResult:
    """Preprocess the labelled cases on Ray Data, train on Ray Train, write the run folder.

    Every image under ``config.data`` gets a row in ``data.parquet``: ``ok`` (trained or
    validated on), ``error`` (unreadable, mask of another size, ...; left out) or ``flagged``
    (no mask, empty mask, or not in the split file; left out). Training needs at least one
    readable pair per worker (Ray gives each worker an equal share) and, when the split has
    validation ids, one readable validation pair; with fewer it stops, naming the failed pairs.
    A worker that dies restarts the run from its last checkpoint, up to :data:`MAX_FAILURES`
    times; rerunning with the same ``output`` resumes from the last checkpoint too (the same
    run only: :func:`lungseg.runs.runfolder.train_in_folder`). Ray Train keeps its checkpoints in
    the run folder's ``checkpoints/``.
    """
    progress = progress or Progress()
    store = Store.for_job(config.s3_endpoint)
    if not os.path.dirname(store.resolve(config.output)[1]):
        raise UserError(f"--output must be a folder inside a bucket: {config.output}")

    def started() -> None:  # and the checks that need the cluster, before the claim
        start_ray()
        nodes = sum(node["Alive"] for node in ray.nodes())
        storage.check_shared(config.output, nodes, config.allow_local_output)
        _pools(config)

    return train_in_folder(
        config,
        store,
        lambda data, claim: _train(config, data, claim, progress),
        start_ray=started,
    )


def _pools(config: TrainConfig) -> tuple[pipeline.Pool, float, bool]:
    """The preprocessing pool (it reads the data before the workers start, so it may have every
    CPU), the CPUs of each train worker and whether each gets a GPU (``--device``), refused
    where they could never start."""
    on = pipeline.cluster()
    use_gpu = pipeline.resolve_device(config.resources, on).use_gpu
    pool = pipeline.preprocess_pool(on, config.resources)
    worker_cpus = pipeline.train_worker_cpus(on, config.workers, config.worker_cpus)
    workers = pipeline.Pool(config.workers, config.workers, worker_cpus)
    pipeline.check_fits({"--preprocess-actors/--actor-cpus": pool}, on)
    pipeline.check_fits({"--workers/--worker-cpus": workers}, on)
    return pool, worker_cpus, use_gpu


RAY_STORAGE_PROBE = ".validate_storage_marker"
"""The empty file Ray Train writes in its folder to check that every node reaches the storage
(and checks before each checkpoint): made again by each run, so removed after it."""


def _tidy(store: Store, checkpoints: str) -> None:
    """Remove what Ray Train leaves in the run folder's ``checkpoints/`` besides checkpoints:
    its storage probe and, on S3, the folder marker objects of its ``create_dir``."""
    store.delete_file(storage.join(checkpoints, RAY_STORAGE_PROBE))
    store.remove_folder_markers(checkpoints)


def _train(
    config: TrainConfig, data: TrainingData, claim: Claim, progress: Progress
) -> TrainResult:
    from ray.train.tensorflow import TensorflowTrainer
    from ray.util.queue import Queue

    store = claim.store
    fs, path = store.resolve(config.output)
    pool, worker_cpus, use_gpu = _pools(config)
    # One read of every split, so that no split waits for the read of the one before.
    split_of = {case.id: name for name, cases in data.parts.items() for case in cases}
    progress.start("read", len(split_of))
    cases = [case for part in data.parts.values() for case in part]
    read = pipeline.preprocessed(
        cases, config.recipe.model.size, pool, store, train=True
    ).materialize()
    done = read.select_columns(["id", "source", "status", "error"]).take_all()
    rows = [row | {"split": split_of[row["id"]], "error": row["error"] or None} for row in done]
    progress.advance(len(done), sum(row["status"] == ERROR for row in done))
    progress.finish()
    usable = read.filter(expr=col("status") == OK)
    datasets = {
        name: usable.filter(expr=col("id").is_in([case.id for case in part])).select_columns(
            ["image", "mask"]
        )
        for name, part in data.parts.items()
    }
    statuses = write_data_table(claim, data, rows, config.workers)

    queue = Queue(actor_options={"num_cpus": 0})
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(config, queue),
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": worker_cpus},
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(
            name=CHECKPOINTS_DIR,
            storage_path=path,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=MAX_FAILURES),
        ),
    )
    progress.start("train", config.recipe.epochs, "epochs")
    finished, trained = threading.Event(), set()
    follower = threading.Thread(
        target=_follow, args=(queue, progress, finished, trained), daemon=True
    )
    follower.start()
    try:
        result = trainer.fit()
    finally:
        finished.set()
        follower.join()
        progress.finish()
        queue.shutdown()
        _tidy(store, claim.uri(CHECKPOINTS_DIR))
    model, history = _read_checkpoint(result.checkpoint)
    train, val = (_arrays(datasets[name], config.recipe.model.size) for name in ("train", "val"))
    model, quality = ray.get(ray.remote(recipe.finished).remote(model, train, val))
    trainer = f"Ray Train, {config.workers} workers"
    first = min(trained, default=len(history) + 1)
    return finish_run(config, claim, model, history, rows, trainer, statuses, quality, first)


def _arrays(dataset, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The first :data:`lungseg.model.recipe.CALIBRATION_FILMS` images and masks of a split,
    as the arrays a trainer calibrates and checks its model on (empty ones for no images)."""
    films = dataset.limit(recipe.CALIBRATION_FILMS).take_all()
    if not films:
        return np.zeros((0, size, size), np.uint8), np.zeros((0, size, size), np.uint8)
    return tuple(np.stack([row[key] for row in films]) for key in ("image", "mask"))
