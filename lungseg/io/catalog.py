"""Find chest X-ray images and their lung masks under a root, and split ids deterministically.

Handles the project's ``images/`` + ``masks/`` layout, the Shenzhen (``*_mask.png``) and
Montgomery (``ManualMask/leftMask`` + ``rightMask``) originals, the Kaggle "Chest Xray Masks and
Labels" mix of both, separate image and mask roots, and ``*_mask`` files next to their images.
Works on local paths and ``s3://`` URIs alike; returned URIs keep the caller's form.
Images are files with a suffix in ``IMAGE_SUFFIXES``, and files without any suffix (as in PACS
exports) whose first bytes are a DICOM preamble; a ``DICOMDIR`` index is never an image.

Ids are file stems; where two images share a stem (a PACS export's ``PAT1/SER1/IM000001`` and
``PAT2/SER1/IM000001``), their ids are their paths below the root instead, without the layout's
``images`` folders and the suffix (``PAT1/SER1/IM000001``), and masks pair with them by the same
path below their mask folder. Files that cannot be images (a FIFO or a folder named ``x.png``,
a suffix-less file that cannot be read to tell whether it is DICOM) are skipped and named.

Each case also gets the stem of its output files (:func:`output_name`): its id where that is a
safe, portable file name, else a sanitised id plus a hash of it, so that no id can write outside
the output root or onto another id's files, even on a case-insensitive file system.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import posixpath
import re
import stat
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlparse

import pyarrow.fs as pafs

from lungseg.core.errors import UserError
from lungseg.core.imaging import is_dicom
from lungseg.io.storage import DEFAULT_STORE, Store, explained, is_remote

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")

_MASK_DIRS = frozenset({"masks", "mask", "manualmask", "leftmask", "rightmask"})
_IMAGE_DIRS = frozenset({"images", "image"})  # left out of an id made from a path
_SIDES = ("left", "right")
_MASK_SUFFIX = "_mask"
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9_.-]")
_HASHED_STEM = 64  # characters of the sanitised id kept in a hashed name
_HASH_DIGITS = 12


FEW = 5
"""Ids or files named in a one-line summary or refusal; the others are counted or listed
elsewhere."""


def first_few(names: Sequence[str]) -> str:
    """The first :data:`FEW` of ``names``, comma-separated, with ``, ...`` where there are more."""
    return ", ".join(names[:FEW]) + (", ..." if len(names) > FEW else "")


class CatalogError(UserError):
    """A root that cannot be catalogued: missing, empty, or with clashing or ambiguous files."""


@dataclass(frozen=True, slots=True)
class Case:
    """One image and its mask(s).

    ``masks`` is empty (unlabelled), one mask, or a Montgomery ``(left, right)`` pair that is
    merged downstream by pixel-wise max.
    """

    id: str
    image: str
    masks: tuple[str, ...] = ()
    name: str = ""  # the stem of the case's output files; default: output_name(id)
    # What the listing said of the image, then of each mask: "<size>:<mtime in ns>". A resumed
    # run compares it with a row's to know, without reading, that an input is unchanged.
    stamps: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", output_name(self.id))


def output_name(case_id: str, hashed: bool = False) -> str:
    """The stem of an id's output files (``masks/<name>.png``): safe and portable.

    An id of at most 128 ASCII letters, digits, ``_``, ``.`` and ``-``, not starting with ``.``
    or ``-``, is its own name. Any other id, or any id when ``hashed`` (the catalog asks for it
    when two ids differ only in case), becomes its first 64 characters with each other character
    replaced by ``_``, then ``~`` and the first 12 hex digits of the SHA-256 of its UTF-8 bytes:
    ``a b:c`` -> ``a_b_c~<12 hex>``. A kept id never contains ``~``, so names cannot clash.
    """
    if not hashed and _SAFE_NAME.fullmatch(case_id):
        return case_id
    stem = _UNSAFE_CHAR.sub("_", case_id[:_HASHED_STEM]).lstrip(".-") or "_"
    digest = hashlib.sha256(case_id.encode()).hexdigest()
    return f"{stem}~{digest[:_HASH_DIGITS]}"


def _folded(ids: Iterable[str]) -> set[str]:
    """The ids whose :func:`output_name` differs from another's only in case: they get hashed
    names, unique even where ``A.png`` and ``a.png`` are the same file (macOS, Windows)."""
    seen: set[str] = set()
    twice: set[str] = set()
    for i in ids:
        folded = output_name(i).lower()
        (twice if folded in seen else seen).add(folded)
    return {i for i in ids if output_name(i).lower() in twice} if twice else set()


def _check_names(names: Iterable[str]) -> None:
    """Refuse hashed names (``~``) that clash; a kept id has no ``~``, so only they can."""
    hashed = Counter(n.lower() for n in names if "~" in n)
    clashes = [n for n, k in hashed.items() if k > 1]
    if clashes:  # a 48-bit hash collision: never seen, but never written over either
        raise CatalogError(f"output names clash: {', '.join(sorted(clashes))}")


@dataclass(frozen=True)
class Catalog:
    """All cases under a root (sorted by id), the mask files whose image was not found, and the
    files skipped as no image, each with the reason (``(uri, why)``)."""

    cases: tuple[Case, ...]
    orphan_masks: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    root: str = ""  # where the images were found, in the form of their URIs

    @property
    def labelled(self) -> tuple[Case, ...]:
        """Cases with at least one mask."""
        return tuple(c for c in self.cases if c.masks)

    @property
    def unlabelled(self) -> tuple[Case, ...]:
        """Cases without a mask."""
        return tuple(c for c in self.cases if not c.masks)

    def select(
        self, wanted: Iterable[str] | None = None, limit: int | None = None, source: str = ""
    ) -> tuple[Case, ...]:
        """The images a job does: those of ``wanted`` (ids, or image paths relative to the
        root) or all, in id order, then the first ``limit`` of them. An entry that matches no
        image is a :class:`CatalogError` naming the first few (and ``source``, their file)."""
        cases = self.cases
        if wanted is not None:
            prefix = self.root.rstrip("/") + "/"
            by_key = {c.image.removeprefix(prefix): c for c in cases if self.root}
            by_key |= {c.id: c for c in cases}
            wanted = {w.removeprefix("./") for w in wanted}
            missing = sorted(w for w in wanted if w not in by_key)
            if missing:
                where = f" of {source}" if source else ""
                raise CatalogError(
                    f"{len(missing)} requested ids{where} match no image"
                    f"{f' under {self.root}' if self.root else ''}: {first_few(missing)}"
                )
            chosen = {by_key[w].id: by_key[w] for w in wanted}
            cases = tuple(chosen[i] for i in sorted(chosen))
        return cases if limit is None else cases[:limit]

    def summary(self) -> str:
        """One line: counts of images, labelled, unlabelled (with a few ids) and orphan masks."""
        unlabelled = [c.id for c in self.unlabelled]
        n_labelled = len(self.cases) - len(unlabelled)
        line = f"{len(self.cases)} images, {n_labelled} with masks, {len(unlabelled)} without"
        if unlabelled:
            line += f" (first few ids: {first_few(unlabelled)})"
        line = f"{line}, {len(self.orphan_masks)} masks without an image"
        if self.skipped:
            named = first_few([f"{uri} ({why})" for uri, why in self.skipped])
            line += f", {len(self.skipped)} files skipped: {named}"
        return line


@dataclass(frozen=True, slots=True)
class _File:  # a listed file; slotted, its stem kept: a million may be held at once
    uri: str
    folders: tuple[str, ...]  # directory components relative to the walked root, as named
    stem: str  # the file's name without its suffix
    suffix: str
    stamp: str  # "<size>:<mtime in ns>"

    @property
    def name(self) -> str:
        return self.stem + self.suffix

    @property
    def dirs(self) -> tuple[str, ...]:
        """The folders, lower-cased (layouts are recognised whatever the case)."""
        return tuple(d.lower() for d in self.folders)

    def path_id(self, stem: str, layout: frozenset[str]) -> str:
        """``stem`` below the folders that are not named like ``layout``'s: an id unique where
        stems clash."""
        return "/".join([*(d for d in self.folders if d.lower() not in layout), stem])


def check_root(uri: str, what: str, store: Store = DEFAULT_STORE) -> None:
    """Refuse a root of ``what`` (images, masks) that is not there or is not a folder: the
    catalog's first check, and cheap, so that the CLI makes it before starting anything."""
    kind = store.file_type(uri)
    if kind == pafs.FileType.NotFound:
        raise CatalogError(f"{what} root not found: {uri}")
    if kind != pafs.FileType.Directory:
        raise CatalogError(f"{what} root is not a directory: {uri}")


def _walk(uri: str, what: str, store: Store) -> tuple[list[_File], list[tuple[str, str]]]:
    """Every non-hidden file with an image suffix under ``uri``, recursively, and the files
    skipped as no image with the reason."""
    fs, root = store.resolve(uri)
    check_root(uri, what, store)
    scheme = urlparse(uri).scheme if is_remote(uri) else None
    skipped: list[tuple[str, str]] = []
    if scheme:
        with explained(uri):
            listing = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        found = [
            (i.path, f"{i.size}:{i.mtime_ns}") for i in listing if i.type == pafs.FileType.File
        ]
        skipped = [
            (f"{scheme}://{i.path}", "a folder, not an image file")
            for i in listing
            if i.type == pafs.FileType.Directory and _image_suffix(i.path)
        ]
    else:
        found = _local_files(root, what, uri, skipped)
    files = []
    for path, stamp in found:
        parts = path[len(root) :].lstrip("/").split("/")
        if any(p.startswith(".") for p in parts):
            continue
        stem, suffix = posixpath.splitext(parts[-1])
        shown = f"{scheme}://{path}" if scheme else path
        if not _image_suffix(path):
            if suffix:
                continue
            try:
                if not _is_dicom_file(fs, path, stem):
                    continue
            except OSError as exc:
                skipped.append((shown, f"could not be read to tell whether it is DICOM: {exc}"))
                continue
        folders = tuple(parts[:-1])
        files.append(_File(shown, folders, stem, sys.intern(suffix), stamp))
    for where, why in skipped:
        logger.warning("catalog: skipped %s: %s", where, why)
    return files, sorted(skipped)


def _image_suffix(path: str) -> bool:
    return posixpath.splitext(path.rstrip("/"))[1].lower() in IMAGE_SUFFIXES


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _local_files(
    root: str, what: str, uri: str, skipped: list[tuple[str, str]]
) -> Iterator[tuple[str, str]]:
    """The files under a local ``root`` (hidden ones left out) with their stamps, as they are
    found (a list of a million would be held beside their files). Folders are
    walked before the symbolic links to folders, and a link is followed only where it stays
    inside ``root`` and leads to a folder not walked yet (so never into a loop); every link
    skipped is named in a warning. Anything else named like an image (a FIFO, a socket, a
    device, a folder) goes to ``skipped`` with what it is. A name that is not UTF-8 is a
    :class:`CatalogError`."""
    top = os.path.realpath(root)
    walked, pending, links = {top}, [root], []
    while pending or links:
        if not pending:  # every real folder walked: now the links to folders, in order
            link = links.pop(0)
            target = os.path.realpath(link)
            if target in walked:
                logger.warning("catalog: skipped %s: a link to a folder already walked", link)
                continue
            walked.add(target)
            pending.append(link)
        with explained(uri):
            entries = sorted(os.scandir(pending.pop()), key=lambda e: e.name)
        for entry in entries:
            try:
                entry.name.encode()
            except UnicodeEncodeError:
                raise CatalogError(
                    f"{what} root {uri} holds a file name that is not UTF-8: "
                    f"{os.fsencode(entry.path)!r}; rename it"
                ) from None
            if entry.name.startswith("."):
                continue
            if entry.is_symlink() and not _inside(os.path.realpath(entry.path), top):
                logger.warning("catalog: skipped %s: a link out of the %s root", entry.path, what)
            elif entry.is_dir():
                if _image_suffix(entry.name):
                    skipped.append((entry.path, "a folder, not an image file"))
                if entry.is_symlink():
                    links.append(entry.path)
                else:
                    walked.add(os.path.realpath(entry.path))
                    pending.append(entry.path)
            elif entry.is_file():
                info = entry.stat()
                yield entry.path, f"{info.st_size}:{info.st_mtime_ns}"
            elif _image_suffix(entry.name):
                skipped.append((entry.path, f"not a regular file ({_kind(entry)})"))


def _kind(entry: os.DirEntry) -> str:
    """What a directory entry that is neither a file nor a folder is."""
    try:
        mode = entry.stat(follow_symlinks=False).st_mode
    except OSError:
        return "unreadable"
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a broken link" if stat.S_ISLNK(mode) else "not a file"


def _is_dicom_file(fs: pafs.FileSystem, path: str, name: str) -> bool:
    """True for a DICOM file by its preamble (reads 132 bytes); false for a ``DICOMDIR``."""
    if name.upper() == "DICOMDIR":
        return False
    with fs.open_input_file(path) as f:
        return is_dicom(f.read(132))


def _is_mask_stem(stem: str) -> bool:
    return stem.lower().endswith(_MASK_SUFFIX)


def _mask_id(stem: str) -> str:
    return stem[: -len(_MASK_SUFFIX)] if _is_mask_stem(stem) else stem


def _side(f: _File) -> str | None:
    """``left``/``right`` for a Montgomery half (innermost ``leftMask``/``rightMask`` dir)."""
    for d in reversed(f.dirs):
        if d in ("leftmask", "rightmask"):
            return d.removesuffix("mask")
    return None


def _pair_masks(case_id: str, masks: list[_File]) -> tuple[_File, ...]:
    """The mask files of one image: a single full mask or a complete left+right pair."""
    by_side = {_side(m): m for m in masks}
    if len(masks) == 1 and None in by_side:
        return (masks[0],)
    if len(masks) == 2 and set(by_side) == set(_SIDES):
        return tuple(by_side[s] for s in _SIDES)
    names = ", ".join(sorted(m.uri for m in masks))
    if len(masks) == 1:
        raise CatalogError(f"incomplete left/right mask pair for {case_id!r}: only {names}")
    raise CatalogError(f"ambiguous masks for {case_id!r}: {names}")


def find_cases(images: str, masks: str | None = None, store: Store = DEFAULT_STORE) -> Catalog:
    """Catalogue the images under ``images`` and pair them with their lung masks.

    With ``masks=None`` a file is a mask when a directory between it and the root is named
    ``masks``/``mask``/``ManualMask``/``leftMask``/``rightMask`` or its stem ends in ``_mask``
    (all case-insensitive); otherwise it is an image. With ``masks`` given, every file under it
    is a mask and every file under ``images`` is an image unless its stem ends in ``_mask``.
    Ids are image stems; images that share a stem get their paths as ids (see the module
    docstring). A mask's id is its stem without ``_mask`` (its path below the mask folders,
    for an image whose id is its path). Ids that differ only in case are distinct cases, with
    hashed output names (:func:`output_name`).
    """
    image_files: list[_File] = []
    mask_files: list[_File] = []
    found, skipped = _walk(images, "images", store)
    if masks is None:
        for f in found:
            is_mask = _is_mask_stem(f.stem) or any(d in _MASK_DIRS for d in f.dirs)
            (mask_files if is_mask else image_files).append(f)
    else:
        mask_files, more = _walk(masks, "masks", store)
        skipped = sorted({*skipped, *more})
        mask_uris = {m.uri for m in mask_files}
        for f in found:
            if f.uri in mask_uris:  # the masks root is nested inside the images root
                continue
            (mask_files if _is_mask_stem(f.stem) else image_files).append(f)
    if not image_files:
        suffixes = ", ".join(IMAGE_SUFFIXES)
        raise CatalogError(
            f"no images with suffixes {suffixes} (or suffix-less DICOM) found under {images}"
        )
    by_id, by_path = _image_ids(image_files)
    masks_by_id: dict[str, list[_File]] = defaultdict(list)
    for m in mask_files:
        key = _mask_id(m.stem)
        if key in by_id and key not in by_path:
            masks_by_id[key].append(m)
        else:
            masks_by_id[m.path_id(key, _MASK_DIRS | _IMAGE_DIRS)].append(m)
    hashed = _folded(by_id)
    cases = []
    for i in sorted(by_id):
        f = by_id[i]
        paired = _pair_masks(i, masks_by_id[i]) if i in masks_by_id else ()
        stamps = (f.stamp, *(m.stamp for m in paired))
        name = output_name(i, hashed=i in hashed)
        cases.append(Case(i, f.uri, tuple(m.uri for m in paired), name, stamps))
    _check_names(c.name for c in cases)
    orphans = sorted(m.uri for i, ms in masks_by_id.items() if i not in by_id for m in ms)
    root = store.resolve(images)[1]
    root = f"{urlparse(images).scheme}://{root}" if is_remote(images) else root
    return Catalog(tuple(cases), tuple(orphans), tuple(skipped), root)


def _image_ids(files: list[_File]) -> tuple[dict[str, _File], set[str]]:
    """Each image's id (its stem; its path where stems clash, with its suffix where even the
    paths clash) and the set of the ids made from paths."""
    by_id: dict[str, _File] = {}
    clashing: dict[str, list[_File]] = {}  # few: no list per unique stem (a million of them)
    for f in files:
        if f.stem in clashing:
            clashing[f.stem].append(f)
        elif f.stem in by_id:
            clashing[f.stem] = [by_id.pop(f.stem), f]
        else:
            by_id[f.stem] = f
    by_path: set[str] = set()
    for stem, group in clashing.items():
        paths = Counter(f.path_id(stem, _IMAGE_DIRS) for f in group)
        for f in group:
            key = f.path_id(stem, _IMAGE_DIRS)
            key = key if paths[key] == 1 else f.path_id(f.name, _IMAGE_DIRS)
            if key in by_id:
                raise CatalogError(
                    f"image ids must be unique, and these files would share {key!r}: "
                    f"{by_id[key].uri}, {f.uri}"
                )
            by_id[key] = f
            by_path.add(key)
    return by_id, by_path


def split_ids(ids: Iterable[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Split ids into sorted ``(train, val)`` lists, the same on every run and machine.

    Ids are ranked by the SHA-256 of their UTF-8 bytes and the first ``ceil(val_fraction * n)``
    go to val, kept within ``[1, n - 1]`` when ``val_fraction > 0`` so train is never empty.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    ids = list(ids)
    dupes = sorted(i for i, k in Counter(ids).items() if k > 1)
    if dupes:
        raise ValueError(f"duplicate ids: {', '.join(dupes)}")
    n = len(ids)
    # round() first so that e.g. 0.1 * 30 == 3.0000000000000004 gives 3, not 4
    n_val = min(math.ceil(round(val_fraction * n, 9)), n - 1) if n else 0
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    ranked = sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())
    return sorted(ranked[n_val:]), sorted(ranked[:n_val])


def read_ids(uri: str, store: Store) -> tuple[str, ...]:
    """The entries of an ids file (``--ids``): one id or relative image path a line, blank
    lines and lines starting with ``#`` left out (an id may hold a ``#``); a file of none is
    a :class:`CatalogError`."""
    try:
        text = store.read_bytes(uri).decode()
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{uri}: not a text file of ids ({exc})") from exc
    ids = tuple(entry for line in text.splitlines() if (entry := line.strip()) and entry[0] != "#")
    if not ids:
        raise CatalogError(f"{uri}: no ids in it (one id or relative path a line)")
    return ids


def read_split(uri: str, store: Store) -> dict[str, list[str]]:
    """A split file's lists of ids by subset name (``{"train": [...], "val": [...]}``); other
    entries that are text (a ``description``) are left out."""
    try:
        split = json.loads(store.read_bytes(uri))
    except ValueError as exc:
        raise CatalogError(f"{uri}: not a JSON split file ({exc})") from exc
    subsets = (
        {name: ids for name, ids in split.items() if not isinstance(ids, str)}
        if isinstance(split, dict)
        else {}
    )
    if not subsets or not all(
        isinstance(ids, list) and all(isinstance(i, str) for i in ids) for ids in subsets.values()
    ):
        raise CatalogError(f"{uri}: a split file maps subset names to lists of ids")
    return subsets
