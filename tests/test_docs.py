"""The documentation site says what the code does: every table's columns as its schema has
them, every page in the navigation, the site built strictly (in CI, by .ci/run)."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from lungseg.jobs.clean import SCHEMA as CLEAN_SCHEMA
from lungseg.jobs.segment import SCHEMA as SEGMENT_SCHEMA
from lungseg.runs.runfolder import DATA_SCHEMA

DOCS = Path(__file__).resolve().parents[1] / "docs"
CONFIG = DOCS.parent / ".docs" / "mkdocs.yml"
_TYPES = {pa.string(): "string", pa.int32(): "int32", pa.int64(): "int64",
          pa.float64(): "float64", pa.bool_(): "bool"}  # fmt: skip


def _columns(page: str, after: str = "") -> list[tuple[str, str]]:
    """``(column, type)`` of the first ``| column | type | meaning |`` table of a page (the
    first after the text ``after``), one per name in a row's first cell."""
    text = (DOCS / page).read_text()
    text = text[text.index(after) :] if after else text
    table = text[text.index("| column | type | meaning |") :].split("\n\n", 1)[0]
    found = []
    for line in table.splitlines()[2:]:
        names, kind = line.split("|")[1:3]
        found += [(name, kind.strip()) for name in re.findall(r"`([a-z_0-9]+)`", names)]
    return found


@pytest.mark.parametrize(
    ("page", "after", "schema"),
    [
        ("segment.md", "", SEGMENT_SCHEMA),
        ("clean.md", "", CLEAN_SCHEMA),
        ("train.md", "`data.parquet`:", DATA_SCHEMA),
    ],
)
def test_each_tables_columns_are_documented_as_its_schema_has_them(page, after, schema):
    documented = _columns(page, after)
    assert len(documented) == len(set(documented)), "a column documented twice"
    assert sorted(documented) == sorted((f.name, _TYPES[f.type]) for f in schema)


def _nav_pages(items) -> list[str]:
    pages = []
    for item in items:
        for value in item.values() if isinstance(item, dict) else [item]:
            pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_page_is_reachable_from_the_navigation():
    config = yaml.safe_load(CONFIG.read_text().replace("!!python", "#"))
    listed = _nav_pages(config["nav"])
    assert sorted(set(listed)) == sorted(p.name for p in DOCS.glob("*.md"))
    assert len(listed) == len(set(listed)), "a page listed twice"
