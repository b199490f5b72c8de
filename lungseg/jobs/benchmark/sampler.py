"""What a benchmark run costs: CPU seconds and memory of this process and every process under
it (Ray's, or a side run as a child process), sampled from /proc while it runs."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

SAMPLE_SECONDS = 0.2
"""Interval of the sampler."""


def session_processes(
    root: int | None = None, pss: bool = False
) -> dict[int, tuple[str, float, int]]:
    """``pid -> (title, CPU seconds, memory bytes)`` of process ``root`` (default: this one,
    titled ``driver``) and all its descendants; Ray workers by their ``ray::...`` title.

    Memory is the resident set size (RSS), or with ``pss`` the proportional set size:
    resident pages, those shared by n processes counted 1/n in each, so that a sum over
    processes counts Ray's shared-memory object store once (a sum of RSS counts it in the
    raylet and again in every worker that maps an object). PSS costs the kernel a walk of each
    process's page tables: tens of milliseconds per sample in a Ray session.
    """
    root = root or os.getpid()
    stats: dict[int, list[str]] = {}
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # fields[0] is field 3, state
            except (OSError, IndexError):  # gone meanwhile
                continue
            stats[int(name)] = fields
            children.setdefault(int(fields[1]), []).append(int(name))
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    found, pending = {}, [root]
    while pending:
        pid = pending.pop()
        pending.extend(children.get(pid, ()))
        if pid in stats:
            fields = stats[pid]
            cpu = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
            memory = _pss(pid) if pss else None
            title = "driver" if pid == root else _title(pid)
            found[pid] = (title, cpu, int(fields[21]) * page if memory is None else memory)
    return found


def _pss(pid: int) -> int | None:
    """A process's proportional set size in bytes, None where the kernel does not tell."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def _title(pid: int) -> str:
    """A process's Ray title (``MapWorker(MapBatches(Preprocess))``), else the Python script
    it runs, else its command name (``raylet``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        if args and args[0].startswith("ray::"):
            return args[0].split()[0].removeprefix("ray::")
        script = next((a for a in args[1:] if a.endswith(".py") and " " not in a), None)
        if script:
            return os.path.basename(script)
        with open(f"/proc/{pid}/comm") as f:  # 15 characters at most
            return f.read().strip().removeprefix("ray::") or "?"
    except OSError:  # gone meanwhile
        return "?"


class SessionMonitor:
    """Context manager sampling :func:`session_processes` every ``SAMPLE_SECONDS``: the peak
    of the summed memory (PSS with ``pss``, else RSS), that peak by process title, and the CPU
    seconds spent meanwhile by process title."""

    def __init__(self, pss: bool = False) -> None:
        self.pss = pss
        self.peak_memory = 0
        self.peak_by_title: Counter[str] = Counter()
        self.cpu: Counter[str] = Counter()
        self._last: dict[int, float] | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        processes = session_processes(pss=self.pss)
        total = sum(rss for _, _, rss in processes.values())
        if total > self.peak_memory:
            self.peak_memory = total
            self.peak_by_title = Counter()
            for title, _, rss in processes.values():
                self.peak_by_title[title] += rss
        last = self._last
        for pid, (title, cpu, _) in processes.items():
            # A process born after the first sample spent all its CPU time in the window.
            self.cpu[title] += cpu - (cpu if last is None else last.get(pid, 0.0))
        self._last = {pid: cpu for pid, (_, cpu, _) in processes.items()}

    def _run(self) -> None:
        while not self._done.wait(SAMPLE_SECONDS):
            self._sample()

    def __enter__(self) -> SessionMonitor:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self._sample()


@dataclass(frozen=True)
class Measurement:
    """One run of one side: its wall seconds, its figure (seconds unless the side reports
    another, e.g. one epoch's), the session's CPU seconds by process title, its peak memory
    (PSS, see :func:`session_processes`) and that peak by process title."""

    seconds: float
    value: float
    cpu: dict[str, float]
    peak_memory: int
    memory: dict[str, int]

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds of the whole session."""
        return sum(self.cpu.values())

    @property
    def cores(self) -> float:
        """CPU seconds of the whole session per wall second."""
        return sum(self.cpu.values()) / self.seconds

    def profile(self, top: int = 4) -> str:
        """The ``top`` CPU consumers and what the others spent together, so that the line adds
        up to :attr:`cpu_seconds`: e.g. ``driver 3.1 s, raylet 0.4 s, the rest (5) 1.2 s``."""
        ranked = sorted(self.cpu.items(), key=lambda item: -item[1])
        line = ", ".join(f"{title} {seconds:.1f} s" for title, seconds in ranked[:top])
        rest = ranked[top:]
        if rest:
            line += f", the rest ({len(rest)}) {sum(seconds for _, seconds in rest):.1f} s"
        return line

    def memory_profile(self, top: int = 4) -> str:
        """The ``top`` holders of memory at the peak, e.g. ``raylet 2,100 MiB, driver 900 MiB``."""
        ranked = sorted(self.memory.items(), key=lambda item: -item[1])[:top]
        return ", ".join(f"{title} {size / 2**20:,.0f} MiB" for title, size in ranked)


def measure(run: Callable[[], float | None], pss: bool = False) -> Measurement:
    """Run ``run`` under a :class:`SessionMonitor`; its figure is what it returns, else the
    wall seconds."""
    with SessionMonitor(pss) as monitor:
        started = time.perf_counter()
        value = run()
        seconds = time.perf_counter() - started
    cpu = {title: round(t, 2) for title, t in monitor.cpu.items() if t > 0}
    return Measurement(
        seconds,
        seconds if value is None else value,
        cpu,
        monitor.peak_memory,
        dict(monitor.peak_by_title),
    )


def alternate(rounds: int, sides: dict[str, Callable[[], float | None]]) -> list[Measurement]:
    """Measure each side ``rounds`` times in alternation; each side's best (smallest figure)."""
    best: dict[str, Measurement] = {}
    for round_ in range(rounds):
        for name, run in sides.items():
            m = measure(run)
            if name not in best or m.value < best[name].value:
                best[name] = m
            logger.info(
                "  round %d %s: %.2f s, %.2f cores, %s",
                round_ + 1,
                name,
                m.value,
                m.cores,
                m.profile(),
            )
    return list(best.values())
