"""The ``lungseg`` console script: one subcommand per job, each calling one typed function.

``jobs/<name>.py`` hands its arguments to :func:`main`, so ``python jobs/train.py`` and
``lungseg train`` share this one parser. Every default comes from the job's config dataclass;
every value is checked (by the dataclass) before any work starts.

Exit statuses: :data:`EXIT_OK` all done, :data:`EXIT_CRASHED` crashed, :data:`EXIT_USAGE` a
mistake in the command or its inputs (one line on stderr, no traceback unless ``--debug``),
:data:`EXIT_IMAGES_FAILED` finished, but some images failed (their rows say why).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable, Sequence

from lungseg import __version__, console
from lungseg.config import (
    AUTO,
    BUNDLED_SPLIT,
    INVERT_RULES,
    PRECISIONS,
    SAMPLE,
    BenchmarkConfig,
    CleanConfig,
    CleanParams,
    ModelConfig,
    RecipeConfig,
    ReportConfig,
    ResourceConfig,
    SegmentConfig,
    TrainConfig,
)
from lungseg.errors import UserError
from lungseg.storage import Store

EXIT_OK, EXIT_CRASHED, EXIT_USAGE, EXIT_IMAGES_FAILED = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line: ``lungseg <job>: error: ...`` (status 2)."""

    def error(self, message: str) -> None:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (--help lists the options)\n")


def _console_options() -> argparse.ArgumentParser:
    options = _Parser(add_help=False)
    group = options.add_argument_group("console")
    level = group.add_mutually_exclusive_group()
    level.add_argument(
        "-v", "--verbose", action="store_true", help="also show Ray's and TensorFlow's own output"
    )
    level.add_argument(
        "-q", "--quiet", action="store_true", help="show only the summary and errors"
    )
    group.add_argument(
        "--debug", action="store_true", help="show the traceback of an error or a crash"
    )
    return options


def _add_resources(parser: argparse.ArgumentParser, gpu: bool = True) -> None:
    d = ResourceConfig()
    group = parser.add_argument_group("resources")
    group.add_argument(
        "--preprocess-actors",
        type=int,
        default=d.preprocess_actors,
        help="OpenCV actors (default: a pool that grows to the spare CPUs)",
    )
    group.add_argument(
        "--actor-cpus",
        type=float,
        default=d.actor_cpus,
        help="CPUs per preprocessing actor (default: 0.4 up to 4 CPUs, else 1)",
    )
    if gpu:
        group.add_argument("--gpu", action="store_true", help="train / segment on GPUs")
    _add_endpoint(group)


def _add_endpoint(parser) -> None:
    parser.add_argument(
        "--s3-endpoint",
        default=None,
        help="endpoint URL of an S3-compatible store, http(s)://host:port (default: "
        "AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else AWS); never with credentials in it",
    )


def _resources(args: argparse.Namespace) -> ResourceConfig:
    return ResourceConfig(
        preprocess_actors=args.preprocess_actors,
        actor_cpus=args.actor_cpus,
        use_gpu=getattr(args, "gpu", False),
    )


def _add_train(commands, parents) -> None:
    train = commands.add_parser(
        "train",
        parents=parents,
        help="train a U-Net on labelled X-rays with Ray Train",
        description="Train a U-Net on X-rays with lung masks (data-parallel, Ray Train). "
        "Rerunning with the same --output resumes from its last checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d, r, m = TrainConfig(), RecipeConfig(), ModelConfig()
    train.add_argument("--data", default=d.data, help="root of X-rays and masks, any layout")
    train.add_argument("--masks", default=d.masks, help="separate root of the masks, if any")
    train.add_argument(
        "--output", default=d.output, help="run folder: checkpoints, model.keras, metrics.csv"
    )
    train.add_argument("--workers", type=int, default=d.workers, help="Ray Train workers")
    train.add_argument(
        "--worker-cpus",
        type=float,
        default=d.worker_cpus,
        help="CPUs per train worker (default: half the cluster's CPUs shared among workers)",
    )
    train.add_argument(
        "--val-fraction", type=float, default=d.val_fraction, help="share of ids held out"
    )
    train.add_argument(
        "--split",
        default=d.split,
        help=f"JSON file with 'train' and 'val' id lists, instead of --val-fraction (the bundled "
        f"model's: {BUNDLED_SPLIT})",
    )
    recipe = train.add_argument_group("recipe")
    recipe.add_argument("--epochs", type=int, default=r.epochs, help="epochs to train in all")
    recipe.add_argument(
        "--batch-size",
        type=int,
        default=r.batch_size,
        help="images per training step, split evenly among the workers",
    )
    recipe.add_argument(
        "--learning-rate", type=float, default=r.learning_rate, help="Adam's starting rate"
    )
    recipe.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        help="train without random rotation, scaling, shifts, brightness, contrast and gamma",
    )
    recipe.add_argument(
        "--patience",
        type=int,
        default=r.patience,
        help="stop after this many epochs without a better validation Dice (0: never); "
        "the run's model.keras is the best epoch's",
    )
    recipe.add_argument("--seed", type=int, default=r.seed, help="seed of weights and shuffling")
    recipe.add_argument("--size", type=int, default=m.size, help="model input size in pixels")
    recipe.add_argument(
        "--base-filters", type=int, default=m.base_filters, help="filters of the first level"
    )
    recipe.add_argument("--depth", type=int, default=m.depth, help="U-Net poolings")
    train.add_argument(
        "--allow-local-output",
        action="store_true",
        help="accept a local --output on a multi-node cluster (a path every node mounts, e.g. NFS)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --output (a rerun with the same data, split and recipe goes "
        "on with it; one with others is refused unless this is given)",
    )
    train.add_argument(
        "--single-process",
        action="store_true",
        help="train in this process without Ray (Keras on its own backend and devices): the "
        "same recipe and run folder, no checkpoints to resume from",
    )
    _add_resources(train)


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        data=args.data,
        masks=args.masks,
        output=args.output,
        workers=args.workers,
        worker_cpus=args.worker_cpus,
        val_fraction=args.val_fraction,
        split=args.split,
        recipe=RecipeConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            augment=args.augment,
            patience=args.patience,
            seed=args.seed,
            model=ModelConfig(size=args.size, base_filters=args.base_filters, depth=args.depth),
        ),
        resources=_resources(args),
        s3_endpoint=args.s3_endpoint,
        allow_local_output=args.allow_local_output,
        single_process=args.single_process,
        overwrite=args.overwrite,
    )


def _add_segment_arguments(parser: argparse.ArgumentParser, output: str) -> None:
    d = SegmentConfig()
    parser.add_argument("--model", default=d.model, help=".keras model (default: the bundled one)")
    parser.add_argument(
        "--input",
        default=None,
        help=f"X-rays to segment (default: the packaged sample, {SAMPLE}/images, with its masks)",
    )
    parser.add_argument("--masks", default=d.masks, help="ground-truth masks, for Dice and IoU")
    parser.add_argument("--output", default=output, help="output root")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="images per call")
    parser.add_argument("--threshold", type=float, default=d.threshold, help="lung probability cut")
    parser.add_argument(
        "--precision",
        choices=(AUTO, *PRECISIONS),
        default=d.precision,
        help="what the model computes in: auto is bfloat16 on GPUs and on CPUs with bf16 units "
        "(AVX-512 BF16, AMX), else float32; float16 is for GPU tensor cores",
    )
    parser.add_argument(
        "--segment-actors",
        type=int,
        default=d.segment_actors,
        help="model actors (default: one per GPU with --gpu, else one per 8 CPUs)",
    )
    parser.add_argument(
        "--overlays",
        action="store_true",
        help="also write OUTPUT/overlays/<id>.png: the X-ray (longest side 512) with the "
        "predicted outline and, where a ground truth exists, agreement colours",
    )
    rerun = parser.add_mutually_exclusive_group()
    rerun.add_argument(
        "--resume",
        action="store_true",
        help="go on with the earlier (e.g. interrupted) run in OUTPUT: keep the images it "
        "already did, segment the rest; refused if the earlier run had other settings",
    )
    rerun.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the earlier run in OUTPUT: the files its ledger lists are removed first",
    )
    _add_resources(parser)


def _segment_config(args: argparse.Namespace) -> SegmentConfig:
    sample = args.input is None
    return SegmentConfig(
        model=args.model,
        input=SegmentConfig().input if sample else args.input,
        masks=f"{SAMPLE}/masks" if sample and args.masks is None else args.masks,
        output=args.output,
        batch_size=args.batch_size,
        threshold=args.threshold,
        segment_actors=args.segment_actors,
        resources=_resources(args),
        s3_endpoint=args.s3_endpoint,
        overlays=args.overlays,
        resume=args.resume,
        overwrite=args.overwrite,
        precision=args.precision,
    )


def _add_clean(commands, parents) -> None:
    clean = commands.add_parser(
        "clean",
        parents=parents,
        help="clean unlabelled X-rays with OpenCV: Otsu masks, cleaned images, a Parquet table",
        description="Clean X-rays with OpenCV alone: OUTPUT/cleaned/<id>.png (the image masked "
        "by its Otsu foreground), OUTPUT/masks/<id>.png, one row per image in "
        "OUTPUT/cleaning.parquet and OUTPUT/contact_sheet.png of the first images.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d, p = CleanConfig(), CleanParams()
    clean.add_argument(
        "--input",
        default=d.input,
        help="X-rays to clean, a folder or s3:// prefix; mask files in it are skipped "
        "(default: the packaged sample)",
    )
    clean.add_argument("--output", default=d.output, help="output root")
    clean.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the earlier run in OUTPUT: its outputs are removed first",
    )
    clean.add_argument(
        "--sheet", type=int, default=d.sheet, help="images on the contact sheet, first by id"
    )
    clean.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="most images per actor call"
    )
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
        "--open-kernel", type=int, default=p.open_kernel, help="opening ellipse side (0: off)"
    )
    steps.add_argument(
        "--close-kernel", type=int, default=p.close_kernel, help="closing ellipse side (0: off)"
    )
    steps.add_argument(
        "--invert",
        choices=INVERT_RULES,
        default=p.invert,
        help="invert the Otsu mask: 'border' when most of its 1-pixel border ring is foreground",
    )
    _add_resources(clean, gpu=False)


def _clean_config(args: argparse.Namespace) -> CleanConfig:
    return CleanConfig(
        input=args.input,
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
        resources=_resources(args),
        s3_endpoint=args.s3_endpoint,
        overwrite=args.overwrite,
    )


def _add_report(commands, parents) -> None:
    report = commands.add_parser(
        "report",
        parents=parents,
        help="an HTML report of a segment job's output: summary, histogram, worst/best, table",
        description="Write OUTPUT/report.html and its pictures in OUTPUT/report/ from "
        "OUTPUT/segmentation.parquet: summary numbers, a Dice histogram, contact sheets of the "
        "worst and best images and of those quality control sent to review, and a sortable "
        "table of every image. No Ray, no server.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = ReportConfig()
    report.add_argument("output", nargs="?", default=d.output, help="a segment job's output root")
    report.add_argument("--run", default=d.run, help="training run folder: adds its curves")
    report.add_argument(
        "--sheet", type=int, default=d.sheet, help="images on each of the worst and best sheets"
    )
    report.add_argument(
        "--review",
        type=int,
        default=d.review,
        help="most images on the sheet of those sent to review, lowest QC score first",
    )
    _add_endpoint(report)


def _add_benchmark(commands, parents) -> None:
    bench = commands.add_parser(
        "benchmark",
        parents=parents,
        help="measure each Ray stage against the plain loop a user would write, side by side",
        description="On copies of real X-rays, in one run: preprocessing and inference on Ray "
        "against a plain single-process loop (images/s), a training epoch on Ray Train against "
        "model.fit (s), and the peak memory of the Ray session segmenting a small vs a large "
        "set. Prints a table, writes OUTPUT/benchmark.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = BenchmarkConfig()
    bench.add_argument("--input", default=d.input, help="local root of X-rays to copy")
    bench.add_argument("--output", default=d.output, help="folder of benchmark.json")
    bench.add_argument("--model", default=d.model, help=".keras model of the inference rows")
    bench.add_argument("--films", type=int, default=d.films, help="hospital films")
    bench.add_argument(
        "--film-size", type=int, default=d.film_size, help="pixels a side of the hospital films"
    )
    bench.add_argument("--images", type=int, default=d.images, help="512 px films of inference")
    bench.add_argument(
        "--preprocess-images",
        type=int,
        default=d.preprocess_images,
        help="images of the preprocessing row",
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


def _benchmark_config(args: argparse.Namespace) -> BenchmarkConfig:
    return BenchmarkConfig(
        input=args.input,
        output=args.output,
        model=args.model,
        films=args.films,
        film_size=args.film_size,
        images=args.images,
        preprocess_images=args.preprocess_images,
        memory_images=args.memory_images,
        train_images=args.train_images,
        batch_size=args.batch_size,
        rounds=args.rounds,
        stages=args.stages,
        use_gpu=args.gpu,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lungseg", description="Lung-field segmentation of chest X-rays on Ray.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parents = [_console_options()]
    _add_train(commands, parents)
    segment = commands.add_parser(
        "segment",
        parents=parents,
        help="segment a folder or bucket of X-rays into masks + a Parquet table",
        description="Segment X-rays: a mask PNG per image at its own size under OUTPUT/masks/, "
        "one row per image in OUTPUT/segmentation.parquet (Dice/IoU where masks are given).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_segment_arguments(segment, SegmentConfig().output)
    evaluate = commands.add_parser(
        "evaluate",
        parents=parents,
        help="score a model on labelled X-rays: the segment outputs plus summary.json",
        description="Segment labelled X-rays and write, besides OUTPUT/masks/ and "
        "OUTPUT/segmentation.parquet, OUTPUT/summary.json: mean/median/min Dice and IoU "
        "overall and per dataset (the id's prefix, e.g. MCUCXR, CHNCXR) and the worst ids.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_segment_arguments(evaluate, "out/evaluate")
    evaluate.add_argument(
        "--split",
        default=None,
        help=f"JSON file of id lists: evaluate only those of --subset (the bundled model's "
        f"split: {BUNDLED_SPLIT})",
    )
    evaluate.add_argument("--subset", default="val", help="which list of the --split file")
    export = commands.add_parser(
        "export",
        parents=parents,
        help="export a .keras model as a TensorFlow SavedModel for serving",
        description="Write a TensorFlow SavedModel (signature 'serve': float32 X-rays "
        "(batch, size, size, 1) in [0, 255] -> lung probabilities) of a .keras model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    export.add_argument("--model", default=SegmentConfig().model, help=".keras model to export")
    export.add_argument("--output", required=True, help="folder of the SavedModel (path or s3://)")
    export.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the earlier export in OUTPUT: its files are removed first",
    )
    _add_endpoint(export)
    _add_clean(commands, parents)
    _add_report(commands, parents)
    _add_benchmark(commands, parents)
    return parser


def _config(args: argparse.Namespace):
    """The job's config from its arguments: a ConfigError (a UserError) on an impossible one."""
    makers: dict[str, Callable[[argparse.Namespace], object]] = {
        "train": _train_config,
        "segment": _segment_config,
        "evaluate": _segment_config,
        "clean": _clean_config,
        "report": lambda a: ReportConfig(
            output=a.output, run=a.run, sheet=a.sheet, review=a.review, s3_endpoint=a.s3_endpoint
        ),
        "benchmark": _benchmark_config,
        "export": lambda a: a,
    }
    return makers[args.command](args)


def _say(text: str) -> None:
    for line in text.splitlines():
        print(console.printable(line), flush=True)


def _train(config: TrainConfig, session: console.Session, args: argparse.Namespace) -> int:
    started = time.monotonic()
    if config.single_process:
        from lungseg.fit import run_fit

        result = run_fit(config, session.progress())
    else:
        from lungseg.train import run_training

        result = run_training(config, session.progress(), start_ray=session.start_ray)
    best = result.history[result.best_epoch - 1]
    _say(f"data: {result.images} images ({result.flagged} flagged, {result.failed} failed)")
    how = "stopped early" if result.stopped_early else "done"
    scores = ", ".join(
        f"{k} {best[k]:.4f}" for k in ("loss", "dice", "val_dice", "val_iou") if k in best
    )
    _say(
        f"trained {len(result.history)} epochs ({how}) in "
        f"{console.duration(time.monotonic() - started)}; kept epoch {result.best_epoch}: {scores}"
    )
    _say(f"model: {result.model}  table: {result.table}")
    return EXIT_IMAGES_FAILED if result.failed else EXIT_OK


def _evaluate(config: SegmentConfig, session: console.Session, args: argparse.Namespace) -> int:
    from lungseg.evaluate import run_evaluation

    summary = run_evaluation(
        config, args.split, args.subset, session.progress(), start_ray=session.start_ray
    )
    for name, stats in {"all": summary["overall"], **summary["datasets"]}.items():
        dice, iou = stats["dice"] or {}, stats["iou"] or {}
        _say(
            f"{name:8s} images {stats['images']:4d} scored {stats['scored']:4d}  "
            f"Dice mean {dice.get('mean', float('nan')):.4f} "
            f"median {dice.get('median', float('nan')):.4f} "
            f"min {dice.get('min', float('nan')):.4f}  "
            f"IoU mean {iou.get('mean', float('nan')):.4f}"
        )
    qc = summary["overall"]["quality_control"]
    if qc["scored"]:
        caught = f"{qc['poor_in_review']} of {qc['poor']}" if qc["poor"] else "none"
        _say(
            f"quality control: {qc['review']} of {qc['scored']} to review "
            f"({qc['review_share']:.1%}), Spearman(qc_score, Dice) "
            f"{qc['spearman_qc_score_dice'] or float('nan'):.3f}, "
            f"masks below Dice {qc['poor_dice_below']} in review: {caught}"
        )
    _say(
        f"summary: {config.output}/summary.json  failed: {len(summary['failed'])}  "
        f"unscored: {len(summary['unscored'])}"
    )
    return EXIT_IMAGES_FAILED if summary["failed"] else EXIT_OK


def _segment(config: SegmentConfig, session: console.Session, args: argparse.Namespace) -> int:
    from lungseg.segment import run_segmentation

    result = run_segmentation(config, session.progress(), start_ray=session.start_ray)
    dice = "n/a" if result.mean_dice is None else f"{result.mean_dice:.4f}"
    _say(
        f"segmented {result.images} images ({result.flagged} flagged, {result.failed} failed), "
        f"mean Dice {dice}"
    )
    _say(f"quality control: {result.review} of {result.images} masks to review (qc column)")
    _say(f"masks: {result.output}/masks/  table: {result.table}")
    if config.overlays:
        _say(f"overlays: {result.output}/overlays/")
    return EXIT_IMAGES_FAILED if result.failed else EXIT_OK


def _clean(config: CleanConfig, session: console.Session, args: argparse.Namespace) -> int:
    from lungseg.clean import run_cleaning

    cleaned = run_cleaning(config, session.progress(), start_ray=session.start_ray)
    _say(f"cleaned {cleaned.images} images ({cleaned.flagged} flagged, {cleaned.failed} failed)")
    _say(f"outputs: {cleaned.output}/cleaned/, masks/  table: {cleaned.table}")
    if cleaned.sheet:
        _say(f"contact sheet: {cleaned.sheet}")
    return EXIT_IMAGES_FAILED if cleaned.failed else EXIT_OK


def _report(config: ReportConfig, session: console.Session, args: argparse.Namespace) -> int:
    from lungseg.report import run_report  # pictures and HTML only: no Ray

    report = run_report(config)
    _say(f"report of {report.images} images ({report.failed} failed): {report.html}")
    return EXIT_OK


def _export(config: argparse.Namespace, session: console.Session, args: argparse.Namespace) -> int:
    from lungseg.export import export_saved_model  # TensorFlow only: no Ray

    output = export_saved_model(args.model, args.output, args.s3_endpoint, args.overwrite)
    _say(f"SavedModel: {output}")
    return EXIT_OK


def _benchmark(config: BenchmarkConfig, session: console.Session, args: argparse.Namespace) -> int:
    from lungseg.benchmark import format_table, run_benchmark

    session.start_ray()  # local: the memory row measures the processes this driver starts
    result = run_benchmark(config)
    _say(format_table(result))
    _say(f"results: {result.json}")
    return EXIT_OK


_JOBS: dict[str, Callable[..., int]] = {
    # each: (config, session, args) -> exit status
    "train": _train,
    "segment": _segment,
    "evaluate": _evaluate,
    "clean": _clean,
    "report": _report,
    "export": _export,
    "benchmark": _benchmark,
}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments; an unknown option is the job's error (``lungseg <job>: error: ...``)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        jobs = parser._subparsers._group_actions[0].choices
        jobs[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run the job, print its summary; map what went wrong to an exit status."""
    args = _parse(argv)
    level = console.QUIET if args.quiet else console.VERBOSE if args.verbose else console.NORMAL
    prog = f"lungseg {args.command}"
    with console.Session(level, args.command) as session:
        try:
            config = _config(args)
            Store.for_job(getattr(args, "s3_endpoint", None))  # checked before any work
            return _JOBS[args.command](config, session, args)
        except UserError as exc:
            if args.debug:
                traceback.print_exc()
            print(f"{prog}: error: {console.printable(str(exc))}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:
            if args.debug:
                traceback.print_exc()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            where = [] if args.debug else ["--debug shows the traceback"]
            where += [f"Ray's and TensorFlow's own output: {session.log}"] if session.log else []
            hint = f" ({'; '.join(where)})" if where else ""
            print(
                f"{prog}: crashed: {type(exc).__name__}: {console.printable(first)[:500]}{hint}",
                file=sys.stderr,
            )
            return EXIT_CRASHED


if __name__ == "__main__":
    sys.exit(main())
