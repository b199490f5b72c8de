"""The ``lungseg`` console script: one subcommand per job, each calling one typed function.

``jobs/<name>.py`` hands its arguments to :func:`main`, so ``python jobs/train.py`` and
``lungseg train`` share this one parser.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from urllib.parse import urlparse

from lungseg import __version__
from lungseg.config import (
    BUNDLED_MODEL,
    BUNDLED_SPLIT,
    DEFAULT_CLEAN_OUTPUT,
    DEFAULT_EVALUATE_OUTPUT,
    DEFAULT_RUN,
    DEFAULT_SEGMENT_OUTPUT,
    INVERT_RULES,
    PRECISIONS,
    PREPROCESS_BATCH,
    SAMPLE,
    BenchmarkConfig,
    CleanConfig,
    CleanParams,
    ModelConfig,
    ReportConfig,
    ResourceConfig,
    SegmentConfig,
    TrainConfig,
)


def _endpoint(url: str) -> str:
    """An ``--s3-endpoint`` URL, refused (without echoing it) when it carries credentials."""
    if "@" in urlparse(url).netloc:
        raise argparse.ArgumentTypeError(
            "the URL must not hold credentials (user:secret@host), which would land in logs and "
            "config.json: give them through the AWS chain (AWS_ACCESS_KEY_ID, profiles, roles)"
        )
    return url


def _add_resources(parser: argparse.ArgumentParser, gpu: bool = True) -> None:
    group = parser.add_argument_group("resources")
    group.add_argument(
        "--preprocess-actors", type=int, default=2, help="OpenCV preprocessing actors (default 2)"
    )
    group.add_argument(
        "--actor-cpus",
        type=float,
        default=None,
        help="CPUs per preprocessing actor (default: half the cluster's CPUs shared among them)",
    )
    if gpu:
        group.add_argument("--gpu", action="store_true", help="train / segment on GPUs")
    group.add_argument(
        "--s3-endpoint",
        default=None,
        type=_endpoint,
        help="endpoint URL of an S3-compatible store (default: AWS_ENDPOINT_URL or AWS)",
    )


def _resources(args: argparse.Namespace) -> ResourceConfig:
    return ResourceConfig(
        preprocess_actors=args.preprocess_actors, actor_cpus=args.actor_cpus, use_gpu=args.gpu
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lungseg", description="Lung-field segmentation of chest X-rays on Ray."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="train a U-Net on labelled X-rays with Ray Train",
        description="Train a U-Net on X-rays with lung masks (data-parallel, Ray Train). "
        "Rerunning with the same --output resumes from its last checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    train.add_argument(
        "--data", default=SAMPLE, help="root with X-rays and masks in any supported layout"
    )
    train.add_argument("--masks", default=None, help="separate root of the masks, if any")
    train.add_argument(
        "--output", default=DEFAULT_RUN, help="run folder: checkpoints, model.keras, metrics.csv"
    )
    train.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    train.add_argument(
        "--worker-cpus",
        type=float,
        default=None,
        help="CPUs per train worker (default: half the cluster's CPUs shared among workers)",
    )
    train.add_argument("--epochs", type=int, default=40, help="epochs to train in all")
    train.add_argument("--batch-size", type=int, default=2, help="images per worker per step")
    train.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate")
    train.add_argument(
        "--val-fraction", type=float, default=0.2, help="share of ids held out (split by id hash)"
    )
    train.add_argument(
        "--split",
        default=None,
        help=f"JSON file with 'train' and 'val' id lists, instead of --val-fraction (the bundled "
        f"model's: {BUNDLED_SPLIT})",
    )
    train.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        help="train without random rotation, scaling, shifts, brightness, contrast and gamma",
    )
    train.add_argument(
        "--patience",
        type=int,
        default=20,
        help="stop after this many epochs without a better validation Dice (0: never); "
        "the run's model.keras is the best epoch's",
    )
    train.add_argument("--seed", type=int, default=0, help="seed of weights and shuffling")
    train.add_argument("--size", type=int, default=256, help="model input size in pixels")
    train.add_argument("--base-filters", type=int, default=16, help="filters of the first level")
    train.add_argument("--depth", type=int, default=4, help="U-Net poolings")
    train.add_argument(
        "--allow-local-output",
        action="store_true",
        help="accept a local --output on a multi-node cluster (a path every node mounts, e.g. NFS)",
    )
    _add_resources(train)

    segment = commands.add_parser(
        "segment",
        help="segment a folder or bucket of X-rays into masks + a Parquet table",
        description="Segment X-rays: a mask PNG per image at its own size under OUTPUT/masks/, "
        "one row per image in OUTPUT/segmentation.parquet (Dice/IoU where masks are given).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_segment_arguments(segment, DEFAULT_SEGMENT_OUTPUT)
    _add_resources(segment)

    evaluate = commands.add_parser(
        "evaluate",
        help="score a model on labelled X-rays: the segment outputs plus summary.json",
        description="Segment labelled X-rays and write, besides OUTPUT/masks/ and "
        "OUTPUT/segmentation.parquet, OUTPUT/summary.json: mean/median/min Dice and IoU "
        "overall and per dataset (the id's prefix, e.g. MCUCXR, CHNCXR) and the worst ids.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_segment_arguments(evaluate, DEFAULT_EVALUATE_OUTPUT)
    evaluate.add_argument(
        "--split",
        default=None,
        help=f"JSON file of id lists: evaluate only those of --subset (the bundled model's "
        f"split: {BUNDLED_SPLIT})",
    )
    evaluate.add_argument(
        "--subset", default="val", help="which list of the --split file to evaluate"
    )
    _add_resources(evaluate)

    export = commands.add_parser(
        "export",
        help="export a .keras model as a TensorFlow SavedModel for serving",
        description="Write a TensorFlow SavedModel (signature 'serve': float32 X-rays "
        "(batch, size, size, 1) in [0, 255] -> lung probabilities) of a .keras model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    export.add_argument("--model", default=BUNDLED_MODEL, help=".keras model to export")
    export.add_argument("--output", required=True, help="folder of the SavedModel (path or s3://)")
    export.add_argument(
        "--s3-endpoint", default=None, type=_endpoint, help="endpoint URL of an S3-compatible store"
    )
    _add_clean(commands)
    _add_report(commands)
    _add_benchmark(commands)
    return parser


def _add_segment_arguments(parser: argparse.ArgumentParser, output: str) -> None:
    parser.add_argument(
        "--model",
        default=BUNDLED_MODEL,
        help=".keras model (default: the bundled pretrained U-Net)",
    )
    parser.add_argument(
        "--input",
        default=None,
        help=f"X-rays to segment (default: the packaged sample, {SAMPLE}/images, with its masks)",
    )
    parser.add_argument("--masks", default=None, help="ground-truth masks, for Dice and IoU")
    parser.add_argument("--output", default=output, help="output root")
    parser.add_argument("--batch-size", type=int, default=8, help="images per model call")
    parser.add_argument("--threshold", type=float, default=0.5, help="lung probability cut")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float32",
        help="what the model computes in: bfloat16 runs on the bf16 units of recent CPUs (AMX) "
        "and GPUs, float16 on GPU tensor cores; masks then differ slightly from float32's",
    )
    parser.add_argument("--segment-actors", type=int, default=1, help="model-serving actors")
    parser.add_argument(
        "--overlays",
        action="store_true",
        help="also write OUTPUT/overlays/<id>.png: the X-ray (longest side 512) with the "
        "predicted outline and, where a ground truth exists, agreement colours",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the images that an earlier (e.g. interrupted) run with the same options "
        "already wrote to OUTPUT, and segment only the rest",
    )


def _add_clean(commands: argparse._SubParsersAction) -> None:
    clean = commands.add_parser(
        "clean",
        help="clean unlabelled X-rays with OpenCV: Otsu masks, cleaned images, a Parquet table",
        description="Clean X-rays with OpenCV alone: OUTPUT/cleaned/<id>.png (the image masked "
        "by its Otsu foreground), OUTPUT/masks/<id>.png, one row per image in "
        "OUTPUT/cleaning.parquet and OUTPUT/contact_sheet.png of the first images.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    clean.add_argument(
        "--input",
        default=None,
        help=f"X-rays to clean, a folder or s3:// prefix; mask files in it are skipped "
        f"(default: the packaged sample, {SAMPLE}/images)",
    )
    clean.add_argument("--output", default=DEFAULT_CLEAN_OUTPUT, help="output root")
    clean.add_argument(
        "--sheet", type=int, default=8, help="images on the contact sheet, first by id (0: none)"
    )
    clean.add_argument(
        "--batch-size", type=int, default=PREPROCESS_BATCH, help="most images per actor call"
    )
    p = CleanParams()
    steps = clean.add_argument_group("cleaning steps")
    steps.add_argument("--size", type=int, default=p.size, help="output side in pixels")
    steps.add_argument(
        "--blur-kernel", type=int, default=p.blur_kernel, help="odd Gaussian kernel side (1: off)"
    )
    steps.add_argument(
        "--blur-sigma", type=float, default=p.blur_sigma, help="Gaussian sigma (0: from kernel)"
    )
    steps.add_argument("--clahe", action="store_true", help="equalise contrast with CLAHE first")
    steps.add_argument("--clahe-clip", type=float, default=p.clahe_clip, help="CLAHE clip limit")
    steps.add_argument("--clahe-tile", type=int, default=p.clahe_tile, help="CLAHE tiles per side")
    steps.add_argument(
        "--open-kernel",
        type=int,
        default=p.open_kernel,
        help="opening ellipse side, removes specks (0: off)",
    )
    steps.add_argument(
        "--close-kernel",
        type=int,
        default=p.close_kernel,
        help="closing ellipse side, fills small gaps (0: off)",
    )
    steps.add_argument(
        "--invert",
        choices=INVERT_RULES,
        default=p.invert,
        help="invert the Otsu mask: 'border' when most of its 1-pixel border ring is foreground",
    )
    _add_resources(clean, gpu=False)


def _add_report(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser(
        "report",
        help="an HTML report of a segment job's output: summary, histogram, worst/best, table",
        description="Write OUTPUT/report.html and its pictures in OUTPUT/report/ from "
        "OUTPUT/segmentation.parquet: summary numbers, a Dice histogram, contact sheets of the "
        "worst and best images and a sortable table of every image. No Ray, no server.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    report.add_argument(
        "output", nargs="?", default=DEFAULT_SEGMENT_OUTPUT, help="a segment job's output root"
    )
    report.add_argument(
        "--run", default=None, help="training run folder: adds the curves of its metrics.csv"
    )
    report.add_argument(
        "--sheet", type=int, default=8, help="images on each of the worst and best sheets"
    )
    report.add_argument(
        "--s3-endpoint",
        default=None,
        type=_endpoint,
        help="endpoint URL of an S3-compatible store (default: AWS_ENDPOINT_URL or AWS)",
    )


def _clean_config(args: argparse.Namespace) -> CleanConfig:
    try:
        return CleanConfig(
            input=f"{SAMPLE}/images" if args.input is None else args.input,
            output=args.output,
            params=CleanParams(
                size=args.size,
                blur_kernel=args.blur_kernel,
                blur_sigma=args.blur_sigma,
                clahe=args.clahe,
                clahe_clip=args.clahe_clip,
                clahe_tile=args.clahe_tile,
                open_kernel=args.open_kernel,
                close_kernel=args.close_kernel,
                invert=args.invert,
            ),
            sheet=args.sheet,
            batch_size=args.batch_size,
            resources=ResourceConfig(
                preprocess_actors=args.preprocess_actors, actor_cpus=args.actor_cpus
            ),
            s3_endpoint=args.s3_endpoint,
        )
    except ValueError as exc:  # an impossible setting, e.g. an even kernel
        sys.exit(f"lungseg clean: error: {exc}")


def _config(
    args: argparse.Namespace,
) -> TrainConfig | SegmentConfig | CleanConfig | ReportConfig:
    if args.command == "clean":
        return _clean_config(args)
    if args.command == "report":
        try:
            return ReportConfig(
                output=args.output, run=args.run, sheet=args.sheet, s3_endpoint=args.s3_endpoint
            )
        except ValueError as exc:  # a negative --sheet
            sys.exit(f"lungseg report: error: {exc}")
    if args.command == "train":
        return TrainConfig(
            data=args.data,
            masks=args.masks,
            output=args.output,
            workers=args.workers,
            worker_cpus=args.worker_cpus,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            val_fraction=args.val_fraction,
            split=args.split,
            augment=args.augment,
            patience=args.patience,
            seed=args.seed,
            model=ModelConfig(size=args.size, base_filters=args.base_filters, depth=args.depth),
            resources=_resources(args),
            s3_endpoint=args.s3_endpoint,
            allow_local_output=args.allow_local_output,
        )
    sample = args.input is None
    return SegmentConfig(
        model=args.model,
        input=f"{SAMPLE}/images" if sample else args.input,
        masks=f"{SAMPLE}/masks" if sample and args.masks is None else args.masks,
        output=args.output,
        batch_size=args.batch_size,
        threshold=args.threshold,
        segment_actors=args.segment_actors,
        resources=_resources(args),
        s3_endpoint=args.s3_endpoint,
        overlays=args.overlays,
        resume=args.resume,
        precision=args.precision,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, start or attach to Ray, run the job, print where its results went."""
    args = build_parser().parse_args(argv)
    if args.command == "export":  # TensorFlow only: no Ray
        from lungseg.export import export_saved_model

        print(f"SavedModel: {export_saved_model(args.model, args.output, args.s3_endpoint)}")
        return 0
    if args.command == "benchmark":
        return _benchmark(args)
    config = _config(args)
    if isinstance(config, ReportConfig):  # pictures and HTML only: no Ray
        from lungseg.report import run_report

        report = run_report(config)
        print(f"report of {report.images} images ({report.failed} failed): {report.html}")
        return 0
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import ray

    ray.init()  # attaches to a cluster when RAY_ADDRESS is set (ray job submit), else local
    if isinstance(config, TrainConfig):
        from lungseg.train import run_training

        result = run_training(config)
        print(f"data: {result.images} images ({result.flagged} flagged, {result.failed} failed)")
        print(f"model: {result.model}  table: {result.table}")
        print("last epoch: " + ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items()))
        return 1 if result.failed else 0
    if isinstance(config, CleanConfig):
        from lungseg.clean import run_cleaning

        cleaned = run_cleaning(config)
        print(
            f"cleaned {cleaned.images} images ({cleaned.flagged} flagged, {cleaned.failed} failed)"
        )
        print(f"outputs: {cleaned.output}/cleaned/, masks/  table: {cleaned.table}")
        if cleaned.sheet:
            print(f"contact sheet: {cleaned.sheet}")
        return 1 if cleaned.failed else 0
    if args.command == "evaluate":
        from lungseg.evaluate import run_evaluation

        summary = run_evaluation(config, args.split, args.subset)
        for name, stats in {"all": summary["overall"], **summary["datasets"]}.items():
            dice, iou = stats["dice"] or {}, stats["iou"] or {}
            print(
                f"{name:8s} images {stats['images']:4d} scored {stats['scored']:4d}  "
                f"Dice mean {dice.get('mean', float('nan')):.4f} "
                f"median {dice.get('median', float('nan')):.4f} "
                f"min {dice.get('min', float('nan')):.4f}  "
                f"IoU mean {iou.get('mean', float('nan')):.4f}"
            )
        print(
            f"summary: {config.output}/summary.json  failed: {len(summary['failed'])}  "
            f"unscored: {len(summary['unscored'])}"
        )
        return 1 if summary["failed"] else 0
    from lungseg.segment import run_segmentation

    result = run_segmentation(config)
    dice = "n/a" if result.mean_dice is None else f"{result.mean_dice:.4f}"
    print(
        f"segmented {result.images} images ({result.flagged} flagged, {result.failed} failed), "
        f"mean Dice {dice}"
    )
    print(f"masks: {result.output}/masks/  table: {result.table}")
    if config.overlays:
        print(f"overlays: {result.output}/overlays/")
    return 1 if result.failed else 0


def _add_benchmark(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "benchmark",
        help="measure each Ray stage against the plain loop a user would write, side by side",
        description="On copies of real X-rays, in one run: preprocessing and inference on Ray "
        "against a plain single-process loop (images/s), a training epoch on Ray Train against "
        "model.fit (s), and the peak memory of the Ray session segmenting a small vs a large "
        "set. Prints a table, writes OUTPUT/benchmark.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = BenchmarkConfig()
    bench.add_argument(
        "--input", default=d.input, help="local root of X-rays to copy (its masks: training row)"
    )
    bench.add_argument("--output", default=d.output, help="folder of benchmark.json")
    bench.add_argument("--model", default=d.model, help=".keras model of the inference rows")
    bench.add_argument(
        "--images", type=int, default=d.images, help="images of preprocessing and inference"
    )
    bench.add_argument(
        "--memory-images",
        type=lambda text: tuple(int(n) for n in text.split(",")),
        default=",".join(map(str, d.memory_images)),
        help="the small and the large set of the memory row",
    )
    bench.add_argument(
        "--train-images", type=int, default=d.train_images, help="images of the training epoch"
    )
    bench.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    bench.add_argument("--rounds", type=int, default=d.rounds, help="runs of each side (best)")
    bench.add_argument(
        "--stages",
        type=lambda text: tuple(text.split(",")),
        default=",".join(d.stages),
        help="comma-separated rows to measure",
    )
    bench.add_argument("--gpu", action="store_true", help="segment on a GPU (inference rows)")


def _benchmark(args: argparse.Namespace) -> int:
    try:
        config = BenchmarkConfig(
            input=args.input,
            output=args.output,
            model=args.model,
            images=args.images,
            memory_images=args.memory_images,
            train_images=args.train_images,
            batch_size=args.batch_size,
            rounds=args.rounds,
            stages=args.stages,
            use_gpu=args.gpu,
        )
    except ValueError as exc:
        sys.exit(f"lungseg benchmark: error: {exc}")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import ray

    from lungseg.benchmark import format_table, run_benchmark

    ray.init()  # local: the memory row measures the processes this driver starts
    result = run_benchmark(config)
    print(format_table(result))
    print(f"results: {result.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
