"""A training run, whoever trains it (:mod:`lungseg.jobs.train` on Ray, :mod:`lungseg.jobs.fit`
in one process): its data and split, the checks before training, and the files of its run folder.
No Ray here."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

import pyarrow as pa

from lungseg.core.config import TrainConfig
from lungseg.core.errors import UserError
from lungseg.core.layout import CONFIG_FILE, DATA_FILE, ERROR, FLAGGED, MODEL_FILE, OK, TRAIN
from lungseg.io import catalog
from lungseg.io.storage import Store
from lungseg.model import recipe
from lungseg.model.modelfile import describe
from lungseg.runs import outputs, table

logger = logging.getLogger(__name__)

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
_FAILED_SHOWN = 10  # failed pairs named in the error when too few are left


@dataclass(frozen=True)
class TrainResult:
    """Where a finished run put its files, its history and the epoch it kept."""

    run: str
    model: str
    history: list[dict]
    best_epoch: int
    stopped_early: bool
    table: str  # data.parquet: every image and whether it was trained on
    images: int
    flagged: int
    failed_ids: tuple[str, ...]  # the images that could not be read, in id order
    first_epoch: int = 1  # the first epoch trained by this run (after a resumed checkpoint's)
    quality: dict | None = None  # quality control on the validation split (recipe.quality_check)

    @property
    def failed(self) -> int:
        return len(self.failed_ids)

    @property
    def trained(self) -> int:
        """Epochs this run trained: a resumed run's earlier ones are not among them."""
        return len(self.history) - self.first_epoch + 1


@dataclass(frozen=True)
class TrainingData:
    """What a trainer trains on: the catalog, its labelled cases split into ``train`` and
    ``val``, and a ``data.parquet`` row for each image in neither (no mask, or not in the split
    file)."""

    found: catalog.Catalog
    parts: dict[str, tuple[catalog.Case, ...]]
    left_out: tuple[dict, ...]

    def split_sha256(self) -> str:
        ids = {name: sorted(case.id for case in cases) for name, cases in self.parts.items()}
        return hashlib.sha256(json.dumps(ids, sort_keys=True).encode()).hexdigest()


def read_data(config: TrainConfig, store: Store) -> TrainingData:
    """The catalog under ``config.data`` and its split (:class:`TrainingData`)."""
    found = catalog.find_cases(config.data, config.masks, store)
    logger.info("catalog: %s", found.summary())
    labelled = catalog.Catalog(found.labelled, ())
    if config.split:
        subsets = catalog.read_split(config.split, store)
        missing = {"train", "val"} - set(subsets)
        if missing:
            raise UserError(f"{config.split} has no {' or '.join(sorted(missing))} list of ids")
        parts = {name: labelled.select(subsets[name]) for name in ("train", "val")}
    else:
        ids = catalog.split_ids([c.id for c in labelled.cases], config.val_fraction)
        parts = dict(zip(("train", "val"), map(labelled.select, ids), strict=True))
    if not parts["train"]:
        raise UserError(f"no labelled images to train on under {config.data}")
    chosen = {case.id for cases in parts.values() for case in cases}
    left_out = tuple(
        {
            "id": case.id,
            "source": case.image,
            "status": FLAGGED,
            "error": "not in the --split file" if case.masks else "no lung mask: not trained on",
        }
        for case in found.cases
        if case.id not in chosen
    )
    return TrainingData(found, parts, left_out)


def write_data_table(
    claim: outputs.Claim, data: TrainingData, rows: list[dict], workers: int
) -> Counter[str]:
    """``data.parquet`` (a row per image: split, status, error; ``rows`` those of the images
    read, with their split), then the check that enough pairs are readable: one per worker, and
    one to validate on when the split has validation ids; too few is a UserError naming the
    failed pairs. The counts by status."""
    rows = [*data.left_out, *rows]
    uri = claim.uri(DATA_FILE)
    statuses = table.write_table((), uri, DATA_SCHEMA, data.found.cases, claim.store, known=rows)
    claim.record(DATA_FILE)
    usable = Counter(row.get("split") for row in rows if row["status"] == OK)
    failed = [row for row in rows if row["status"] == ERROR]
    for row in failed:
        logger.warning("skipped %s (%s): %s", row["id"], row["source"], row["error"])
    if usable["train"] < workers or (data.parts["val"] and not usable["val"]):
        named = "; ".join(f"{r['id']}: {r['error']}" for r in failed[:_FAILED_SHOWN])
        more = ", ..." if len(failed) > _FAILED_SHOWN else ""
        raise UserError(
            f"too few readable image/mask pairs: {usable['train']} to train on (at least "
            f"{workers}, one per worker) and {usable['val']} to validate on (at least 1 "
            f"when the split has validation ids); {len(failed)} failed: {named}{more} "
            f"(every image is listed in {uri})"
        )
    logger.info("split: %d train, %d validation images", usable["train"], usable["val"])
    return statuses


def finish_run(
    config: TrainConfig,
    claim: outputs.Claim,
    model: bytes,
    history: list[dict],
    rows: list[dict],
    trainer: str,
    statuses: Counter[str],
    quality: dict | None,
    first_epoch: int = 1,
) -> TrainResult:
    """Write the run folder's files (:func:`recipe.run_files`, with the provenance of the
    model) and ``config.json`` into the claimed run folder; the run's result. ``rows`` are
    the images read, with their split; ``quality`` how well the model's quality control did on
    the validation split (:func:`recipe.quality_check`); ``first_epoch`` the first epoch this
    run trained."""
    split = {
        name: [r["id"] for r in rows if r.get("split") == name and r["status"] == OK]
        for name in ("train", "val")
    }
    found = describe(model)
    if found.calibration is None:
        logger.warning(
            "the model has no quality-control calibration (%s): segment will score its masks "
            "with the bundled model's",
            found.calibration_missing,
        )
    elif quality is None:
        logger.warning(
            "the model's quality control could not be checked: no validation image with a "
            "lung in its mask"
        )
    record = recipe.provenance(config.recipe, split, history, found, trainer, config.data, quality)
    for name, content in recipe.run_files(model, history, record).items():
        claim.write(name, content)
    claim.write(CONFIG_FILE, json.dumps(config.to_dict(), indent=2).encode())
    return TrainResult(
        run=config.output,
        model=claim.uri(MODEL_FILE),
        history=history,
        best_epoch=recipe.best_epoch(history),
        stopped_early=len(history) < config.recipe.epochs,
        table=claim.uri(DATA_FILE),
        images=sum(statuses.values()),
        flagged=statuses[FLAGGED],
        failed_ids=tuple(sorted(r["id"] for r in rows if r["status"] == ERROR)),
        first_epoch=first_epoch,
        quality=quality,
    )


Trainer = Callable[[TrainingData, outputs.Claim], TrainResult]
"""Trains on what :func:`read_data` found into the claimed run folder."""


def train_in_folder(
    config: TrainConfig,
    store: Store,
    trainer: Trainer,
    resumes: bool = True,
    start_ray: Callable[[], None] = lambda: None,
) -> TrainResult:
    """Read the data, then ``start_ray``, then hold the run folder (:func:`_claim`) while
    ``trainer`` trains into it, and complete the run. A trainer that does not resume
    (``resumes``) trains an unfinished run anew, saying so."""
    data = read_data(config, store)
    start_ray()
    with _claim(config, store, data) as claim:
        if claim.resumed and not resumes:
            logger.warning("a single-process run does not resume: training %s anew", config.output)
        result = trainer(data, claim)
        counts = outputs.outcome(result.images, result.flagged, result.failed_ids)
        claim.finish(epochs=len(result.history), selected_epoch=result.best_epoch, **counts)
    return result


def _claim(config: TrainConfig, store: Store, data: TrainingData):
    """Hold the run folder for this run (:func:`lungseg.runs.outputs.claimed`): a folder that holds
    a run of other data, split, model shape or recipe is refused (``--epochs`` and
    ``--patience`` may change: they say how long to go on); the same run is continued."""
    recipe_settings = asdict(config.recipe)
    for how_long in ("epochs", "patience"):
        del recipe_settings[how_long]
    settings = {
        "data": config.data,
        "masks": config.masks,
        "split_sha256": data.split_sha256(),
        "recipe": recipe_settings,
    }
    return outputs.claimed(
        store,
        config.output,
        TRAIN,
        "train",
        settings,
        reads={"--data": config.data, "--masks": config.masks, "--split": config.split},
        resume=True,
        overwrite=config.overwrite,
    )
