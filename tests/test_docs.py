"""The README's map stays true: its table of pass facts equals what the passes declare."""

from __future__ import annotations

from pathlib import Path

from qcompile.passes.base import PASSES

README = Path(__file__).resolve().parents[1] / "README.md"


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def test_readme_facts_table_matches_the_passes():
    text = README.read_text(encoding="utf-8")
    table = text.split("<!-- facts-table -->")[1].split("<!-- /facts-table -->")[0]
    rows = [_cells(r) for r in table.strip().splitlines()[2:]]
    want = [
        [
            f"`{name}`",
            *(", ".join(sorted(f.value for f in facts)) for facts in (cls.requires, cls.provides, cls.invalidates)),
        ]
        for name, cls in sorted(PASSES.items())
    ]
    assert rows == want
