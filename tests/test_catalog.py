"""Tests for lungseg.io.catalog: every supported layout, built from real files, and the split."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from lungseg.io.catalog import Case, Catalog, CatalogError, find_cases, split_ids

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "lungseg" / "sample"
SPLIT_IDS = [f"CHNCXR_{i:04d}_0" for i in range(1, 11)]
SPLIT_VAL = ["CHNCXR_0004_0", "CHNCXR_0006_0", "CHNCXR_0010_0"]  # sha256-ranked, val_fraction 0.3


def _png(path: Path) -> str:
    """Write a tiny real PNG (creating parent dirs) and return its absolute path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((4, 4), 255, np.uint8))
    return str(path)


def _ids(cases: tuple[Case, ...]) -> list[str]:
    return [c.id for c in cases]


def test_project_layout(tmp_path: Path) -> None:
    a = _png(tmp_path / "images" / "a.png")
    b = _png(tmp_path / "images" / "b.jpg")
    c = _png(tmp_path / "images" / "c.PNG")
    ma = _png(tmp_path / "masks" / "a.png")
    mc = _png(tmp_path / "masks" / "c.png")
    orphan = _png(tmp_path / "masks" / "z.png")
    (tmp_path / "images" / "notes.txt").write_text("ignored")
    (tmp_path / "manifest.csv").write_text("id\na\n")
    _png(tmp_path / "images" / ".hidden.png")
    _png(tmp_path / ".cache" / "images" / "x.png")

    cat = find_cases(str(tmp_path))

    assert cat == Catalog(
        cases=(Case("a", a, (ma,)), Case("b", b), Case("c", c, (mc,))),
        orphan_masks=(orphan,),
        root=str(tmp_path),
    )
    assert _ids(cat.labelled) == ["a", "c"]
    assert _ids(cat.unlabelled) == ["b"]
    assert cat.summary() == (
        "3 images, 2 with masks, 1 without (first few ids: b), 1 masks without an image"
    )


def test_relative_root_gives_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = _png(tmp_path / "data" / "images" / "a.png")
    mask = _png(tmp_path / "data" / "masks" / "a.png")
    monkeypatch.chdir(tmp_path)

    assert find_cases("data").cases == (Case("a", img, (mask,)),)


def test_shenzhen_layout(tmp_path: Path) -> None:
    i1 = _png(tmp_path / "CXR_png" / "CHNCXR_0001_0.png")
    i2 = _png(tmp_path / "CXR_png" / "CHNCXR_0002_1.png")
    i3 = _png(tmp_path / "CXR_png" / "CHNCXR_0003_0.png")
    m1 = _png(tmp_path / "mask" / "CHNCXR_0001_0_mask.png")
    m2 = _png(tmp_path / "masks" / "CHNCXR_0002_1_MASK.png")
    orphan = _png(tmp_path / "mask" / "CHNCXR_0099_0_mask.png")
    (tmp_path / "ClinicalReadings").mkdir()
    (tmp_path / "ClinicalReadings" / "CHNCXR_0001_0.txt").write_text("normal")

    cat = find_cases(str(tmp_path))

    assert cat.cases == (
        Case("CHNCXR_0001_0", i1, (m1,)),
        Case("CHNCXR_0002_1", i2, (m2,)),
        Case("CHNCXR_0003_0", i3),
    )
    assert _ids(cat.unlabelled) == ["CHNCXR_0003_0"]
    assert cat.orphan_masks == (orphan,)


def test_montgomery_layout(tmp_path: Path) -> None:
    mont = tmp_path / "MontgomerySet"
    i1 = _png(mont / "CXR_png" / "MCUCXR_0001_0.png")
    i2 = _png(mont / "CXR_png" / "MCUCXR_0002_0.png")
    l1 = _png(mont / "ManualMask" / "leftMask" / "MCUCXR_0001_0.png")
    r1 = _png(mont / "ManualMask" / "rightMask" / "MCUCXR_0001_0.png")
    l2 = _png(mont / "ManualMask" / "leftMask" / "MCUCXR_0002_0.png")
    r2 = _png(mont / "ManualMask" / "rightMask" / "MCUCXR_0002_0.png")
    orphan_l = _png(mont / "ManualMask" / "leftMask" / "MCUCXR_0009_0.png")
    orphan_r = _png(mont / "ManualMask" / "rightMask" / "MCUCXR_0009_0.png")
    (mont / "NLM-MontgomeryCXRSet-ReadMe.pdf").write_bytes(b"%PDF")

    cat = find_cases(str(tmp_path))

    assert cat.cases == (
        Case("MCUCXR_0001_0", i1, (l1, r1)),
        Case("MCUCXR_0002_0", i2, (l2, r2)),
    )
    assert cat.unlabelled == ()
    assert cat.orphan_masks == (orphan_l, orphan_r)


def test_kaggle_layout(tmp_path: Path) -> None:
    seg = tmp_path / "Lung Segmentation"
    mcu1 = _png(seg / "CXR_png" / "MCUCXR_0001_0.png")
    mcu2 = _png(seg / "CXR_png" / "MCUCXR_0002_0.png")
    chn1 = _png(seg / "CXR_png" / "CHNCXR_0001_0.png")
    chn2 = _png(seg / "CXR_png" / "CHNCXR_0002_0.png")
    t1 = _png(seg / "test" / "0_test_0_.png")
    t2 = _png(seg / "test" / "1_test_1_.png")
    m_mcu1 = _png(seg / "masks" / "MCUCXR_0001_0.png")
    m_chn1 = _png(seg / "masks" / "CHNCXR_0001_0_mask.png")
    (tmp_path / "Lung Segmentation" / "NLM-ChinaCXRSet-ReadMe.docx").write_bytes(b"PK")

    cat = find_cases(str(tmp_path))

    assert cat.cases == (
        Case("0_test_0_", t1),
        Case("1_test_1_", t2),
        Case("CHNCXR_0001_0", chn1, (m_chn1,)),
        Case("CHNCXR_0002_0", chn2),
        Case("MCUCXR_0001_0", mcu1, (m_mcu1,)),
        Case("MCUCXR_0002_0", mcu2),
    )
    assert _ids(cat.labelled) == ["CHNCXR_0001_0", "MCUCXR_0001_0"]
    assert _ids(cat.unlabelled) == ["0_test_0_", "1_test_1_", "CHNCXR_0002_0", "MCUCXR_0002_0"]
    assert cat.orphan_masks == ()


def test_separate_roots(tmp_path: Path) -> None:
    a = _png(tmp_path / "x" / "images" / "a.png")
    b = _png(tmp_path / "x" / "images" / "sub" / "b.jpeg")
    ma = _png(tmp_path / "x" / "masks" / "a.png")
    orphan = _png(tmp_path / "x" / "masks" / "q_mask.png")

    cat = find_cases(str(tmp_path / "x" / "images"), masks=str(tmp_path / "x" / "masks"))

    assert cat.cases == (Case("a", a, (ma,)), Case("b", b))
    assert cat.orphan_masks == (orphan,)


def test_separate_roots_ignore_mask_dir_names_under_images(tmp_path: Path) -> None:
    # With an explicit masks root, only that root and *_mask stems hold masks.
    img = _png(tmp_path / "images" / "mask" / "a.png")
    mask = _png(tmp_path / "labels" / "a.png")

    cat = find_cases(str(tmp_path / "images"), masks=str(tmp_path / "labels"))

    assert cat.cases == (Case("a", img, (mask,)),)


def test_masks_root_nested_in_images_root(tmp_path: Path) -> None:
    img = _png(tmp_path / "a.png")
    img_b = _png(tmp_path / "b.png")
    mask = _png(tmp_path / "labels" / "a.png")
    mask_b = _png(tmp_path / "labels" / "b_mask.png")

    cat = find_cases(str(tmp_path), masks=str(tmp_path / "labels"))

    assert cat.cases == (Case("a", img, (mask,)), Case("b", img_b, (mask_b,)))
    assert cat.orphan_masks == ()


def test_mask_next_to_image(tmp_path: Path) -> None:
    a = _png(tmp_path / "all" / "a.png")
    b = _png(tmp_path / "all" / "b.png")
    ma = _png(tmp_path / "all" / "a_mask.png")

    cat = find_cases(str(tmp_path))
    assert cat.cases == (Case("a", a, (ma,)), Case("b", b))
    assert cat.orphan_masks == ()

    # the same rule holds with an explicit (here empty) masks root
    (tmp_path / "nomasks").mkdir()
    found = find_cases(str(tmp_path / "all"), masks=str(tmp_path / "nomasks"))
    assert (found.cases, found.orphan_masks) == (cat.cases, cat.orphan_masks)


def test_clashing_stems_get_their_paths_as_ids(tmp_path: Path) -> None:
    """Trust issue case 8: images sharing a stem used to stop the catalog ("image ids must be
    unique"); their ids are now their paths below the root, without layout folders."""
    p1 = _png(tmp_path / "images" / "a.png")
    p2 = _png(tmp_path / "images" / "a.jpg")
    p3 = _png(tmp_path / "other" / "a.png")
    b = _png(tmp_path / "images" / "b.png")
    m3 = _png(tmp_path / "masks" / "other" / "a.png")  # pairs by its path below masks/

    cat = find_cases(str(tmp_path))
    assert {c.id: c.image for c in cat.cases} == {"a.jpg": p2, "a.png": p1, "other/a": p3, "b": b}
    assert {c.id: c.masks for c in cat.cases}["other/a"] == (m3,)
    names = [c.name for c in cat.cases]
    assert len(set(names)) == 4 and all("/" not in n for n in names)
    assert cat.orphan_masks == ()


def test_a_pacs_export_of_suffix_less_dicoms_with_repeated_names(tmp_path: Path) -> None:
    from tests.test_dicom import dicom_bytes, sample_picture

    for patient in ("PAT1", "PAT2"):
        path = tmp_path / "DICOM" / patient / "SER1" / "IM000001"
        path.parent.mkdir(parents=True)
        path.write_bytes(dicom_bytes(sample_picture()))
    cat = find_cases(str(tmp_path))
    assert _ids(cat.cases) == ["DICOM/PAT1/SER1/IM000001", "DICOM/PAT2/SER1/IM000001"]
    assert cat.cases[0].name != cat.cases[1].name


def test_things_named_like_images_that_are_not_files_are_skipped_by_name(tmp_path: Path) -> None:
    """Trust issue case 8: a FIFO named x.png was skipped without a word, and an unreadable
    suffix-less file crashed the whole job."""
    good = _png(tmp_path / "good.png")
    os.mkfifo(tmp_path / "x.png")
    (tmp_path / "folder.png").mkdir()
    os.symlink(tmp_path / "gone.png", tmp_path / "dead.png")
    cat = find_cases(str(tmp_path))
    assert [c.image for c in cat.cases] == [good]
    assert dict(cat.skipped) == {
        str(tmp_path / "x.png"): "not a regular file (a FIFO)",
        str(tmp_path / "folder.png"): "a folder, not an image file",
        str(tmp_path / "dead.png"): "not a regular file (a broken link)",
    }
    assert "3 files skipped" in cat.summary()
    assert "x.png (not a regular file (a FIFO))" in cat.summary()


def test_a_suffix_less_file_that_cannot_be_read_is_skipped_by_name(tmp_path, monkeypatch):
    """It used to crash the whole job. (The test runs as root in CI, who reads any file, so the
    read fails by a stand-in for the 132-byte read.)"""
    from lungseg.io import catalog

    good = _png(tmp_path / "good.png")
    (tmp_path / "IM0001").write_bytes(b"\0" * 200)

    def unreadable(fs, path, name):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(catalog, "_is_dicom_file", unreadable)
    cat = find_cases(str(tmp_path))
    assert [c.image for c in cat.cases] == [good]
    ((where, why),) = cat.skipped
    assert where == str(tmp_path / "IM0001")
    assert why.startswith("could not be read to tell whether it is DICOM: ")
    assert "Permission denied" in why


def test_ambiguous_masks(tmp_path: Path) -> None:
    _png(tmp_path / "images" / "X.png")
    m1 = _png(tmp_path / "masks" / "X.png")
    m2 = _png(tmp_path / "masks" / "X_mask.png")

    with pytest.raises(CatalogError, match="ambiguous") as err:
        find_cases(str(tmp_path))

    assert m1 in str(err.value)
    assert m2 in str(err.value)


def test_two_left_masks_are_ambiguous(tmp_path: Path) -> None:
    _png(tmp_path / "CXR_png" / "X.png")
    m1 = _png(tmp_path / "ManualMask" / "leftMask" / "X.png")
    m2 = _png(tmp_path / "ManualMask" / "leftMask" / "X_mask.png")

    with pytest.raises(CatalogError, match="ambiguous") as err:
        find_cases(str(tmp_path))

    assert m1 in str(err.value)
    assert m2 in str(err.value)


def test_lone_montgomery_half(tmp_path: Path) -> None:
    _png(tmp_path / "CXR_png" / "X.png")
    left = _png(tmp_path / "ManualMask" / "leftMask" / "X.png")

    with pytest.raises(CatalogError, match="incomplete") as err:
        find_cases(str(tmp_path))

    assert left in str(err.value)


def test_missing_root(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(CatalogError, match="not found") as err:
        find_cases(missing)
    assert missing in str(err.value)

    _png(tmp_path / "images" / "a.png")
    with pytest.raises(CatalogError, match="not found") as err:
        find_cases(str(tmp_path / "images"), masks=missing)
    assert missing in str(err.value)


def test_root_is_a_file(tmp_path: Path) -> None:
    path = _png(tmp_path / "a.png")
    with pytest.raises(CatalogError, match="not a directory"):
        find_cases(path)


def test_root_without_images(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images")
    _png(tmp_path / "masks" / "a.png")

    with pytest.raises(CatalogError, match=r"no images with suffixes \.png") as err:
        find_cases(str(tmp_path))

    assert str(tmp_path) in str(err.value)


def test_sample_data() -> None:
    cat = find_cases(str(SAMPLE))

    assert len(cat.cases) == 16
    assert len(cat.labelled) == 16
    assert cat.unlabelled == ()
    assert cat.orphan_masks == ()
    for case in cat.cases:
        assert case.id.startswith("MCUCXR_")
        assert case.image == str(SAMPLE / "images" / f"{case.id}.png")
        assert case.masks == (str(SAMPLE / "masks" / f"{case.id}.png"),)
    assert cat.summary() == "16 images, 16 with masks, 0 without, 0 masks without an image"


def test_summary_truncates_ids() -> None:
    cases = tuple(Case(f"u{i}", f"/d/u{i}.png") for i in range(7))
    cat = Catalog(cases=cases, orphan_masks=())
    assert cat.summary() == (
        "7 images, 0 with masks, 7 without (first few ids: u0, u1, u2, u3, u4, ...), "
        "0 masks without an image"
    )


def test_split_stable() -> None:
    first = split_ids(SPLIT_IDS, 0.3)
    assert first == split_ids(SPLIT_IDS, 0.3)
    assert first[1] == SPLIT_VAL
    assert first[0] == sorted(set(SPLIT_IDS) - set(SPLIT_VAL))


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.95])
def test_split_partition_and_size(fraction: float) -> None:
    ids = [f"id{i}" for i in range(30)]
    train, val = split_ids(ids, fraction)

    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(ids)
    assert train == sorted(train)
    assert val == sorted(val)
    expected = {0.05: 2, 0.1: 3, 0.2: 6, 0.3: 9, 0.5: 15, 0.7: 21, 0.95: 29}[fraction]
    assert len(val) == expected == math.ceil(round(fraction * 30, 9))


def test_split_independent_of_order() -> None:
    assert split_ids(reversed(SPLIT_IDS), 0.3) == split_ids(SPLIT_IDS, 0.3)
    assert split_ids(iter(sorted(SPLIT_IDS, key=lambda s: s[::-1])), 0.3)[1] == SPLIT_VAL


def test_split_bounds() -> None:
    assert split_ids(SPLIT_IDS, 0) == (sorted(SPLIT_IDS), [])
    assert split_ids([], 0.2) == ([], [])
    assert split_ids(["a"], 0.5) == (["a"], [])
    train, val = split_ids(SPLIT_IDS, 0.01)
    assert len(val) == 1
    assert len(train) == 9
    train, val = split_ids(["a", "b"], 0.99)
    assert len(train) == len(val) == 1


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan")])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        split_ids(SPLIT_IDS, fraction)


def test_split_rejects_duplicates() -> None:
    with pytest.raises(ValueError, match="duplicate ids: a, c"):
        split_ids(["a", "b", "a", "c", "c"], 0.2)


def test_split_independent_of_hash_seed() -> None:
    code = (
        "import json, sys; from lungseg.io.catalog import split_ids; "
        "print(json.dumps(split_ids(json.loads(sys.argv[1]), 0.3)))"
    )
    outputs = []
    for seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        proc = subprocess.run(
            [sys.executable, "-c", code, json.dumps(SPLIT_IDS)],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        outputs.append(json.loads(proc.stdout))
    expected = [list(part) for part in split_ids(SPLIT_IDS, 0.3)]
    assert outputs == [expected, expected]
