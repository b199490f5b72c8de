"""The benchmark's result: one row per measured ratio, and the table people read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lungseg.jobs.benchmark.sampler import Measurement


@dataclass(frozen=True)
class Row:
    """One ratio: the Ray side against its baseline, measured in one run on the same inputs.

    Values are in ``unit``; ``*_cores`` are the CPU seconds of the whole session per wall
    second of each side's best run (busy cores), ``idle`` the share of the machine's cores the
    Ray side left idle; ``ceiling`` the rate that the measured cost of each step, summed over
    the cores, allows (None where it does not apply), ``share`` the Ray side's rate as a share
    of it; ``profile`` the Ray side's top CPU consumers (the memory row: its top holders of
    memory at the peak).
    """

    stage: str
    baseline: str
    candidate: str
    unit: str
    baseline_value: float
    value: float
    ratio: float
    goal: str  # e.g. ">= 1.80" or "<= 1.10"
    met: bool
    baseline_cores: float
    cores: float
    idle: float
    ceiling: float | None
    share: float | None
    profile: str
    note: str


def make_row(
    stage: str,
    sides: tuple[str, str],
    unit: str,
    runs: Sequence[Measurement],
    values: tuple[float, float],
    goal: float,
    at_least: bool,
    note: str,
    machine_cores: float,
    ceiling: float | None = None,
) -> Row:
    """A :class:`Row` of ``values[1] / values[0]``, which must be at least (``at_least``) or at
    most ``goal``."""
    ratio = values[1] / values[0]
    return Row(
        stage,
        *sides,
        unit,
        *values,
        ratio,
        f"{'>=' if at_least else '<='} {goal:.2f}",
        ratio >= goal if at_least else ratio <= goal,
        round(runs[0].cores, 2),
        round(runs[1].cores, 2),
        round(max(0.0, 1 - runs[1].cores / machine_cores), 2),
        None if ceiling is None else round(ceiling, 2),
        None if ceiling is None else round(values[1] / ceiling, 2),
        runs[1].profile(),
        note,
    )


@dataclass(frozen=True)
class BenchmarkResult:
    """The rows, the step costs, the machine, the model's analytic cost, the JSON file."""

    rows: list[Row]
    costs: dict[str, dict]  # image size -> StageCosts.to_dict() of the pipeline and of the loop
    machine: dict
    model: dict
    settings: dict
    json: str


def format_table(result: BenchmarkResult) -> str:
    """The rows as a Markdown table, the step costs and ceilings, the Ray sides' CPU profiles,
    the machine and the model."""
    lines = [
        "| stage | baseline | Ray | ratio | goal | met | busy cores (base / Ray) | Ray idle "
        "| ceiling | share of ceiling | conditions |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result.rows:
        ceiling = "" if r.ceiling is None else f"{r.ceiling:.1f} {r.unit}"
        share = "" if r.share is None else f"{r.share:.0%}"
        lines.append(
            f"| {r.stage} | {r.baseline}: {r.baseline_value:.1f} {r.unit} | {r.candidate}: "
            f"{r.value:.1f} {r.unit} | {r.ratio:.2f} | {r.goal} | {'yes' if r.met else 'no'} "
            f"| {r.baseline_cores:.2f} / {r.cores:.2f} | {r.idle:.0%} | {ceiling} | {share} "
            f"| {r.note} |"
        )
    lines.append("")
    if result.costs:  # only the segment stages measure steps
        lines += step_costs(result.costs, result.machine["ray_cpus"])
    lines.extend(f"Ray side, {r.stage}: {r.profile}" for r in result.rows)
    m, model = result.machine, result.model
    lines.append(
        f"machine: {m['cpu']}, {m['cores']} cores ({m['ray_cpus']:g} for Ray), "
        f"{m['memory_gib']} GiB, GPUs: {', '.join(m['gpus']) or 'none'}; float32 matmul "
        f"{m['matmul_gflops']:.0f} GFLOP/s; Ray {m['ray']}, TensorFlow {m['tensorflow']}"
    )
    lines.append(
        f"model: {model['input']} input, {model['parameters']:,} parameters, "
        f"{model['gflops_per_image']:.2f} GFLOPs/image (convolutions), pipeline precision "
        f"{model['precision']}, loop precision float32"
    )
    return "\n".join(lines)


def step_costs(costs: dict[str, dict[str, dict[str, float]]], cores: float) -> list[str]:
    """The table of each step's core-ms per image (pipeline and loop) and the ceiling they
    imply on ``cores``."""
    lines = [
        f"| step, core-ms per image | {' | '.join(costs)} |",
        f"| --- | {' | '.join('---' for _ in costs)} |",
    ]
    for step in ("decode", "preprocess", "model", "write", "total"):
        cells = " | ".join(
            f"{c['pipeline'][step]:.1f} (loop {c['loop'][step]:.1f})" for c in costs.values()
        )
        lines.append(f"| {step} | {cells} |")
    ceilings = " | ".join(
        f"{cores * 1000 / c['pipeline']['total']:.1f} images/s" for c in costs.values()
    )
    return [*lines, f"| ceiling on {cores:g} cores | {ceilings} |", ""]
