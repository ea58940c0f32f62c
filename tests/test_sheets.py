"""Label sheets: header styles, question texts, answer clean-up, and one test per problem.

Every sheet is a real .xlsx written with openpyxl or pandas under a folder whose name has
spaces, like the real `Fetal Ultrasound Labeled/`. Problem tests assert the message a user
reads: the file, the Excel row, the column, the value and the words of the fix.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import openpyxl
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fada_batch.data.categories import LABELS_DIR, STANDARD_QUESTIONS
from fada_batch.data.problems import CODES, Problem
from fada_batch.data.sheets import read_sheet

BARE = ["Image Name"] + [f"Q{i}" for i in range(1, 9)]
ANSWERS = [f"answer {i}" for i in range(1, 9)]


@pytest.fixture()
def labels(tmp_path: Path) -> Path:
    """`<root>/Fetal Ultrasound Labeled/` under a root with spaces and a quote."""
    folder = tmp_path / "it's my data" / LABELS_DIR
    folder.mkdir(parents=True)
    return folder


def write_xlsx(
    path: Path, rows: list[list[object]], *, more: dict[str, list[list[object]]] | None = None
) -> Path:
    """Write `rows` to the first worksheet ("Sheet1") and `more` to further worksheets."""
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "Sheet1"
    for r in rows:
        ws.append(r)
    for title, extra_rows in (more or {}).items():
        extra = wb.create_sheet(title)
        for r in extra_rows:
            extra.append(r)
    wb.save(path)
    return path


def only(problems: list[Problem], code: str) -> Problem:
    """The single problem with `code`."""
    found = [p for p in problems if p.code == code]
    assert len(found) == 1, [str(p) for p in problems]
    return found[0]


def codes(problems: list[Problem]) -> set[str]:
    return {p.code for p in problems}


# ----------------------------------------------------------------------------- header styles


def test_bare_headers_use_standard_questions(labels: Path) -> None:
    path = write_xlsx(labels / "Femur_image_list.xlsx", [BARE, ["img_001.png", *ANSWERS]])
    sheet = read_sheet(path)
    assert sheet.ok and sheet.problems == []
    assert sheet.questions == list(STANDARD_QUESTIONS)
    assert sheet.questions_from_sheet == [False] * 8
    assert sheet.header_row == 1
    assert [(r.row, r.image_name, r.answers) for r in sheet.rows] == [(2, "img_001.png", ANSWERS)]


def test_newline_header_text_is_the_prompt_untruncated(labels: Path) -> None:
    long_q = "Describe, in full detail, " + "every structure you can see " * 20 + "in this view?"
    header = ["Image Name", f"Q1:\n{long_q}", "Q2:\n  Where   is the\nfetus?", *BARE[3:]]
    path = write_xlsx(labels / "Femur_image_list.xlsx", [header, ["a", *ANSWERS]])
    sheet = read_sheet(path)
    assert sheet.ok, sheet.problems
    assert sheet.questions[0] == " ".join(long_q.split())  # whitespace collapsed, never cut
    assert len(sheet.questions[0]) > 500
    assert sheet.questions[1] == "Where is the fetus?"
    assert sheet.questions[2:] == list(STANDARD_QUESTIONS[2:])
    assert sheet.questions_from_sheet == [True, True] + [False] * 6


def test_title_only_header_uses_the_full_standard_question(labels: Path) -> None:
    header = ["Image Name", "Q1: Anatomical Structures", "Q2: Fetal Orientation:", *BARE[3:]]
    path = write_xlsx(labels / "Femur_image_list.xlsx", [header, ["a", *ANSWERS]])
    sheet = read_sheet(path)
    assert sheet.ok, sheet.problems
    assert sheet.questions[:2] == list(STANDARD_QUESTIONS[:2])


def test_header_case_and_space_variants(labels: Path) -> None:
    header = [
        "image_name",
        "q1 :",
        "Q 2 - Which way does it face?",
        "Question 3: Standard plane?",
        "Q04",
        "Q5.",
        "q6",
        "Q7)",
        "Q8",
    ]
    path = write_xlsx(labels / "Femur_image_list.xlsx", [header, ["a", *ANSWERS]])
    sheet = read_sheet(path)
    assert sheet.ok and sheet.problems == []
    assert sheet.questions[1] == "Which way does it face?"
    assert sheet.questions[2] == "Standard plane?"
    assert sheet.questions[0] == STANDARD_QUESTIONS[0]
    assert sheet.rows[0].answers == ANSWERS


def test_header_cells_that_are_not_text(labels: Path) -> None:
    header = [*BARE, 2024, dt.datetime(2024, 5, 1), 3.5, True]
    path = write_xlsx(labels / "Femur_image_list.xlsx", [header, ["a", *ANSWERS, 1, 2, 3, 4]])
    sheet = read_sheet(path)
    assert sheet.ok
    extra = [p for p in sheet.problems if p.code == "extra_column"]
    assert [p.column for p in extra] == ["2024", "2024-05-01T00:00:00", "3.5", "TRUE"]
    assert "(J)" in extra[0].message


def test_title_row_above_the_header_keeps_excel_row_numbers(labels: Path) -> None:
    path = write_xlsx(labels / "Femur_image_list.xlsx", [["Femur labels, v2"], BARE, ["a", *ANSWERS]])
    sheet = read_sheet(path)
    assert sheet.ok and sheet.header_row == 2
    assert sheet.rows[0].row == 3


# ----------------------------------------------------------------------------- answers


def test_pandas_sheet_nan_answers_are_skipped_and_counted(labels: Path) -> None:
    frame = pd.DataFrame(
        [
            ["img_001", "yes", float("nan"), *ANSWERS[2:]],
            ["img_002.png", None, float("nan"), *ANSWERS[2:]],
            ["img_003.JPG", "no", "  ", *ANSWERS[2:]],
        ],
        columns=BARE,
    )
    path = labels / "Femur_image_list.xlsx"
    frame.to_excel(path, index=False)
    sheet = read_sheet(path)
    assert sheet.ok, sheet.problems
    assert [r.image_name for r in sheet.rows] == ["img_001", "img_002.png", "img_003.JPG"]
    assert sheet.rows[0].answers[1] is None
    assert sheet.empty_answers == [1, 3, 0, 0, 0, 0, 0, 0]
    assert sheet.qa_pairs_per_question() == [2, 0, 3, 3, 3, 3, 3, 3]


def test_literal_nan_text_from_pandas_is_empty(labels: Path) -> None:
    path = write_xlsx(labels / "Femur_image_list.xlsx", [BARE, ["a", "nan", "NaN", *ANSWERS[2:]]])
    sheet = read_sheet(path)
    assert sheet.rows[0].answers[:2] == [None, None]


def test_clean_answers_on_and_off(labels: Path) -> None:
    messy = "  Fetus lies  on the\nleft side.  "
    path = write_xlsx(
        labels / "Femur_image_list.xlsx", [BARE, ["a", messy, "Ends with dots...", *ANSWERS[2:]]]
    )
    assert read_sheet(path).rows[0].answers[:2] == ["Fetus lies on the left side", "Ends with dots..."]
    assert read_sheet(path, clean_answers=False).rows[0].answers[:2] == [messy, "Ends with dots..."]


def test_period_only_answer_is_empty_after_clean_up(labels: Path) -> None:
    path = write_xlsx(labels / "Femur_image_list.xlsx", [BARE, ["a", " . ", *ANSWERS[1:]]])
    assert read_sheet(path).rows[0].answers[0] is None
    assert read_sheet(path, clean_answers=False).rows[0].answers[0] == " . "


# ----------------------------------------------------------------------------- one test per problem


def test_corrupt_xlsx(labels: Path) -> None:
    path = labels / "Femur_image_list.xlsx"
    path.write_bytes(b"this is not a zip file \x00\x01\x02" * 10)
    sheet = read_sheet(path)
    p = only(sheet.problems, "sheet_unreadable")
    assert p.severity == "error" and not sheet.ok
    assert "Femur_image_list.xlsx" in p.message and p.file == str(path)
    assert "save it again" in p.message and ".xlsx" in p.message
    assert sheet.rows == [] and sheet.questions == list(STANDARD_QUESTIONS)


def test_empty_file(labels: Path) -> None:
    path = labels / "Femur_image_list.xlsx"
    path.write_bytes(b"")
    assert only(read_sheet(path).problems, "sheet_unreadable").severity == "error"


def test_data_on_second_sheet(labels: Path) -> None:
    path = write_xlsx(
        labels / "Femur_image_list.xlsx",
        [["notes only"], ["more notes"]],
        more={"Labels 2024": [BARE, ["a", *ANSWERS]]},
    )
    p = only(read_sheet(path).problems, "data_not_on_first_sheet")
    assert p.severity == "error"
    assert "Femur_image_list.xlsx" in p.message
    assert "'Labels 2024'" in p.message and "'Sheet1'" in p.message
    assert "move worksheet 'Labels 2024' first" in p.message


def test_other_sheet_with_labels_is_ignored_with_a_warning(labels: Path) -> None:
    path = write_xlsx(
        labels / "Femur_image_list.xlsx", [BARE, ["a", *ANSWERS]], more={"Old": [BARE, ["b", *ANSWERS]]}
    )
    sheet = read_sheet(path)
    p = only(sheet.problems, "other_sheet_ignored")
    assert p.severity == "warning" and "'Old'" in p.message and "delete worksheet 'Old'" in p.message
    assert [r.image_name for r in sheet.rows] == ["a"]


def test_empty_first_sheet(labels: Path) -> None:
    path = write_xlsx(labels / "Femur_image_list.xlsx", [])
    p = only(read_sheet(path).problems, "sheet_empty")
    assert p.severity == "error" and "'Sheet1'" in p.message and "Image Name" in p.message


def test_extra_columns_are_ignored_and_named(labels: Path) -> None:
    header = [*BARE, "Reviewer notes", "Q9: Extra question", None]
    path = write_xlsx(
        labels / "Femur_image_list.xlsx", [header, ["a", *ANSWERS, "looks fine", "x", "stray value"]]
    )
    sheet = read_sheet(path)
    assert sheet.ok and sheet.rows[0].answers == ANSWERS
    notes, q9, unnamed = (p for p in sheet.problems if p.code == "extra_column")
    assert notes.severity == "warning"
    assert notes.row == 1 and notes.column == "Reviewer notes"
    assert "row 1, column 'Reviewer notes' (J)" in notes.message and "ignored" in notes.message
    assert "Femur_image_list.xlsx" in notes.message and "rename its header" in notes.message
    assert "Q1 to Q8" in q9.message and "(K)" in q9.message
    assert (
        unnamed.column == "(no header)" and "(L)" in unnamed.message and "give it a header" in unnamed.message
    )


def test_missing_image_name_column(labels: Path) -> None:
    path = write_xlsx(labels / "Femur_image_list.xlsx", [["File", *BARE[1:]], ["a", *ANSWERS]])
    p = only(read_sheet(path).problems, "missing_image_name_column")
    assert p.severity == "error" and p.row == 1
    assert "Femur_image_list.xlsx, row 1" in p.message
    assert "Columns found: A: 'File', B: 'Q1'" in p.message
    assert "name the column that holds the image file names 'Image Name'" in p.message


def test_missing_question_columns(labels: Path) -> None:
    header = [h for h in BARE if h not in ("Q3", "Q5")]
    path = write_xlsx(labels / "Femur_image_list.xlsx", [header, ["a", *ANSWERS[:6]]])
    sheet = read_sheet(path)
    p = only(sheet.problems, "missing_question_column")
    assert p.severity == "error" and not sheet.ok
    assert (
        "Q3, Q5 missing" in p.message and "xlsx, row 1:" in p.message and "Femur_image_list.xlsx" in p.message
    )
    assert "add a column for each of Q3, Q5" in p.message
    assert p.value == "Q3, Q5"
    # The rest is still read, so row problems show up in the same report.
    assert sheet.rows[0].answers[2] is None and sheet.rows[0].answers[3] == ANSWERS[2]


def test_duplicated_question_column(labels: Path) -> None:
    path = write_xlsx(labels / "Femur_image_list.xlsx", [[*BARE, "Q2: again"], ["a", *ANSWERS, "other"]])
    sheet = read_sheet(path)
    p = only(sheet.problems, "duplicate_question_column")
    assert p.severity == "error" and p.column == "Q2"
    assert "Q2 heads several columns (C, J)" in p.message and "keep one Q2 column" in p.message


def test_duplicated_image_name_column(labels: Path) -> None:
    path = write_xlsx(labels / "Femur_image_list.xlsx", [[*BARE, "Image name"], ["a", *ANSWERS, "b"]])
    p = only(read_sheet(path).problems, "duplicate_image_name_column")
    assert p.severity == "error" and "(columns A, J)" in p.message and "keep one 'Image Name'" in p.message


def test_duplicate_rows_with_the_same_answers_keep_one(labels: Path) -> None:
    rows = [BARE, ["img_001.png", *ANSWERS], ["b", *ANSWERS], ["IMG_001", *ANSWERS]]
    sheet = read_sheet(write_xlsx(labels / "Femur_image_list.xlsx", rows))
    p = only(sheet.problems, "duplicate_row")
    assert p.severity == "warning" and sheet.ok
    assert p.row == 4 and p.value == "IMG_001"
    assert (
        "row 4" in p.message
        and "already listed in row 2" in p.message
        and "delete the repeated row" in p.message
    )
    assert [r.row for r in sheet.rows] == [2, 3]
    assert sheet.listed_names == ["img_001.png", "b", "IMG_001"]


def test_duplicate_rows_with_conflicting_answers_drop_all(labels: Path) -> None:
    other = [*ANSWERS[:3], "different", *ANSWERS[4:]]
    rows = [BARE, ["img_001.png", *ANSWERS], ["b", *ANSWERS], ["img_001.png", *other]]
    sheet = read_sheet(write_xlsx(labels / "Femur_image_list.xlsx", rows))
    p = only(sheet.problems, "conflicting_duplicate_rows")
    assert p.severity == "warning" and sheet.ok
    assert "listed in rows 2, 4 with different answers (Q4 differ)" in p.message
    assert "all these rows are skipped" in p.message and "delete or correct the wrong rows" in p.message
    assert [r.image_name for r in sheet.rows] == ["b"]


def test_numbers_as_answers_are_converted_to_text(labels: Path) -> None:
    path = write_xlsx(labels / "Femur_image_list.xlsx", [BARE, ["a", *ANSWERS[:4], 22, 45.3, 7.0, True]])
    sheet = read_sheet(path)
    assert sheet.ok
    assert sheet.rows[0].answers[4:] == ["22", "45.3", "7", "TRUE"]
    first = next(p for p in sheet.problems if p.code == "non_text_answer")
    assert first.severity == "warning" and (first.row, first.column, first.value) == (2, "Q5", "22")
    assert "row 2, column 'Q5' (F)" in first.message and "Value: '22'" in first.message
    assert "used as the text '22'" in first.message and "format the cell as Text" in first.message


def test_dates_as_answers_are_skipped(labels: Path) -> None:
    when = dt.datetime(2024, 12, 14)
    path = write_xlsx(labels / "Femur_image_list.xlsx", [BARE, ["a", *ANSWERS[:4], when, *ANSWERS[5:]]])
    sheet = read_sheet(path)
    p = only(sheet.problems, "date_answer")
    assert p.severity == "warning" and sheet.rows[0].answers[4] is None
    assert "row 2, column 'Q5' (F)" in p.message and "2024-12-14" in p.message
    assert "format the column as Text" in p.message and "retype" in p.message
    assert sheet.empty_answers[4] == 1


def test_excel_error_values_are_skipped(labels: Path) -> None:
    path = write_xlsx(labels / "Femur_image_list.xlsx", [BARE, ["a", "#N/A", *ANSWERS[1:]]])
    sheet = read_sheet(path)
    p = only(sheet.problems, "formula_error_answer")
    assert p.value == "#N/A" and "fix the formula" in p.message and sheet.rows[0].answers[0] is None


def test_question_with_all_answers_empty(labels: Path) -> None:
    rows = [BARE, ["a", *ANSWERS[:5], None, *ANSWERS[6:]], ["b", *ANSWERS[:5], "  ", *ANSWERS[6:]]]
    sheet = read_sheet(write_xlsx(labels / "Femur_image_list.xlsx", rows))
    p = only(sheet.problems, "question_all_empty")
    assert p.severity == "warning" and sheet.ok
    assert p.column == "Q6" and "column 'Q6' (G)" in p.message and "(2 rows)" in p.message
    assert "fill in the Q6 answers" in p.message


def test_empty_image_name_skips_the_row(labels: Path) -> None:
    rows = [BARE, ["a", *ANSWERS], [None, *ANSWERS], ["   ", None], [None] * 9, ["b", *ANSWERS]]
    sheet = read_sheet(write_xlsx(labels / "Femur_image_list.xlsx", rows))
    p = only(sheet.problems, "empty_image_name")
    assert p.severity == "warning" and p.row == 3
    assert "row 3, column 'Image Name' (A)" in p.message and "type the image file name" in p.message
    assert [r.row for r in sheet.rows] == [2, 6]


def test_numeric_image_names_become_text(labels: Path) -> None:
    sheet = read_sheet(write_xlsx(labels / "Femur_image_list.xlsx", [BARE, [17, *ANSWERS], [3.0, *ANSWERS]]))
    assert [r.image_name for r in sheet.rows] == ["17", "3"]


def test_header_without_rows(labels: Path) -> None:
    p = only(read_sheet(write_xlsx(labels / "Femur_image_list.xlsx", [BARE])).problems, "no_data_rows")
    assert p.severity == "error" and "row 1" in p.message and "add one row per image" in p.message


# ----------------------------------------------------------------------------- fuzz

SHEET_CODES = {
    code
    for code in CODES
    if code
    not in {
        "unsafe_image_name",
        "image_outside_folder",
        "image_missing",
        "image_name_ambiguous",
        "image_unreadable",
        "image_mode_unsupported",
        "image_too_large",
        "image_large",
        "data_root_not_found",
        "image_dir_missing",
        "images_not_listed",
        "no_usable_images",
        "no_qa_pairs",
    }
}
_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Co", "Cn")), max_size=30)
_CELL = st.one_of(
    st.none(),
    _TEXT,
    st.sampled_from(["", "  ", "nan", "#N/A", "#REF!", "Yes.", "a  b\nc", "=1+1", "img_001.png", "IMG_001"]),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=False, width=32),
    st.booleans(),
    st.datetimes(min_value=dt.datetime(1900, 3, 1), max_value=dt.datetime(2100, 1, 1)),
    st.dates(min_value=dt.date(1900, 3, 1), max_value=dt.date(2100, 1, 1)),
    st.times(),
)
_HEADER = st.one_of(
    st.sampled_from(["Image Name", "image_name", "ImageName", "File Name", "Image"]),
    st.builds(
        lambda n, sep, t: f"Q{n}{sep}{t}",
        st.integers(0, 10),
        st.sampled_from(["", ":", ": ", ":\n", " - "]),
        _TEXT,
    ),
    _CELL,
)

_Q_STYLE = st.sampled_from(["Q{n}", "Q{n}:\n{t}", "Q{n}: {t}", "q{n} :", "Question {n}: {t}", " Q {n} - {t}"])
_NAME = st.one_of(st.sampled_from(["img_001.png", "IMG_001", "img_002", "b.jpg", "", None]), _CELL)


@st.composite
def _plausible_header(draw: st.DrawFn) -> list[object]:
    """Mostly-valid headers: Image Name and Q1..Q8 in mixed styles, sometimes damaged."""
    cols: list[object] = ["Image Name"]
    cols += [draw(_Q_STYLE).format(n=n, t=draw(_TEXT)) for n in range(1, 9)]
    for _ in range(draw(st.integers(0, 2))):
        action = draw(st.sampled_from(["drop", "duplicate", "extra"]))
        i = draw(st.integers(0, len(cols) - 1))
        if action == "drop":
            cols.pop(i)
        elif action == "duplicate":
            cols.append(cols[i])
        else:
            cols.append(draw(_HEADER))
    return draw(st.permutations(cols)) if draw(st.booleans()) else cols


_ROW = st.builds(lambda name, rest: [name, *rest], _NAME, st.lists(_CELL, max_size=11))


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    header=_plausible_header() | st.lists(_HEADER, max_size=12),
    body=st.lists(_ROW, max_size=8),
    second=st.none() | st.lists(st.lists(_HEADER, min_size=1, max_size=10), min_size=1, max_size=3),
    clean=st.booleans(),
)
def test_fuzz_read_sheet_never_raises(
    labels: Path,
    header: list[object],
    body: list[list[object]],
    second: list[list[object]] | None,
    clean: bool,
) -> None:
    path = labels / "Fuzz_image_list.xlsx"
    try:
        write_xlsx(path, [header, *body], more={"Other": second} if second else None)
    except Exception:  # a value openpyxl refuses to write is not a sheet we can test
        return
    sheet = read_sheet(path, clean_answers=clean)
    assert codes(sheet.problems) <= SHEET_CODES
    for p in sheet.problems:
        assert p.severity == CODES[p.code][0] and "Fix:" in p.message
    assert len(sheet.questions) == 8 and all(q.strip() for q in sheet.questions)
    if sheet.ok:
        assert sheet.header_row is not None
    for r in sheet.rows:
        assert r.image_name.strip() and len(r.answers) == 8
        assert all(a is None or (isinstance(a, str) and a.strip()) for a in r.answers)
    assert sheet.empty_answers == [sum(r.answers[q] is None for r in sheet.rows) for q in range(8)]
    assert not any(isinstance(a, float) and math.isnan(a) for r in sheet.rows for a in r.answers)
