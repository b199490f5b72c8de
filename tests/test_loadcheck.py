"""The model check in a process of its own, and its memory of the files that passed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lungseg.core.config import BUNDLED_MODEL
from lungseg.core.errors import UserError
from lungseg.model import loadcheck


def _checkers() -> list[int]:
    """The process ids of this process's children that are model checks (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        if parent == os.getpid() and b"lungseg.model.loadcheck" in command:
            found.append(int(stat.parent.name))
    return found


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(loadcheck.CACHE, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_model_that_passed_is_not_checked_again(cache):
    data = Path(BUNDLED_MODEL).read_bytes()
    assert not loadcheck.passed_before(data, 256)
    with loadcheck.checking(data, 256, "bundled") as verdict:
        assert len(_checkers()) == 1
        verdict()
    assert loadcheck.passed_before(data, 256)
    assert not loadcheck.passed_before(data, 128), "another input size is another check"
    assert not loadcheck.passed_before(data + b"\0", 256), "other bytes, another check"
    with loadcheck.checking(data, 256, "bundled") as verdict:
        assert _checkers() == []
        verdict()
    assert len(list((cache / "passed-models").iterdir())) == 1


def test_a_refused_model_is_refused_again(cache):
    data = b"PK\x03\x04 not a model"
    for _ in range(2):
        with loadcheck.checking(data, 256, "junk.keras") as verdict:
            assert len(_checkers()) == 1
            with pytest.raises(UserError, match=r"^junk\.keras: Keras cannot load it"):
                verdict()
    assert not loadcheck.passed_before(data, 256)
    assert not (cache / "passed-models").exists()


def test_a_model_is_not_remembered_where_a_version_cannot_be_told(cache, monkeypatch):
    def unknown(package: str) -> str:
        raise loadcheck.metadata.PackageNotFoundError(package)

    monkeypatch.setattr(loadcheck.metadata, "version", unknown)  # another build of TensorFlow
    data = Path(BUNDLED_MODEL).read_bytes()
    for _ in range(2):
        with loadcheck.checking(data, 256, "bundled") as verdict:
            assert len(_checkers()) == 1
            verdict()
    assert not loadcheck.passed_before(data, 256)
    assert not cache.exists()
