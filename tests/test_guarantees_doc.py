"""docs/guarantees.md maps the README's guarantees to tests: every test it names exists, the
README links it from its Reliability section, and the README counts no tests by hand (a
count goes stale with the next test; `make test` prints the real one)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TABLE = REPO / "docs" / "guarantees.md"


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_test_named_in_the_table_exists():
    named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", TABLE.read_text())
    assert len(named) > 50, "the table names tests as `file.py::test_name`"
    missing = [
        f"{file}::{name}"
        for file, name in named
        if not (REPO / "tests" / file).is_file() or name not in _test_functions(REPO / "tests" / file)
    ]
    assert not missing, f"docs/guarantees.md names tests that do not exist: {missing}"


def test_readme_links_the_table_and_counts_no_tests():
    readme = (REPO / "README.md").read_text()
    reliability = readme.split("## Reliability", 1)[1].split("\n## ", 1)[0]
    assert "(docs/guarantees.md)" in reliability
    counts = re.findall(r"\b\d[\d,]*\s+(?:tests|test cases)\b", readme, flags=re.IGNORECASE)
    assert not counts, f"hand-written test counts in README.md: {counts}"
