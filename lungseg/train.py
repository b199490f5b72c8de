"""Data-parallel U-Net training on Ray Train: the per-worker loop and ``run_training``.

Why a custom training loop: Keras 3 ``model.fit`` under ``MultiWorkerMirroredStrategy`` fails
with two or more workers (ray-project/ray#47464, keras-team/keras#20585), and tf-keras ``fit``
hangs unless every rank saves. ``strategy.run`` around a ``tf.GradientTape`` step is public API,
correct for any number of workers (the Keras 3 optimizer all-reduces gradients in replica
context), and leaves saving to rank 0 alone.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.collective
from ray.train.tensorflow import TensorflowTrainer

from lungseg import catalog, imaging, pipeline, report, storage
from lungseg.config import TrainConfig
from lungseg.metrics import Confusion

MODEL_FILE = "model.keras"
BEST_FILE = "best.keras"
STATE_FILE = "state.json"
DATA_FILE = "data.parquet"
COLUMNS = [
    "epoch", "learning_rate", "loss", "dice", "iou", "val_loss", "val_dice", "val_iou", "seconds"
]  # fmt: skip
"""metrics.csv; ``seconds`` is the epoch's training and validation, checkpointing left out."""
DATA_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)
"""``data.parquet``: one row per image under ``--data``, with the split it went to."""
MAX_FAILURES = 2
"""Times a run restarts its workers from the last checkpoint after one of them died."""
_FAILED_SHOWN = 10  # failed pairs named in the error when too few are left


@dataclass(frozen=True)
class TrainResult:
    """Where a finished run put its files, and its last epoch's metrics."""

    run: str
    model: str
    metrics: dict
    history: list[dict]
    table: str  # data.parquet: every image and whether it was trained on
    images: int
    flagged: int
    failed: int


def _image_scores(counts: np.ndarray) -> tuple[float, float]:
    """Mean per-image Dice and IoU of an ``(n, 3)`` array of tp/fp/fn counts."""
    cases = [Confusion(*map(int, row)) for row in counts]
    return float(np.mean([c.dice for c in cases])), float(np.mean([c.iou for c in cases]))


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
            pairs = [imaging.augment(x, y, rng) for x, y in zip(images, masks, strict=True)]
            images, masks = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
        yield images[..., None], masks[..., None]


def should_stop(history: list[dict], patience: int) -> bool:
    """Early stopping: ``patience`` epochs in a row without a better validation Dice (0: never)."""
    scores = [row.get("val_dice") for row in history]
    if not patience or not scores or scores[-1] is None:
        return False
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return len(scores) - 1 - best >= patience


def loop_config(config: TrainConfig) -> dict:
    """The settings :func:`train_loop_per_worker` reads, from a job's config."""
    return {
        "model": asdict(config.model),
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "seed": config.seed,
        "augment": config.augment,
        "patience": config.patience,
    }


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: build or restore the model, then train, validate, report per epoch.

    Test hook: ``LUNGSEG_FAULT_TRAIN_RANK<r>=<epoch>`` makes rank r exit once after the training
    steps of that epoch, before it is validated and reported (:func:`pipeline.inject_fault`).
    """
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import tensorflow as tf

    from lungseg.model import bce_dice_loss, build_unet, cosine_learning_rate, overlap_counts

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    context = ray.train.get_context()
    rank = context.get_world_rank()
    keras.utils.set_random_seed(config["seed"])

    history: list[dict] = []
    best = b""  # the .keras bytes of the epoch with the best validation Dice so far (rank 0)
    checkpoint = ray.train.get_checkpoint()
    with strategy.scope():
        if checkpoint:
            with checkpoint.as_directory() as folder:
                model = keras.models.load_model(os.path.join(folder, MODEL_FILE), compile=True)
                with open(os.path.join(folder, STATE_FILE)) as f:
                    history = json.load(f)["history"]
                with open(os.path.join(folder, BEST_FILE), "rb") as f:
                    best = f.read()
        else:
            model = build_unet(**config["model"])
            model.compile(optimizer=keras.optimizers.Adam(config["learning_rate"]))
        optimizer = model.optimizer

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
    batch_size, epochs = config["batch_size"], config["epochs"]
    for epoch in range(len(history), epochs):
        if should_stop(history, config["patience"]):
            break
        optimizer.learning_rate.assign(cosine_learning_rate(config["learning_rate"], epoch, epochs))
        started = time.perf_counter()
        rng = np.random.default_rng([config["seed"], rank, epoch]) if config["augment"] else None
        loss_total, counts = 0.0, []
        for images, masks in _batches(train_shard, batch_size, 4 * batch_size, rng):
            loss_sum, batch_counts = distributed_step(images, masks)
            loss_total += float(loss_sum)
            counts.append(batch_counts.numpy())
        pipeline.inject_fault(f"train_rank{rank}", epoch + 1)
        counts = np.concatenate(counts)
        dice, iou = _image_scores(counts)
        row = {"epoch": epoch + 1, "loss": loss_total / len(counts), "dice": dice, "iou": iou}
        row["learning_rate"] = float(optimizer.learning_rate.numpy())
        checkpoint = None
        if rank == 0:
            val_loss, val_counts = 0.0, []
            for images, masks in _batches(val_shard, batch_size):
                probability = predict(images)
                val_loss += float(tf.reduce_sum(bce_dice_loss(masks, probability)))
                val_counts.append(overlap_counts(masks, probability).numpy())
            if val_counts:
                val_counts = np.concatenate(val_counts)
                val_dice, val_iou = _image_scores(val_counts)
                row |= {"val_loss": val_loss / len(val_counts), "val_dice": val_dice}
                row |= {"val_iou": val_iou}
            row["seconds"] = time.perf_counter() - started
            # Without validation the last epoch counts as the best.
            improved = "val_dice" not in row or row["val_dice"] > max(
                (r["val_dice"] for r in history), default=-1.0
            )
            history.append(row)
            folder = tempfile.mkdtemp()
            model.save(os.path.join(folder, MODEL_FILE))
            if improved:
                with open(os.path.join(folder, MODEL_FILE), "rb") as f:
                    best = f.read()
            with open(os.path.join(folder, BEST_FILE), "wb") as f:
                f.write(best)
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump({"history": history, "config": config}, f)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        else:
            row["seconds"] = time.perf_counter() - started
            history.append(row)
        ray.train.report(row, checkpoint=checkpoint)
        if checkpoint is not None:
            shutil.rmtree(folder)
        # Rank 0 alone has the validation scores: it decides, every worker follows.
        history = ray.train.collective.broadcast_from_rank_zero(history)


def _write_outputs(run: str, checkpoint: ray.train.Checkpoint, config: TrainConfig) -> tuple:
    """Copy the final model and write metrics.csv, curves.png and config.json into the run."""
    with checkpoint.as_directory() as folder:
        with open(os.path.join(folder, BEST_FILE), "rb") as f:
            model_bytes = f.read()
        with open(os.path.join(folder, STATE_FILE)) as f:
            history = json.load(f)["history"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    model_uri = storage.join(run, MODEL_FILE)
    storage.write_bytes(model_uri, model_bytes, config.s3_endpoint)
    storage.write_bytes(
        storage.join(run, "metrics.csv"), text.getvalue().encode(), config.s3_endpoint
    )
    storage.write_bytes(
        storage.join(run, "config.json"),
        json.dumps(config.to_dict(), indent=2).encode(),
        config.s3_endpoint,
    )
    storage.write_bytes(
        storage.join(run, "curves.png"), report.curves_png(history), config.s3_endpoint
    )
    return model_uri, history


def run_training(config: TrainConfig) -> TrainResult:
    """Preprocess the labelled cases on Ray Data, train on Ray Train, write the run folder.

    Every image under ``config.data`` gets a row in ``data.parquet``: ``ok`` (trained or
    validated on), ``error`` (unreadable, mask of another size, ...; left out) or ``flagged``
    (no mask, or not in the split file; left out). Training needs at least one readable pair per
    worker (Ray gives each worker an equal share) and, when the split has validation ids, one
    readable validation pair; with fewer it stops, naming the failed pairs. A worker that dies
    restarts the run from its last checkpoint, up to :data:`MAX_FAILURES` times; rerunning with
    the same ``output`` resumes from the last checkpoint too.
    """
    nodes = sum(node["Alive"] for node in ray.nodes())
    storage.check_shared(config.output, nodes, config.allow_local_output)
    storage.check_writable(config.output, config.s3_endpoint)
    found = catalog.find_cases(config.data, config.masks, config.s3_endpoint)
    print(f"catalog: {found.summary()}")
    labelled = catalog.Catalog(found.labelled, ())
    if config.split:
        split = json.loads(storage.read_bytes(config.split, config.s3_endpoint))
        parts = {name: labelled.select(split[name]) for name in ("train", "val")}
    else:
        ids = catalog.split_ids([c.id for c in labelled.cases], config.val_fraction)
        parts = dict(zip(("train", "val"), map(labelled.select, ids), strict=True))
    if not parts["train"]:
        raise ValueError(f"no labelled images to train on under {config.data}")

    res = config.resources
    budget = pipeline.CpuBudget.for_cluster(
        config.workers, res.preprocess_actors, config.worker_cpus, res.actor_cpus
    )
    datasets, rows = {}, []
    for name, cases in parts.items():
        data = pipeline.preprocessed(
            cases,
            config.model.size,
            res.preprocess_actors,
            budget.actor,
            config.s3_endpoint,
        ).materialize()
        for row in data.select_columns(["id", "source", "status", "error"]).take_all():
            rows.append(row | {"split": name, "error": row["error"] or None})
        datasets[name] = data.filter(lambda row: row["status"] == pipeline.OK).select_columns(
            ["image", "mask"]
        )
        datasets[name].context.enable_progress_bars = False  # a bar per epoch's pass is noise
    chosen = {case.id for cases in parts.values() for case in cases}
    for case in found.cases:
        if case.id not in chosen:
            why = "not in the --split file" if case.masks else "no lung mask: not trained on"
            rows.append(
                {"id": case.id, "source": case.image, "status": pipeline.FLAGGED, "error": why}
            )
    table = storage.join(config.output, DATA_FILE)
    failed: list[dict] = []
    statuses = pipeline.write_table(
        None,
        table,
        DATA_SCHEMA,
        found.cases,
        config.s3_endpoint,
        on_table=lambda t: failed.extend(r for r in t.to_pylist() if r["status"] == pipeline.ERROR),
        known=rows,
    )
    for row in failed:
        print(f"skipped {row['id']} ({row['source']}): {row['error']}")
    usable = Counter(row["split"] for row in rows if row["status"] == pipeline.OK)
    if usable["train"] < config.workers or (parts["val"] and not usable["val"]):
        named = "; ".join(f"{r['id']}: {r['error']}" for r in failed[:_FAILED_SHOWN])
        more = ", ..." if len(failed) > _FAILED_SHOWN else ""
        raise ValueError(
            f"too few readable image/mask pairs: {usable['train']} to train on (at least "
            f"{config.workers}, one per worker) and {usable['val']} to validate on (at least 1 "
            f"when the split has validation ids); {len(failed)} failed: {named}{more} "
            f"(every image is listed in {table})"
        )
    print(f"split: {usable['train']} train, {usable['val']} validation images")

    fs, path = storage.resolve(config.output, config.s3_endpoint)
    if not os.path.dirname(path):
        raise ValueError(f"--output must be a folder inside a bucket: {config.output}")
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(config),
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.workers,
            use_gpu=res.use_gpu,
            resources_per_worker={"CPU": budget.worker},
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(
            name=os.path.basename(path),
            storage_path=os.path.dirname(path),
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=MAX_FAILURES),
        ),
    )
    result = trainer.fit()
    model_uri, history = _write_outputs(config.output, result.checkpoint, config)
    return TrainResult(
        run=config.output,
        model=model_uri,
        metrics=history[-1],
        history=history,
        table=table,
        images=len(found.cases),
        flagged=statuses[pipeline.FLAGGED],
        failed=statuses[pipeline.ERROR],
    )
