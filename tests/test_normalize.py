"""Answer normalisation (`data.normalize`): the layers, their tables as package data, every fix
counted, and the counts in `validate`, on a generated 14-category master workbook with the
FADA team's misspellings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fada_batch.config import config_from_dict, fingerprint_hash, normalize_level, training_fingerprint
from fada_batch.data.categories import CATEGORY_NAMES, DEFAULT_WORKBOOK, get_category
from fada_batch.data.dataset import load_category
from fada_batch.data.normalize import LEVELS, TABLES, Normalizer, load_tables
from fada_batch.data.validate import format_table, preflight
from fada_batch.data.workbook import read_workbook
from tests.test_workbook import make_master

# one row per category in the workbook gets these answers on top of the plain ones
NOISY = [
    [
        "Vertebrea and stomach  seen.",
        "Breach",
        "sagital view",
        "AC",
        "20 -25weeks",
        "good",
        "normal",
        "Routine montoring",
    ],
    [
        "Vertebrea and stomach seen",
        "cephalic position",
        "sagittal view",
        "AC",
        "20-25 weeks",
        "Good quality",
        "Normal",
        "Routine monitoring",
    ],
]


def noisy_master(root: Path) -> Path:
    rows = [[name, f"{name}_000.png", *NOISY[i % 2]] for i, name in enumerate(CATEGORY_NAMES)]
    path = make_master(root)
    # replace the first row of each category with a noisy one: same image, so counted once
    import openpyxl

    wb = openpyxl.load_workbook(path)
    ws = wb.active
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            ws.cell(row=2 + i * 3, column=1 + j, value=value)
    wb.save(path)
    return path


def test_tables_are_package_data_and_every_fix_maps_to_a_word() -> None:
    for name in ("spelling.json", "canonical.json"):
        assert (TABLES / name).is_file()
        json.loads((TABLES / name).read_text("utf-8"))
    tables = load_tables()
    assert tables.spelling["probablity"] == "probability" and tables.spelling["symphsis"] == "symphysis"
    assert all(" " not in k and k != v for k, v in tables.spelling.items())


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("none", "Breach  presentation."),
        ("clean", "Breach presentation"),
        ("spelling", "Breech presentation"),
        ("canonical", "Breech presentation"),
    ],
)
def test_each_level_includes_the_ones_before(level: str, expected: str) -> None:
    assert Normalizer(level)(1, "Breach  presentation.") == expected


def test_layers_are_counted_per_fix_and_case_is_kept() -> None:
    n = Normalizer("canonical")
    assert (
        n(0, "Veiw of the SYMPHSIS, probablity of probablity")
        == "View of the SYMPHYSIS, probability of probability"
    )
    assert n(1, "cephalic position") == "Cephalic presentation"
    assert n(4, "20 -25weeks") == "20-25 weeks" and n(4, "13w") == "13 weeks"
    assert n(4, "25-30") == "25-30 weeks"
    assert n(2, "breachfast") == "breachfast"  # whole words only
    fixes = {(a, b): c for layer, a, b, c in n.report.top_fixes(50) if layer == "spelling"}
    assert fixes[("probablity", "probability")] == 1  # counted per cell, not per occurrence
    assert fixes[("veiw", "view")] == 1 and fixes[("symphsis", "symphysis")] == 1
    assert n.report.cells_changed["canonical"] == 4


def test_unknown_level_and_broken_table_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.normalize must be one of none, clean, spelling, canonical"):
        Normalizer("fuzzy")
    (tmp_path / "spelling.json").write_text("{not json")
    (tmp_path / "canonical.json").write_text("{}")
    with pytest.raises(ValueError, match=r"spelling\.json"):
        load_tables.__wrapped__(tmp_path)


def test_workbook_misspellings_counted_per_layer(tmp_path: Path) -> None:
    path = noisy_master(tmp_path)
    cats = [get_category(n) for n in CATEGORY_NAMES]
    counts = {}
    for level in LEVELS:
        book = read_workbook(path, cats, normalize=level)
        total = book.sheets["Abdomen"].normalization
        for name in CATEGORY_NAMES[1:]:
            total.merge(book.sheets[name].normalization)
        counts[level] = total
    raw = counts["none"].unique_after()
    assert raw == counts["canonical"].unique_before()  # before = the cells as written
    clean, spelled, canon = (counts[x].unique_after() for x in ("clean", "spelling", "canonical"))
    assert all(c <= r for c, r in zip(clean, raw, strict=True)) and sum(clean) < sum(raw)
    assert sum(spelled) < sum(clean) and sum(canon) < sum(spelled)
    # Q2: "Breach" (7 rows), "cephalic position" (7), "cephalic" (28 plain rows) -> 2 forms
    assert raw[1] == 3 and canon[1] == 2
    spelling = {(a, b): c for layer, a, b, c in counts["spelling"].top_fixes(50) if layer == "spelling"}
    assert spelling == {
        ("vertebrea", "vertebrae"): 14,
        ("breach", "breech"): 7,
        ("sagital", "sagittal"): 7,
        ("montoring", "monitoring"): 7,
    }
    assert counts["clean"].cells_changed["clean"] == 7  # the double space and final period of Q1
    assert "spelling" not in counts["clean"].cells_changed


def test_validate_and_training_data_use_the_job_level(tmp_path: Path) -> None:
    noisy_master(tmp_path)
    cfg = config_from_dict(
        {"data": {"root": str(tmp_path), "normalize": "canonical"}, "output": {"root": str(tmp_path / "out")}}
    )
    pf = preflight(cfg)
    table = format_table(pf)
    assert "answers normalised (canonical):" in table and "Q2 3->2" in table
    assert "'breach' -> 'breech'" in table
    data = load_category(
        tmp_path,
        get_category("Abdomen"),
        workbook=read_workbook(tmp_path / DEFAULT_WORKBOOK, [get_category("Abdomen")], normalize="canonical"),
    )
    first = data.records[0].answers
    assert (
        first[1] == "Breech presentation" and first[4] == "20-25 weeks" and first[7] == "Routine monitoring"
    )
    assert data.to_dict()["normalization"]["level"] == "canonical"


def test_fingerprint_unchanged_for_clean_and_changed_by_other_levels() -> None:
    base = config_from_dict({})
    assert "data.normalize" not in training_fingerprint(base)  # old runs still resume
    for level in ("none", "spelling", "canonical"):
        cfg = config_from_dict({"data": {"normalize": level}})
        assert training_fingerprint(cfg)["data.normalize"] == level
        assert fingerprint_hash(training_fingerprint(cfg)) != fingerprint_hash(training_fingerprint(base))
    off = config_from_dict({"data": {"clean_answers": False, "normalize": "canonical"}})
    assert normalize_level(off.data) == "none"


def test_evaluation_scores_predictions_normalised_like_the_references() -> None:
    from fada_batch.data.samples import Sample
    from fada_batch.evaluation.evaluate import scored_rows

    sample = Sample(image="a.png", question_index=1, prompt="p", answer="Breech presentation")
    rows = [{"adapter_prediction": "breach", "base_prediction": "cephalic", "majority_prediction": ""}]
    got = scored_rows([sample], rows, "adapter", "canonical")
    assert got == [{"question": 1, "reference": "Breech presentation", "prediction": "Breech presentation"}]
    assert scored_rows([sample], rows, "adapter", "clean")[0]["prediction"] == "breach"  # as before


def test_training_samples_and_summary_use_the_normalised_answers(tmp_path: Path) -> None:
    from fada_batch.data.samples import prepare_data
    from fada_batch.training.recipe import _data_counts

    noisy_master(tmp_path)
    cfg = config_from_dict(
        {
            "data": {"root": str(tmp_path), "normalize": "canonical", "categories": ["Abdomen"]},
            "output": {"root": str(tmp_path / "out")},
        }
    )
    (tmp_path / "out").mkdir()
    cs = prepare_data(cfg, get_category("Abdomen"), tmp_path / "out", resuming=False)
    answers = {s.answer for s in cs.train + cs.val + cs.test}
    assert "Breech presentation" in answers and "Breach" not in answers
    assert "Routine monitoring" in answers and "Routine montoring" not in answers
    summary = _data_counts(cs)["normalization"]
    assert summary["level"] == "canonical"
    assert {"layer": "spelling", "from": "breach", "to": "breech", "cells": 1} in summary["top_fixes"]
    json.dumps(summary)  # goes into training_summary.json as is
