"""How a job tells whoever watches how far it got: one stage at a time.

Jobs call a :class:`Progress` (``start`` a stage, ``advance`` it, ``finish`` it); this base
class shows nothing, so library callers pay nothing. The CLI shows it
(:class:`lungseg.console.ConsoleProgress`).
"""

from __future__ import annotations


class Progress:
    """A stage at a time: ``start(stage, total, unit)``, ``advance(n, failed, **figures)``,
    ``finish()``. This base class shows nothing."""

    def start(self, stage: str, total: int, unit: str = "images") -> None:
        """A stage begins: ``total`` ``unit`` to do (images, epochs)."""

    def advance(self, done: int = 1, failed: int = 0, **figures: float | None) -> None:
        """``done`` more of the stage's units, ``failed`` of them failed; ``figures`` are the
        latest values worth showing (loss, Dice)."""

    def finish(self) -> None:
        """The stage is over (early, for a training run that stopped early)."""
