"""The master workbook (one worksheet, a `Folder Name` category column, the FADA team's 14
categories): detection, the split by category, categories missing from the job, awaiting
labels, and the same per-row checks as per-category sheets."""

from __future__ import annotations

from pathlib import Path

import openpyxl
import pytest
from PIL import Image

from fada_batch.config import config_from_dict
from fada_batch.data.categories import (
    CATEGORY_NAMES,
    DEFAULT_WORKBOOK,
    IMAGES_DIR,
    LABELS_DIR,
    STANDARD_QUESTIONS,
    get_category,
)
from fada_batch.data.dataset import has_labels, load_category, load_workbook
from fada_batch.data.validate import format_table, preflight
from fada_batch.data.workbook import read_workbook, resolve_labels_form

HEADER = [
    "Folder Name",
    "Image Name",
    "Q1: Anatomical Structures",
    "Q2: Fetal Orientation",
    "Q3: Imaging Plane",
    "Q4: Biometric Measurements",
    "Q5: Gestational Age",
    "Q6: Image Quality",
    "Q7: Normality Assessment",
    "Q8: Clinical Recommendations",
]
ANSWERS = ["spine, stomach", "cephalic", "standard", "AC", "20 weeks", "good", "normal", "routine"]
PER_CATEGORY = 3


def make_master(
    root: Path, categories: tuple[str, ...] = CATEGORY_NAMES, extra_rows: list[list[object]] = ()
) -> Path:  # type: ignore[assignment]
    """A master workbook with PER_CATEGORY rows (and images) per category, plus extra rows."""
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(HEADER)
    for name in categories:
        folder = root / IMAGES_DIR / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(PER_CATEGORY):
            image = f"{name}_{i:03d}.png"
            Image.new("L", (16, 12), 80 + i).save(folder / image)
            ws.append([name, image, *ANSWERS])
    for row in extra_rows:
        ws.append(row)
    path = root / DEFAULT_WORKBOOK
    wb.save(path)
    return path


def job(root: Path, **data: object) -> object:
    return config_from_dict({"data": {"root": str(root), **data}, "output": {"root": str(root / "out")}})


def test_fourteen_categories_by_default() -> None:
    assert len(CATEGORY_NAMES) == 14
    assert get_category("Cervical").name == "Cervical"  # a category of its own, not Cervix
    assert get_category("transcerebellar plane").name == "Trans-cerebellum"
    assert get_category("Trans-cerebellum").display_name == "Transcerebellar Plane"


def test_master_workbook_split_into_fourteen_categories(tmp_path: Path) -> None:
    path = make_master(tmp_path)
    cats = [get_category(n) for n in CATEGORY_NAMES]
    book = read_workbook(path, cats)
    assert sorted(book.sheets) == sorted(CATEGORY_NAMES)
    assert book.rows_read == 14 * PER_CATEGORY and not book.problems and not book.not_in_job
    femur = book.sheet_for(get_category("Femur"))
    first = 2 + CATEGORY_NAMES.index("Femur") * PER_CATEGORY
    assert femur is not None and [r.row for r in femur.rows] == [first, first + 1, first + 2]  # workbook rows
    # the team's short titles ("Q3: Imaging Plane") are titles: the prompts use the standard questions
    assert femur.questions == list(STANDARD_QUESTIONS) and not any(femur.questions_from_sheet)
    assert not femur.problems  # the Folder Name column is no "extra column"


def test_auto_detects_the_workbook_and_per_category_sheets_win(tmp_path: Path) -> None:
    assert resolve_labels_form(tmp_path, "auto", DEFAULT_WORKBOOK) is None
    path = make_master(tmp_path)
    assert resolve_labels_form(tmp_path, "auto", DEFAULT_WORKBOOK) == path
    assert resolve_labels_form(tmp_path, "per_category", DEFAULT_WORKBOOK) is None
    (tmp_path / LABELS_DIR).mkdir()
    openpyxl.Workbook().save(tmp_path / LABELS_DIR / "Femur_image_list.xlsx")
    assert resolve_labels_form(tmp_path, "auto", DEFAULT_WORKBOOK) is None
    assert resolve_labels_form(tmp_path, "workbook", DEFAULT_WORKBOOK) == path


def test_preflight_reports_categories_not_in_job_and_awaiting_labels(tmp_path: Path) -> None:
    # the workbook has 13 categories (no Aorta) plus a misspelt one; the job lists 12 of the
    # 14 (not Thorax nor Femur): Aorta awaits labels, Thorax, Femur and the misspelt one are reported
    present = tuple(n for n in CATEGORY_NAMES if n != "Aorta")
    make_master(tmp_path, present, extra_rows=[["Abdomenn", "x.png", *ANSWERS], [None, "y.png", *ANSWERS]])
    listed = [n for n in CATEGORY_NAMES if n not in ("Thorax", "Femur")]
    pf = preflight(job(tmp_path, categories=listed))  # type: ignore[arg-type]
    status = {d.category.name: d.status for d in pf.results}
    assert status.pop("Aorta") == "awaiting_labels"
    assert set(status.values()) == {"ok"} and len(status) == 11
    assert all(d.stats.images_usable == PER_CATEGORY for d in pf.ready)
    not_in_job = {p.value: p for p in pf.workbook_problems if p.code == "workbook_category_not_in_job"}
    assert set(not_in_job) == {"Thorax", "Femur", "Abdomenn"}
    assert "3 rows of category 'Thorax'" in not_in_job["Thorax"].message
    assert "add 'Thorax' to data.categories" in not_in_job["Thorax"].message
    assert "no known category or alias" in not_in_job["Abdomenn"].message
    assert [p.row for p in pf.workbook_problems if p.code == "empty_category"] == [
        3 + 13 * PER_CATEGORY
    ]  # after the header, 39 rows, Abdomenn
    table = format_table(pf)
    assert "labels from the master workbook" in table and "'Abdomenn'" in table
    assert "11 ready, 1 awaiting labels, 0 blocked" in table


def test_per_row_checks_apply_to_workbook_rows(tmp_path: Path) -> None:
    rows = [["Femur", "Femur_000.png", *ANSWERS], ["Femur", "missing.png", *ANSWERS]]
    make_master(tmp_path, ("Femur", "Thorax"), extra_rows=rows)
    femur = get_category("Femur")
    book = load_workbook(tmp_path, "auto", DEFAULT_WORKBOOK, [femur])
    data = load_category(tmp_path, femur, workbook=book)
    codes = sorted(p.code for p in data.problems)
    assert codes == ["duplicate_row", "image_missing"]
    missing = next(p for p in data.problems if p.code == "image_missing")
    assert missing.row == 9 and DEFAULT_WORKBOOK in missing.message
    assert data.status == "ok" and data.stats.images_usable == PER_CATEGORY


def test_workbook_without_category_column_blocks_every_category(tmp_path: Path) -> None:
    wb = openpyxl.Workbook()
    wb.active.append(HEADER[1:])
    wb.save(tmp_path / DEFAULT_WORKBOOK)
    pf = preflight(job(tmp_path, categories=["Femur", "Thorax"]))  # type: ignore[arg-type]
    assert [d.status for d in pf.results] == ["error", "error"]
    assert pf.results[0].errors[0].code == "missing_category_column"
    assert "Folder Name" in pf.results[0].errors[0].message


def test_forced_workbook_that_is_missing_is_an_error(tmp_path: Path) -> None:
    (tmp_path / IMAGES_DIR).mkdir()
    pf = preflight(job(tmp_path, categories=["Femur"], labels="workbook", workbook="labels.xlsx"))  # type: ignore[arg-type]
    assert pf.results[0].status == "error"
    err = pf.results[0].errors[0]
    assert err.code == "workbook_missing" and "labels.xlsx" in err.message and "data.workbook" in err.message


@pytest.mark.parametrize(("labels", "expected"), [("auto", True), ("per_category", False)])
def test_has_labels_follows_the_labels_form(tmp_path: Path, labels: str, expected: bool) -> None:
    make_master(tmp_path, ("Femur",))
    assert has_labels(tmp_path, get_category("Femur"), labels=labels) is expected
    assert has_labels(tmp_path, get_category("Aorta"), labels=labels) is False


def test_job_aliases_match_workbook_values_and_are_checked(tmp_path: Path) -> None:
    """data.category_aliases: the job's own names for a category (a workbook spelling here);
    an alias that names another category, or an unknown category, is refused."""
    from fada_batch.config import ConfigError

    make_master(tmp_path, ("Femur",), extra_rows=[["FL view", "Femur_000.png", *ANSWERS]])
    plain = preflight(job(tmp_path, categories=["Femur"]))  # type: ignore[arg-type]
    assert [p.value for p in plain.workbook_problems] == ["FL view"]
    pf = preflight(job(tmp_path, categories=["Femur"], category_aliases={"Femur": ["FL view"]}))  # type: ignore[arg-type]
    assert not pf.workbook_problems
    assert [p.code for p in pf.results[0].problems] == ["duplicate_row"]  # the row now counts as Femur's
    with pytest.raises(ConfigError, match="already names Thorax"):
        job(tmp_path, category_aliases={"Femur": ["Chest"]})
    with pytest.raises(ConfigError, match="Unknown category 'Kidney'"):
        job(tmp_path, category_aliases={"Kidney": ["K"]})


def test_workbook_header_is_found_like_a_sheets_header(tmp_path: Path) -> None:
    """One header parser for both forms: a title row above the header and an image column
    headed 'Image File' (a header per-category sheets accept) work in the workbook too."""
    from fada_batch.data.sheets import find_header

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["FADA annotations, export of 2025-06"])
    ws.append(["Folder Name", "Image File", *HEADER[2:]])
    folder = tmp_path / IMAGES_DIR / "Femur"
    folder.mkdir(parents=True)
    Image.new("L", (16, 12), 80).save(folder / "a.png")
    ws.append(["Femur", "a.png", *ANSWERS])
    wb.save(tmp_path / DEFAULT_WORKBOOK)
    rows = [tuple(r) for r in wb.active.iter_rows(values_only=True)]
    assert find_header(rows) == 1
    book = read_workbook(tmp_path / DEFAULT_WORKBOOK, [get_category("Femur")])
    assert not book.problems, [p.message for p in book.problems]
    femur = book.sheet_for(get_category("Femur"))
    assert femur is not None and femur.header_row == 2 and [r.row for r in femur.rows] == [3]


def test_validate_json_carries_the_workbook_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`validate --json` holds what the text shows: the workbook's categories that the job
    does not list, rows without a category, split-file entries unknown or listed twice."""
    import json

    from fada_batch.cli import main
    from fada_batch.config import dump_yaml
    from tests.test_given_split import team_split

    make_master(tmp_path, ("Femur", "Thorax"), extra_rows=[[None, "y.png", *ANSWERS]])
    team_split(tmp_path, extra_test=["Femur/ghost.png", "Femur/Femur_001.png"])
    cfg = job(tmp_path, categories=["Femur", "Aorta"], split_file="dataset_splits.json")
    cfg.output.root = str(tmp_path / "out")  # type: ignore[attr-defined]
    (tmp_path / "job.yaml").write_text(dump_yaml(cfg))  # type: ignore[arg-type]
    assert main(["validate", "--job", str(tmp_path / "job.yaml")]) == 0
    text = capsys.readouterr().out
    assert main(["validate", "--job", str(tmp_path / "job.yaml"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    book = report["workbook"]
    assert book["path"] == str(tmp_path / DEFAULT_WORKBOOK)
    codes = {(p["code"], p.get("value")) for p in book["problems"]}
    assert codes == {("workbook_category_not_in_job", "Thorax"), ("empty_category", None)}
    thorax = next(p for p in book["problems"] if p["code"] == "workbook_category_not_in_job")
    assert thorax["message"] in text and "add 'Thorax' to data.categories" in thorax["message"]
    femur, aorta = report["categories"]
    assert (femur["status"], aorta["status"]) == ("ok", "awaiting_labels")
    assert {p["code"] for p in femur["problems"]} == {"split_image_unknown", "split_image_duplicate"}
    assert report["summary"] == {"ready": 1, "awaiting_labels": 1, "blocked": 0}
    assert report["nothing_ready"] is None
    assert report["normalization"]["level"] == "clean"
