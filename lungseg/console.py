"""What a person sees on the console: lungseg's messages, progress, and little else.

Three levels: ``quiet`` (the summary and errors), ``normal`` (also lungseg's own messages and a
progress display per stage) and ``verbose`` (also Ray's and TensorFlow's own output, which
otherwise stays in Ray's session logs, ``/tmp/ray/session_latest/logs``). Everything shown
goes through :func:`printable`, so a file name cannot send escape codes to the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from typing import TextIO

from lungseg.core.progress import Progress

QUIET, NORMAL, VERBOSE = 0, 1, 2
_logger = logging.getLogger("lungseg.console")


def printable(text: str) -> str:
    """``text`` with control characters (terminal escapes, newlines in file names) escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


class _Printable(logging.Formatter):
    """lungseg's log lines as plain text: the message, ``warning:`` before warnings and worse."""

    def format(self, record: logging.LogRecord) -> str:
        text = printable(record.getMessage())
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        if record.exc_info and record.levelno >= logging.ERROR:
            text += "\n" + self.formatException(record.exc_info)
        return text


@contextlib.contextmanager
def native_output_aside(level: int, command: str):
    """Unless ``verbose``, send what C and C++ code writes to file descriptor 2 (TensorFlow's
    start-up notes, ``failed call to cuInit``, Ray's core worker) to a log file, and keep
    Python's ``sys.stderr`` (lungseg's errors) on the console. Yields the log's path, or None.

    Ray's own processes, started meanwhile, keep their logs in Ray's session folder
    (``/tmp/ray/session_latest/logs``) as always. A log that stayed empty is removed at the end,
    so that one per job does not pile up in ``/tmp/lungseg``.
    """
    if level >= VERBOSE:
        yield None
        return
    folder = os.path.join(tempfile.gettempdir(), "lungseg")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    sys.stderr.flush()
    saved = os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    python_stderr = sys.stderr
    if sys.stderr is sys.__stderr__:  # not replaced (by a test's capture): keep it on the console
        sys.stderr = open(os.dup(saved), "w", buffering=1, errors="backslashreplace")  # noqa: SIM115
    os.dup2(log, 2)
    os.close(log)
    try:
        yield path
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if sys.stderr is not python_stderr:
            sys.stderr.close()
            sys.stderr = python_stderr
        with contextlib.suppress(OSError):
            if os.path.getsize(path) == 0:
                os.remove(path)


def stop_local_ray() -> None:
    """``ray.shutdown()`` of the Ray this process started, its autoscaler monitor killed first.

    Ray stops the GCS before the monitor, whose SIGTERM handler then reports to the stopped GCS
    until Ray kills it a second later: 1.0 s of the 1.1 s that shutdown takes here (the docs'
    performance page). A Ray started for one job has no autoscaler state to keep. The monitor
    is reached through Ray's private node object; where a Ray version lacks it, the plain
    shutdown runs."""
    import ray

    node = getattr(getattr(ray, "_private", None), "worker", None)
    node = getattr(node, "_global_node", None)
    if node is not None and hasattr(node, "kill_monitor"):
        node.kill_monitor(check_alive=False)
    ray.shutdown()


class Session:
    """The console of one job, from parsing to exit status (a context manager).

    On entry, lungseg's loggers print to ``stream`` at the ``level``'s threshold, TensorFlow's
    C++ logging is turned down unless ``verbose`` (in this process and the Ray workers it
    starts), and native output goes aside (:func:`native_output_aside`; its log is ``log``).
    On exit, a Ray that :meth:`start_ray` started is shut down and the loggers are as before,
    so that a caller in the same process (a test) finds them unchanged.
    """

    def __init__(self, level: int, command: str, stream: TextIO | None = None) -> None:
        # sys.stdout as it is now (a test's capture), not as it was when this was imported
        self.level, self.command, self.stream = level, command, stream or sys.stdout
        self.log: str | None = None
        self._started_ray = False
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Session:
        logger = logging.getLogger("lungseg")
        saved = (list(logger.handlers), logger.level, logger.propagate)

        def restore() -> None:
            logger.handlers[:] = saved[0]
            logger.setLevel(saved[1])
            logger.propagate = saved[2]

        self._stack.callback(restore)
        handler = logging.StreamHandler(self.stream)
        handler.setFormatter(_Printable())
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO if self.level >= NORMAL else logging.WARNING)
        logger.propagate = False
        if self.level < VERBOSE:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        self.log = self._stack.enter_context(native_output_aside(self.level, self.command))
        return self

    def __exit__(self, *exc) -> None:
        if self._started_ray:
            stop_local_ray()
        self._stack.close()

    def progress(self) -> Progress | None:
        """A progress display for the job's stages, unless ``quiet``."""
        return ConsoleProgress(self.stream) if self.level >= NORMAL else None

    def start_ray(self) -> None:
        """``ray.init()`` (attaching to a cluster when ``RAY_ADDRESS`` says so, as under ``ray
        job submit``; leaving alone a Ray this process already runs), with the workers' output
        and Ray's own messages off the console unless ``verbose``."""
        import ray
        from ray.data import DataContext

        verbose = self.level >= VERBOSE
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS", "local")
            if address == "local":
                _logger.info("starting Ray")
            else:
                _logger.info("attaching to Ray at %s", address)
            level = logging.INFO if verbose else logging.ERROR
            # A Ray started here runs for this job only: without the dashboard, which costs
            # seconds of start-up (a cluster started by `ray start` keeps its own).
            ray.init(log_to_driver=verbose, logging_level=level, include_dashboard=False)
            self._started_ray = True
        context = DataContext.get_current()
        context.enable_progress_bars = verbose
        context.print_on_execution_start = verbose
        if not verbose:  # Ray Data's console handler; its log file keeps everything
            train = logging.getLogger("ray.train")
            quieted = [
                (handler, handler.level)
                for handler in logging.getLogger("ray.data").handlers
                if not isinstance(handler, logging.FileHandler)
            ]
            saved = train.level

            def restore() -> None:  # as the caller had them (a test's log capture among them)
                for handler, level in quieted:
                    handler.setLevel(level)
                train.setLevel(saved)

            self._stack.callback(restore)
            for handler, _ in quieted:
                handler.setLevel(logging.ERROR)
            train.setLevel(logging.WARNING)


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _figures(figures: dict[str, float | None]) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in figures.items() if value is not None)


RATE_AFTER = 1.0
"""Seconds of counted work before a rate is shown: two batches done at once are no rate."""


class ConsoleProgress(Progress):
    """A stage's progress on the console: a tqdm bar on a terminal; elsewhere (``ray job logs``,
    a file, a pipe) a plain line at each tenth of the stage and at least every ``every``
    seconds, never carriage returns. Rates and time left count from the first unit done, so
    that start-up (Ray actors, model loading) does not skew them."""

    def __init__(self, stream: TextIO = sys.stdout, every: float = 30.0) -> None:
        self.stream = stream
        self.every = every
        self.terminal = stream.isatty()
        self._bar = None

    def start(self, stage: str, total: int, unit: str = "images") -> None:
        self.finish()
        self.stage, self.total, self.unit = stage, total, unit
        self.done = self.failed = self.first_done = 0
        self.figures: dict[str, float | None] = {}
        self.first: float | None = None
        self.last = time.monotonic()
        self.shown_tenth = 0
        if self.terminal:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=stage, unit=unit.rstrip("s"), file=self.stream)

    def advance(self, done: int = 1, failed: int = 0, **figures: float | None) -> None:
        now = time.monotonic()
        if self.first is None and done:
            self.first, self.first_done = now, done
        self.done += done
        self.failed += failed
        self.figures.update(figures)
        if self._bar is not None:
            errors = f"errors {self.failed}" if self.unit == "images" else ""
            postfix = ", ".join(p for p in (_figures(self.figures), errors) if p)
            self._bar.set_postfix_str(printable(postfix), refresh=False)
            self._bar.update(done)
            return
        tenth = 10 * self.done // max(self.total, 1)
        if tenth > self.shown_tenth or now - self.last >= self.every:
            self.shown_tenth, self.last = tenth, now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float) -> str:
        """The stage's state as one line: done of total, rate, time left, errors, figures."""
        parts = [f"{self.stage}: {self.done}/{self.total} {self.unit}"]
        counted, elapsed = self.done - self.first_done, now - (self.first or now)
        if counted > 0 and elapsed >= RATE_AFTER:
            rate = counted / elapsed
            one = self.unit.rstrip("s")
            parts.append(f"{rate:.1f} {self.unit}/s" if rate >= 1 else f"{1 / rate:.0f} s/{one}")
            if self.done < self.total:
                parts.append(f"{duration((self.total - self.done) / rate)} left")
        if self.unit == "images":
            parts.append(f"{self.failed} error" + ("" if self.failed == 1 else "s"))
        if self.figures:
            parts.append(_figures(self.figures))
        return printable(", ".join(parts))

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
