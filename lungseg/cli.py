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
import dataclasses
import os
import sys
import time
import traceback
import typing
from collections.abc import Callable, Sequence

from lungseg import __version__, console
from lungseg.core.config import (
    BenchmarkConfig,
    CleanConfig,
    EvaluateConfig,
    ExportConfig,
    ReportConfig,
    SegmentConfig,
    TrainConfig,
)
from lungseg.core.errors import (
    EXIT_CRASHED,
    EXIT_IMAGES_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    UserError,
)
from lungseg.io.catalog import FEW, check_root, first_few
from lungseg.io.storage import Store


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


class _Help(argparse.HelpFormatter):
    """Each option's help with its default, said once: not where the help says it already,
    nor for flags (``--overlays``: off unless given) and options without one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or action.default in (None, True, False, argparse.SUPPRESS)
            or action.nargs == 0
        ):
            return text
        return f"{text} (default: %(default)s)"


def _shown(value: object) -> object:
    """A default as it is typed: tuples comma-separated."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


def _add_config(
    parser: argparse.ArgumentParser,
    cls: type,
    prefix: str = "",
    without: tuple[str, ...] = (),
    group=None,
) -> None:
    """Offer every field of the config dataclass ``cls`` as an option, from the field's
    metadata (:func:`lungseg.core.config.option`); a nested config's fields go into a group of their
    own (its parent's, deeper down). ``dest`` is the field's dotted path, for :func:`_build`."""
    target = group or parser
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        meta = item.metadata
        if not meta.get("cli", True) or item.name in without:
            continue
        dest, kind = f"{prefix}{item.name}", hints[item.name]
        if dataclasses.is_dataclass(kind):
            inner = group or parser.add_argument_group(meta.get("help") or item.name)
            _add_config(parser, kind, f"{dest}.", meta.get("without", ()), inner)
            continue
        default = item.default if item.default is not dataclasses.MISSING else None
        flag = meta.get("flag") or f"--{item.name.replace('_', '-')}"
        options: dict = {"help": meta.get("help"), "dest": dest}
        if kind is bool:
            options["action"] = "store_false" if default else "store_true"
        else:
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            options["type"] = meta.get("parse") or (base if base in (int, float) else str)
            options["choices"] = meta.get("choices")
            options["default"] = _shown(default)
            if not meta.get("choices"):
                options["metavar"] = item.name.upper()
        if meta.get("positional"):
            del options["dest"]
            target.add_argument(dest, nargs="?", **options)
        else:
            target.add_argument(flag, required=item.default is dataclasses.MISSING, **options)
        if kind is bool:
            parser.set_defaults(**{dest: default})


def _build(cls: type, args: argparse.Namespace, prefix: str = ""):
    """The config dataclass ``cls`` from the options :func:`_add_config` offered; fields that
    are not options keep their defaults. A ConfigError (a UserError) for an impossible one."""
    hints = typing.get_type_hints(cls)
    values = {}
    for item in dataclasses.fields(cls):
        dest = f"{prefix}{item.name}"
        if dataclasses.is_dataclass(hints[item.name]):
            values[item.name] = _build(hints[item.name], args, f"{dest}.")
        elif hasattr(args, dest):
            value = getattr(args, dest)
            parse = item.metadata.get("parse")
            values[item.name] = parse(value) if parse and isinstance(value, str) else value
    return cls(**values)


_CONFIGS: dict[str, tuple[type, str, str]] = {
    # job: (its config, one line for the job list, the description of its --help)
    "train": (
        TrainConfig,
        "train a U-Net on labelled X-rays with Ray Train",
        "Train a U-Net on X-rays with lung masks (data-parallel, Ray Train). Rerunning with "
        "the same --output resumes from its last checkpoint.",
    ),
    "segment": (
        SegmentConfig,
        "segment a folder or bucket of X-rays into masks + a Parquet table",
        "Segment X-rays: a mask PNG per image at its own size under OUTPUT/masks/, one row per "
        "image in OUTPUT/segmentation.parquet (Dice/IoU where masks are given).",
    ),
    "evaluate": (
        EvaluateConfig,
        "score a model on labelled X-rays: the segment outputs plus summary.json",
        "Segment labelled X-rays and write, besides OUTPUT/masks/ and "
        "OUTPUT/segmentation.parquet, OUTPUT/summary.json: mean/median/min Dice and IoU overall "
        "and per dataset (the id's prefix, e.g. MCUCXR, CHNCXR) and the worst ids.",
    ),
    "export": (
        ExportConfig,
        "export a .keras model as a TensorFlow SavedModel for serving",
        "Write a TensorFlow SavedModel (signature 'serve': float32 X-rays (batch, size, size, 1) "
        "in [0, 255] -> lung probabilities) of a .keras model.",
    ),
    "clean": (
        CleanConfig,
        "clean unlabelled X-rays with OpenCV: Otsu masks, cleaned images, a Parquet table",
        "Clean X-rays with OpenCV alone: OUTPUT/cleaned/<name>.png (the image masked by its "
        "Otsu foreground), OUTPUT/masks/<name>.png, one row per image in "
        "OUTPUT/cleaning.parquet and OUTPUT/contact_sheet.png of the first images.",
    ),
    "report": (
        ReportConfig,
        "an HTML report of a segment job's output: summary, histogram, worst/best, table",
        "Write OUTPUT/report.html and its pictures in OUTPUT/report/ from "
        "OUTPUT/segmentation.parquet: summary numbers, a Dice histogram, contact sheets of the "
        "worst and best images and of those quality control sent to review, and a sortable "
        "table of every image. No Ray, no server.",
    ),
    "benchmark": (
        BenchmarkConfig,
        "measure each Ray stage against the plain loop a user would write, side by side",
        "On copies of real X-rays, in one run: preprocessing and inference on Ray against a "
        "plain single-process loop (images/s), a training epoch on Ray Train against "
        "model.fit (s), and the peak memory of the Ray session segmenting a small vs a large "
        "set. Prints a table, writes OUTPUT/benchmark.json.",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lungseg", description="Lung-field segmentation of chest X-rays on Ray.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parents = [_console_options()]
    for job, (cls, summary, description) in _CONFIGS.items():
        sub = commands.add_parser(
            job, parents=parents, help=summary, description=description, formatter_class=_Help
        )
        _add_config(sub, cls)
    return parser


def _config(args: argparse.Namespace):
    """The job's config from its arguments: a ConfigError (a UserError) on an impossible one."""
    return _build(_CONFIGS[args.command][0], args)


_ROOTS = {"input": "images", "data": "images", "masks": "masks"}
"""The config fields that name a root a job reads, and what it holds (for its refusal)."""


def _preflight(config, store: Store) -> None:
    """The checks that need neither Ray nor TensorFlow, made before either is imported (seconds
    each): credentials for an S3 output, and the roots the job reads. A mistyped ``--input``
    is then one line at once, not after Ray has started."""
    output = getattr(config, "output", None)
    if output is not None:
        store.check_credentials(output)
    for field, what in _ROOTS.items():
        uri = getattr(config, field, None)
        if uri is not None:
            check_root(uri, what, store)


def _say(text: str) -> None:
    for line in text.splitlines():
        print(console.printable(line), flush=True)


def _outcome(flagged: int, failed_ids: Sequence[str], rest: str) -> str:
    """``2 flagged, 3 failed: a, b, c`` with the first few failed ids, and where the others are
    (``rest``: the table, the manifest)."""
    text = f"{flagged} flagged, {len(failed_ids)} failed"
    if failed_ids:
        text += f": {first_few(failed_ids)}"
        if len(failed_ids) > FEW:
            text += f"; every failed id is in the {rest}"
    return text


def _train(config: TrainConfig, session: console.Session) -> int:
    started = time.monotonic()
    if config.single_process:
        from lungseg.jobs.fit import run_fit

        result = run_fit(config, session.progress())
    else:
        from lungseg.jobs.train import run_training

        result = run_training(config, session.progress(), start_ray=session.start_ray)
    best = result.history[result.best_epoch - 1]
    _say(f"data: {result.images} images ({_outcome(result.flagged, result.failed_ids, 'table')})")
    how = "stopped early" if result.stopped_early else "done"
    scores = ", ".join(
        f"{k} {best[k]:.4f}" for k in ("loss", "dice", "val_dice", "val_iou") if k in best
    )
    first, last, took = result.first_epoch, len(result.history), time.monotonic() - started
    if result.trained < 1:
        trained = f"no epoch to train: the run had its {last} already"
    else:
        span = f"epoch {first}" if first == last else f"epochs {first}-{last}"
        trained = f"trained {span} of {config.recipe.epochs} ({how}) in {console.duration(took)}"
    _say(f"{trained}; kept epoch {result.best_epoch}: {scores}")
    if result.quality is not None:
        _say(_quality_line("quality control on the validation split", result.quality))
    _say(f"model: {result.model}  table: {result.table}")
    return EXIT_IMAGES_FAILED if result.failed else EXIT_OK


def _quality_line(what: str, qc: dict) -> str:
    """One line of :func:`lungseg.core.qc.agreement`'s figures."""
    caught = f"{qc['poor_in_review']} of {qc['poor']}" if qc["poor"] else "none"
    auroc = f" (AUROC {qc['auroc_poor']:.3f})" if qc["auroc_poor"] is not None else ""
    return (
        f"{what}: {qc['review']} of {qc['scored']} to review ({qc['review_share']:.1%}), "
        f"Spearman(qc_score, Dice) {qc['spearman_qc_score_dice'] or float('nan'):.3f}, "
        f"qc_dice off by {qc['qc_dice_mae'] or float('nan'):.3f} on average, "
        f"masks below Dice {qc['poor_dice_below']} in review: {caught}{auroc}"
    )


def _evaluate(config: EvaluateConfig, session: console.Session) -> int:
    from lungseg.jobs.evaluate import run_evaluation

    summary = run_evaluation(config, session.progress(), start_ray=session.start_ray)
    if config.dry_run:
        return EXIT_OK
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
        _say(_quality_line("quality control", qc))
    failed = [row["id"] for row in summary["failed"]]
    named = f" ({first_few(failed)})" if failed else ""
    _say(
        f"summary: {config.output}/summary.json  failed: {len(failed)}{named}  "
        f"unscored: {len(summary['unscored'])}"
    )
    return EXIT_IMAGES_FAILED if summary["failed"] else EXIT_OK


def _segment(config: SegmentConfig, session: console.Session) -> int:
    from lungseg.jobs.segment import run_segmentation

    result = run_segmentation(config, session.progress(), start_ray=session.start_ray)
    if config.dry_run:
        return EXIT_OK
    dice = "" if result.mean_dice is None else f", mean Dice {result.mean_dice:.4f}"
    counts = _outcome(result.flagged, result.failed_ids, "table and lungseg.json")
    _say(f"segmented {result.images} images ({counts}){dice}")
    masks = result.images - result.failed  # a failed image has no mask to review
    if config.qc == "on":
        _say(f"quality control: {result.review} of {masks} masks to review (qc column)")
    else:
        _say("quality control: off (--qc off)")
    _say(f"masks: {result.output}/masks/  table: {result.table}")
    if config.overlays:
        _say(f"overlays: {result.output}/overlays/")
    return EXIT_IMAGES_FAILED if result.failed else EXIT_OK


def _clean(config: CleanConfig, session: console.Session) -> int:
    from lungseg.jobs.clean import run_cleaning

    cleaned = run_cleaning(config, session.progress(), start_ray=session.start_ray)
    counts = _outcome(cleaned.flagged, cleaned.failed_ids, "table and lungseg.json")
    _say(f"cleaned {cleaned.images} images ({counts})")
    _say(f"outputs: {cleaned.output}/cleaned/, masks/  table: {cleaned.table}")
    if cleaned.sheet:
        _say(f"contact sheet: {cleaned.sheet}")
    return EXIT_IMAGES_FAILED if cleaned.failed else EXIT_OK


def _report(config: ReportConfig, session: console.Session) -> int:
    from lungseg.jobs.report import run_report  # pictures and HTML only: no Ray

    report = run_report(config)
    _say(f"report of {report.images} images ({report.failed} failed): {report.html}")
    return EXIT_OK


def _export(config: ExportConfig, session: console.Session) -> int:
    from lungseg.jobs.export import export_saved_model  # TensorFlow only: no Ray

    _say(f"SavedModel: {export_saved_model(config)}")
    return EXIT_OK


def _benchmark(config: BenchmarkConfig, session: console.Session) -> int:
    from lungseg.jobs.benchmark import format_table, run_benchmark

    result = run_benchmark(config, start_ray=session.start_ray)
    _say(format_table(result))
    _say(f"results: {result.json}")
    return EXIT_OK


_JOBS: dict[str, Callable[..., int]] = {
    # each: (config, session) -> exit status
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
            _preflight(config, Store.for_job(getattr(config, "s3_endpoint", None)))
            return _JOBS[args.command](config, session)
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
            if session.log and os.path.getsize(session.log):  # an empty one goes at exit
                where += [f"Ray's and TensorFlow's own output: {session.log}"]
            hint = f" ({'; '.join(where)})" if where else ""
            print(
                f"{prog}: crashed: {type(exc).__name__}: {console.printable(first)[:500]}{hint}",
                file=sys.stderr,
            )
            return EXIT_CRASHED


if __name__ == "__main__":
    sys.exit(main())
