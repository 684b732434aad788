"""benchmarks/tables.py: every results table in README.md and docs/ is what the committed long tables give."""

import os

import pytest

from benchmarks import tables
from benchmarks.common import ROOT


def test_every_generated_block_equals_its_table_from_the_committed_results() -> None:
    made = tables.used_tables()
    for path in tables.DOCUMENTS:
        text = tables.read(path)
        assert tables.fill_blocks(text, made) == text, f"{path}: run python -m benchmarks.tables --write"


def test_the_readme_shows_the_verdict_and_the_missing_labels_from_the_long_tables() -> None:
    names = {match["name"] for match in tables.BLOCK.finditer(tables.read("README.md"))}
    assert {"distill-claims-short", "missing-labels-short", "calibration-short", "long-tail-short",
            "heads-pretrained-short"} <= names
    for name in names:
        assert os.path.isfile(os.path.join(ROOT, "benchmarks", "results", tables.SOURCES[name] + ".csv"))


def test_fill_blocks_replaces_only_the_body_and_refuses_an_unknown_table() -> None:
    text = "before\n<!-- table: a -->\nold\nrows\n<!-- end table -->\nafter <!-- table: b -->\nx\n<!-- end table -->\n"
    assert tables.fill_blocks(text, {"a": "| new |\n", "b": "y\n"}) == (
        "before\n<!-- table: a -->\n| new |\n<!-- end table -->\nafter <!-- table: b -->\ny\n<!-- end table -->\n")
    with pytest.raises(KeyError, match="table: b -->: no such table"):
        tables.fill_blocks(text, {"a": ""})
