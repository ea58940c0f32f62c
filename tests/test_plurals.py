"""Counted nouns in messages and reports: "1 epoch", "3 epochs", never "1 epochs" or "epoch(s)"."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from fada_batch.config import ConfigError, config_from_dict
from fada_batch.run.collect import collect
from fada_batch.run.launch import Plan
from fada_batch.run.report import render_markdown
from fada_batch.text import plural

PACKAGE = Path(__file__).resolve().parent.parent / "fada_batch"


@pytest.mark.parametrize(
    ("n", "noun", "form", "text"),
    [
        (1, "epoch", None, "1 epoch"),
        (0, "epoch", None, "0 epochs"),
        (3, "epoch", None, "3 epochs"),
        (1, "category", "categories", "1 category"),
        (2, "category", "categories", "2 categories"),
        (1.0, "step", None, "1.0 step"),
    ],
)
def test_plural(n, noun, form, text):
    assert plural(n, noun, form) == text


def _message_strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string and f-string in a module, f-strings as written."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.JoinedStr):
            out.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append((node.lineno, node.value))
    return out


# "image(s)"; a len() count before a plural noun, which reads "1 images" for one
HEDGED = re.compile(r"[a-z]\(s\)")
BLIND_COUNT = re.compile(r"\{len\([^{}]*\)\} (?:held-out |[a-z]+/[a-z]+ )?[a-z]+s\b")


def test_no_message_hedges_a_plural_or_counts_one_as_many():
    found = []
    for path in sorted(PACKAGE.glob("**/*.py")):
        for line, text in _message_strings(path):
            if HEDGED.search(text) or BLIND_COUNT.search(text):
                found.append(f"{path.name}:{line}: {text}")
    assert not found, "use fada_batch.text.plural(n, noun):\n" + "\n".join(found)


def test_the_guard_catches_what_it_should():
    assert HEDGED.search("f'{n} image(s) cannot be read'")
    assert BLIND_COUNT.search("f'{len(cats)} categories ({x})'")
    assert BLIND_COUNT.search("f'{category} has {len(samples)} question/answer pairs'")
    assert BLIND_COUNT.search("f'{len(rows)} held-out images'")
    assert not BLIND_COUNT.search('f\'{plural(len(cats), "category", "categories")}\'')


def test_one_of_each_reads_in_the_singular(tmp_path):
    plan = Plan(
        submit=["Femur"],
        sizes={"Femur": 1},
        awaiting=[],
        blocked={},
        requested=["Femur"],
        executor="local",
        log_dir=tmp_path / "logs",
        output_root=tmp_path,
    )
    assert "1 task to run, in this order: Femur (1 image)" in plan.describe()

    folder = tmp_path / "blip2_femur"
    folder.mkdir()
    summary = {"schema_version": 1, "status": "completed", "category": "Femur", "epochs": 1, "steps": 1}
    (folder / "training_summary.json").write_text(json.dumps(summary))
    result = collect(tmp_path, categories=["Femur"])
    assert result.categories[0].detail.startswith("1 step, 1 epoch")
    assert "1 of 1 category done" in render_markdown(result.to_dict())

    with pytest.raises(ConfigError, match=r"^<dict>: 1 problem in the job config:"):
        config_from_dict({"train": {"num_epochs": 0}})
