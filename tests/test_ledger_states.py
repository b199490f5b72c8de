"""The ledger's guarantees under random sequences of what users do, on real small runs
(hypothesis's stateful testing): segment afresh, resume, overwrite, train into the root,
change a film, add a ground truth, cut a mask short, interrupt a run half way, leave a file of
one's own beside the outputs or among them. After every step:

- no file outside a ledger is ever removed or changed (the user's files, the inputs);
- a root that a run completed holds nothing but that run's ledger, lungseg's manifest and the
  user's files, and its table has exactly one row per input;
- right after a run completes, every ``ok`` row's mask decodes and is, byte for byte, the mask
  that a fresh run of the current input writes.

A few examples run in CI; ``LUNGSEG_LEDGER_EXAMPLES=50`` runs more.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lungseg.core.config import ModelConfig, RecipeConfig, SegmentConfig, TrainConfig
from lungseg.core.errors import UserError
from lungseg.core.layout import MANIFEST_FILE, SEGMENT
from lungseg.core.progress import Progress
from lungseg.io import storage
from lungseg.io.storage import DEFAULT_STORE
from lungseg.jobs.fit import run_fit
from lungseg.jobs.segment import run_segmentation
from lungseg.runs import outputs
from tests.conftest import SAMPLE_IDS

SAMPLE = Path(__file__).resolve().parents[1] / "lungseg" / "sample"
IDS = ("a", "b", "c")
FILMS = SAMPLE_IDS[:4]  # the films an input can hold, by sample id
EXAMPLES = int(os.environ.get("LUNGSEG_LEDGER_EXAMPLES", "3"))
_shared: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _machine_setup(local_ray, model_path, tmp_path_factory):
    """Ray, the model, and each film's reference mask: a fresh run of every film."""
    root = tmp_path_factory.mktemp("reference")
    (root / "images").mkdir()
    for film in FILMS:
        shutil.copy(SAMPLE / "images" / f"{film}.png", root / "images")
    config = SegmentConfig(model=model_path, input=str(root / "images"),
                           output=str(root / "out"), batch_size=2)  # fmt: skip
    run_segmentation(config)
    rows = pq.read_table(root / "out" / "segmentation.parquet").to_pylist()
    _shared["config"] = config
    _shared["reference"] = {
        r["source_fingerprint"]: (root / "out" / r["mask"]).read_bytes() for r in rows
    }
    yield
    _shared.clear()


class _Interrupt(Progress):
    """A driver interrupted half way (Ctrl-C): at its second batch of rows (the first may be
    the rows a resumed run keeps), the first one journaled."""

    def __init__(self) -> None:
        self.batches = 0

    def advance(self, done: int = 1, failed: int = 0, **figures) -> None:
        self.batches += done > 0
        if self.batches == 2:
            raise KeyboardInterrupt


class Ledger(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.top = Path(tempfile.mkdtemp(prefix="ledger-"))
        self.data = self.top / "data"
        for folder in ("images", "masks"):
            (self.data / folder).mkdir(parents=True)
        for case_id, film in zip(IDS, FILMS, strict=False):
            shutil.copy(SAMPLE / "images" / f"{film}.png", self.data / "images" / f"{case_id}.png")
        for case_id, film in zip(IDS[:2], FILMS, strict=False):  # "c" has no mask yet
            shutil.copy(SAMPLE / "masks" / f"{film}.png", self.data / "masks" / f"{case_id}.png")
        self.out = self.top / "out"
        self.theirs: dict[str, bytes] = {}  # the user's own files under the output root
        self.inputs = self._snapshot(self.data)
        self.completed = False  # the last run into the root completed
        self.just_ran = False

    def teardown(self) -> None:
        shutil.rmtree(self.top, ignore_errors=True)

    @staticmethod
    def _snapshot(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    def _config(self, **flags) -> SegmentConfig:
        return replace(_shared["config"], input=str(self.data / "images"),
                       masks=str(self.data / "masks"), output=str(self.out), **flags)  # fmt: skip

    def _segment(self, progress: Progress | None = None, **flags) -> None:
        self.just_ran = False
        before = self._snapshot(self.out) if self.out.exists() else None
        try:
            run_segmentation(self._config(**flags), progress)
        except UserError:  # refused: nothing under the root changed
            assert (self._snapshot(self.out) if self.out.exists() else None) == before
            return
        except KeyboardInterrupt:
            self.completed = False
            return
        self.completed = self.just_ran = True

    @rule(how=st.sampled_from(["fresh", "resume", "overwrite"]))
    def segment(self, how: str) -> None:
        self._segment(resume=how == "resume", overwrite=how == "overwrite")

    @rule(how=st.sampled_from(["resume", "overwrite"]))
    def interrupt(self, how: str) -> None:
        self._segment(_Interrupt(), resume=how == "resume", overwrite=how == "overwrite")

    @precondition(lambda self: not self.out.exists())
    @rule()
    def train_into_the_root(self) -> None:
        recipe = RecipeConfig(epochs=1, batch_size=2, model=ModelConfig(64, 4, 2))
        config = TrainConfig(data=str(self.data), output=str(self.out), val_fraction=0.34,
                             recipe=recipe)  # fmt: skip
        run_fit(config)
        self.completed = self.just_ran = False  # a run folder now: segment must refuse it

    @rule(case=st.sampled_from(IDS), film=st.sampled_from(FILMS))
    def change_a_film(self, case: str, film: str) -> None:
        shutil.copy(SAMPLE / "images" / f"{film}.png", self.data / "images" / f"{case}.png")
        self.inputs = self._snapshot(self.data)
        self.just_ran = False

    @precondition(lambda self: not (self.data / "masks" / "c.png").exists())
    @rule()
    def add_a_ground_truth(self) -> None:
        shutil.copy(SAMPLE / "masks" / f"{FILMS[2]}.png", self.data / "masks" / "c.png")
        self.inputs = self._snapshot(self.data)
        self.just_ran = False

    @precondition(lambda self: (self.out / "masks").is_dir())
    @rule(data=st.data())
    def cut_a_mask_short(self, data) -> None:
        masks = sorted(p for p in (self.out / "masks").iterdir() if p.name not in self.theirs)
        if masks:
            with open(data.draw(st.sampled_from(masks)), "r+b") as f:
                f.truncate(10)
            self.just_ran = False

    @precondition(lambda self: self.out.exists())
    @rule(where=st.sampled_from(["NOTES.md", "masks/corrected.png"]))
    def leave_a_file_of_ones_own(self, where: str) -> None:
        path = self.out / where
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"the user's {where}".encode())
        self.theirs[where] = path.read_bytes()

    @precondition(lambda self: "masks/corrected.png" in self.theirs)
    @rule()
    def take_it_away_again(self) -> None:
        (self.out / "masks" / "corrected.png").unlink()
        del self.theirs["masks/corrected.png"]

    @invariant()
    def nothing_outside_a_ledger_is_removed_or_changed(self) -> None:
        assert self._snapshot(self.data) == self.inputs
        for key, data in self.theirs.items():
            assert (self.out / key).read_bytes() == data, key

    @invariant()
    def a_completed_root_holds_its_ledger_and_one_row_per_input(self) -> None:
        if not self.completed:
            return
        manifest = json.loads((self.out / MANIFEST_FILE).read_text())
        assert manifest["state"] == "complete"
        known = outputs.ledger(DEFAULT_STORE, str(self.out), manifest, SEGMENT)
        on_disk = set(self._snapshot(self.out)) - {MANIFEST_FILE} - set(self.theirs)
        assert on_disk == set(known.files)
        rows = pq.read_table(self.out / "segmentation.parquet").to_pylist()
        assert sorted(r["id"] for r in rows) == sorted(IDS)

    @invariant()
    def after_a_run_every_ok_mask_is_a_fresh_runs(self) -> None:
        if not self.just_ran:
            return
        for row in pq.read_table(self.out / "segmentation.parquet").to_pylist():
            assert row["status"] in ("ok", "flagged"), row["error"]
            source = (self.data / "images" / f"{row['id']}.png").read_bytes()
            assert row["source_fingerprint"] == storage.fingerprint(source)
            mask = (self.out / row["mask"]).read_bytes()
            assert cv2.imdecode(np.frombuffer(mask, np.uint8), cv2.IMREAD_UNCHANGED) is not None
            assert mask == _shared["reference"][row["source_fingerprint"]], row["id"]
            has_truth = (self.data / "masks" / f"{row['id']}.png").exists()
            assert (row["dice"] is not None) == has_truth, row["id"]


Ledger.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=7,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
TestLedger = pytest.mark.timeout(1800)(Ledger.TestCase)
