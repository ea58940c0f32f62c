"""Label sheets (`{Category}_image_list.xlsx`) to rows of eight answers, with every problem.

`read_sheet` never raises for bad data: it returns a `Sheet` whose `problems` say what is
wrong, where (file, Excel row, column, value) and how to fix it. Codes and severities are
listed in `fada_batch.data.problems.CODES`; an error blocks the category, a warning skips or
converts one item and is counted.

The layout read: the first worksheet; a header row holding an ``Image Name`` column and
``Q1``..``Q8`` (searched in the first 10 rows, so a title row above it is tolerated; rows
above the header are ignored). Excel row numbers in messages count the first row as 1.

Header styles: a bare ``Q1``; ``Q1:`` plus a newline and the question; ``Q1: Anatomical
Structures``; case and spacing variants (``q1 :``, ``Q 1 -``, ``Question 1``). The prompt
uses the header's question text, whitespace-collapsed and never truncated; a bare ``Qn``
uses ``STANDARD_QUESTIONS[n-1]``. A header text that is only the title of the standard
question (``Anatomical Structures`` for Q1) also uses the full standard question, since the
title alone is not a question and would give this category a different prompt than others.
Image-name headers accept spacing/case variants (``image_name``, ``ImageName``, ``File
Name``). Header cells that are not text (numbers, dates) are compared as text.

Decisions (code, severity):

- Data on another sheet than the first (``data_not_on_first_sheet``, error): the first sheet
  is what Excel users see first and what the original seed read, so guessing could train on
  a scratch sheet; the message names the sheet to move first. When the first sheet has the
  labels, other sheets that also look like labels give ``other_sheet_ignored`` (warning).
- Extra columns (``extra_column``, warning): ignored, named with their letter. That includes
  Q numbers outside 1..8 and unnamed columns that hold data.
- Missing ``Image Name`` (``missing_image_name_column``, error): lists the columns found.
- Missing or duplicated Q columns (``missing_question_column``,
  ``duplicate_question_column``, errors): which column is the real answer cannot be guessed.
- Same image twice (names compared case-insensitively, with or without extension):
  identical answers (``duplicate_row``, warning): the first row is kept. Different answers
  (``conflicting_duplicate_rows``, warning): *all* its rows are dropped, because which one
  is right cannot be known, and one bad image must not block the other hundreds; the
  message names every row and the questions that differ.
- Numbers and TRUE/FALSE as answers (``non_text_answer``, warning): converted to text as
  Excel shows them (``22``, ``45.3``, ``TRUE``) and kept, since numeric answers (weeks,
  millimetres) are legitimate.
- Dates and times as answers (``date_answer``, warning): skipped. Excel turns typed text
  like ``12-14`` into a date, so the date is not what was meant and cannot be turned back.
- Excel error values such as ``#N/A`` (``formula_error_answer``, warning): skipped.
- A question whose answers are all empty (``question_all_empty``, warning): the other
  questions still train; the category as a whole is blocked only when no answer at all is
  usable (checked by `fada_batch.data.dataset`).
- Empty image name on a row with answers (``empty_image_name``, warning): row skipped.
  Entirely empty rows are skipped silently (hand-made sheets end in many).
- Empty answers (empty cell, whitespace, ``nan`` written by pandas) are None and counted in
  `Sheet.empty_answers`; they are not problems.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from openpyxl import load_workbook
from openpyxl.utils import get_column_letter

from fada_batch.data.categories import NUM_QUESTIONS, QUESTION_TITLE_ALIASES, STANDARD_QUESTIONS
from fada_batch.data.images import name_key
from fada_batch.data.normalize import Normalization, Normalizer
from fada_batch.data.problems import Problem, has_errors, make_problem, shorten
from fada_batch.text import plural

HEADER_SEARCH_ROWS = 10  # the header row is looked for in this many first rows
IMAGE_NAME_HEADERS = frozenset({"imagename", "imagenames", "image", "imagefile", "imagefilename", "filename"})
_Q_HEADER = re.compile(r"^\s*q(?:uestion)?\s*(\d+)\s*(?:[:.)\-\u2013]\s*|\s+|$)(.*)$", re.I | re.S)
_WS = re.compile(r"\s+")
_EXCEL_ERRORS = frozenset(
    {"#N/A", "#REF!", "#VALUE!", "#DIV/0!", "#NAME?", "#NUM!", "#NULL!", "#SPILL!", "#CALC!"}
)
_MAX_LISTED = 12  # columns listed in a message before "..."

Cell = object  # a cell value from openpyxl: str, int, float, bool, datetime, None, ...


@dataclass(frozen=True)
class SheetRow:
    """One usable row of a label sheet."""

    row: int  # Excel row number (the header row is 1 in a standard sheet)
    image_name: str  # as written, stripped of surrounding spaces
    answers: list[str | None]  # NUM_QUESTIONS answers, normalised as asked; None when empty


@dataclass
class Sheet:
    """A label sheet as read: questions, usable rows, problems and counts."""

    path: Path  # the .xlsx file
    questions: list[str]  # NUM_QUESTIONS prompt texts: from the header, else standard
    rows: list[SheetRow] = field(default_factory=list)  # usable rows, duplicates resolved
    problems: list[Problem] = field(default_factory=list)  # everything found, in order
    empty_answers: list[int] = field(default_factory=lambda: [0] * NUM_QUESTIONS)
    # ^ per question: answers that are None in `rows` (empty, or skipped with a warning)
    questions_from_sheet: list[bool] = field(default_factory=lambda: [False] * NUM_QUESTIONS)
    # ^ per question: True when the prompt text came from the header
    listed_names: list[str] = field(default_factory=list)  # every image name in the sheet,
    # including rows dropped as duplicates (so their files are not reported as unlisted)
    worksheet: str | None = None  # the worksheet read
    header_row: int | None = None  # Excel row number of the header
    normalization: Normalization = field(default_factory=Normalization)  # what it did to the answers

    @property
    def ok(self) -> bool:
        """True when no error blocks the sheet (warnings allowed)."""
        return not has_errors(self.problems)

    def qa_pairs_per_question(self) -> list[int]:
        """Non-empty answers per question in `rows`."""
        return [len(self.rows) - n for n in self.empty_answers]


def read_sheet(path: Path, *, clean_answers: bool = True, normalize: str | None = None) -> Sheet:
    """Read a label sheet; bad data becomes problems, never exceptions.

    Args:
        path: the ``*_image_list.xlsx`` file.
        clean_answers: apply `fada_batch.text.clean_answer` (collapse whitespace, drop one
            trailing period) to every answer; off keeps the cell text as is.
        normalize: the `data.normalize` level (`fada_batch.data.normalize`); None means
            ``clean`` when `clean_answers`, else ``none``.

    Returns:
        The sheet; `Sheet.ok` is False when an error blocks it. See the module docstring
        for the decisions behind each problem.
    """
    sheet = Sheet(path=path, questions=list(STANDARD_QUESTIONS))
    try:
        worksheets = load_worksheets(path)
    except Exception as exc:  # openpyxl/zipfile raise many types for a bad file
        sheet.problems.append(
            make_problem(
                "sheet_unreadable",
                f"The label sheet cannot be opened as an Excel .xlsx workbook "
                f"({type(exc).__name__}: {shorten(str(exc), 200)}).",
                fix="open it in Excel or LibreOffice and save it again as 'Excel Workbook "
                "(.xlsx)'; an old .xls or a .csv renamed to .xlsx does not work.",
                file=path,
            )
        )
        return sheet
    if not worksheets:
        sheet.problems.append(_empty_problem(path, "(none)"))
        return sheet

    title, rows = worksheets[0]
    others = [t for t, r in worksheets[1:] if find_header(r) is not None]
    return parse_rows(path, title, rows, others=others, clean_answers=clean_answers, normalize=normalize)


def parse_rows(
    path: Path,
    title: str,
    rows: list[tuple[Cell, ...]],
    *,
    others: tuple[str, ...] | list[str] = (),
    clean_answers: bool = True,
    normalize: str | None = None,
    row_numbers: list[int] | None = None,
) -> Sheet:
    """A label table already read from a worksheet (`title`, its rows of cell values) to a
    `Sheet`; `others` names other worksheets that also look like labels. Used by
    `read_sheet` and, per category, by the master workbook reader; an entirely empty row
    (an empty tuple too) is skipped. `row_numbers`, when given, are the Excel row numbers of
    the rows after the header (the workbook reader passes one category's rows only)."""
    sheet = Sheet(path=path, questions=list(STANDARD_QUESTIONS))
    sheet.worksheet = title
    header_idx = find_header(rows)
    if header_idx is None:
        sheet.problems.append(_no_header_problem(path, title, rows, others))
        return sheet
    for other in others:
        sheet.problems.append(
            make_problem(
                "other_sheet_ignored",
                f"Worksheet {other!r} also has an 'Image Name' column; only the first "
                f"worksheet ({title!r}) is read.",
                fix=f"delete worksheet {other!r} or merge its rows into {title!r}.",
                file=path,
            )
        )

    sheet.header_row = header_idx + 1
    image_col, q_cols = _parse_header(path, rows, header_idx, sheet)
    norm = Normalizer(normalize or ("clean" if clean_answers else "none"))
    sheet.normalization = norm.report
    _read_rows(path, rows, header_idx, image_col, q_cols, sheet, norm=norm, row_numbers=row_numbers)
    return sheet


def load_worksheets(path: Path, *, first_only: bool = False) -> list[tuple[str, list[tuple[Cell, ...]]]]:
    """(title, rows of cell values) per worksheet, in tab order (only the first one when
    `first_only`).

    openpyxl's read-only mode streams the cells (about a fifth faster than a full load, and
    far less memory); each worksheet's recorded dimensions are reset first, since some
    writers record wrong ones and read-only mode would stop reading at them.

    Raises:
        Exception: whatever openpyxl or zipfile raise for a file that is not a valid xlsx.
    """
    with warnings.catch_warnings():
        # openpyxl warns about unsupported extensions (data validation, styles); not ours.
        warnings.simplefilter("ignore", UserWarning)
        wb = load_workbook(path, read_only=True, data_only=True, keep_links=False)
    try:
        out = []
        for ws in wb.worksheets[:1] if first_only else wb.worksheets:
            ws.reset_dimensions()
            out.append((ws.title, [tuple(r) for r in ws.iter_rows(values_only=True)]))
        return out
    finally:
        wb.close()


def _cell_text(value: Cell) -> str:
    """A header or name cell as text: '' for empty, integers without '.0', dates ISO."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer():
            return str(int(value))
        return repr(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    return str(value)


def _label(value: Cell) -> str:
    """A header cell for messages: whitespace collapsed, shortened."""
    return shorten(_WS.sub(" ", _cell_text(value)).strip(), 40)


def header_key(value: Cell) -> str:
    """A header cell reduced for matching: lower case, letters and digits only
    (`Image_Name`, `image name` and `ImageName` are all ``imagename``)."""
    return re.sub(r"[^a-z0-9]", "", _cell_text(value).casefold())


def _is_image_name_header(value: Cell) -> bool:
    return header_key(value) in IMAGE_NAME_HEADERS


def _is_empty(value: Cell) -> bool:
    return _cell_text(value).strip() == ""


def find_header(rows: list[tuple[Cell, ...]]) -> int | None:
    """Index (0-based) of the first row, among the first few, with an Image Name column: the
    header row of a per-category sheet and of the master workbook alike."""
    for i, values in enumerate(rows[:HEADER_SEARCH_ROWS]):
        if any(_is_image_name_header(v) for v in values):
            return i
    return None


def _columns_found(values: tuple[Cell, ...]) -> str:
    found = [f"{get_column_letter(j + 1)}: {_label(v)!r}" for j, v in enumerate(values) if not _is_empty(v)]
    listed = ", ".join(found[:_MAX_LISTED]) + (", ..." if len(found) > _MAX_LISTED else "")
    return listed or "none"


def _empty_problem(path: Path, title: str) -> Problem:
    return make_problem(
        "sheet_empty",
        f"The first worksheet ({title!r}) is empty.",
        fix="put the labels on the first worksheet: row 1 'Image Name', 'Q1' ... 'Q8', then "
        "one row per image.",
        file=path,
    )


def _no_header_problem(path: Path, title: str, rows: list[tuple[Cell, ...]], others: list[str]) -> Problem:
    if others:
        return make_problem(
            "data_not_on_first_sheet",
            f"The first worksheet ({title!r}) has no 'Image Name' column, but worksheet "
            f"{others[0]!r} has; only the first worksheet is read.",
            fix=f"move worksheet {others[0]!r} first (drag its tab to the far left) and save, "
            f"or delete worksheet {title!r}.",
            file=path,
            value=others[0],
        )
    first = next((i for i, r in enumerate(rows) if any(not _is_empty(v) for v in r)), None)
    if first is None:
        return _empty_problem(path, title)
    return make_problem(
        "missing_image_name_column",
        f"No 'Image Name' column in the header (row {first + 1} of worksheet {title!r}). "
        f"Columns found: {_columns_found(rows[first])}.",
        fix="name the column that holds the image file names 'Image Name' in the header row.",
        file=path,
        row=first + 1,
    )


def _question_text(q: int, header_text: str) -> str | None:
    """The prompt text a Q header carries, or None to use the standard question."""
    text = _WS.sub(" ", header_text).strip()
    if not text:
        return None
    titles = (STANDARD_QUESTIONS[q].split(":", 1)[0], *QUESTION_TITLE_ALIASES.get(q, ()))
    if text.rstrip(":. ").casefold() in {t.casefold() for t in titles}:
        return None
    return text


def _parse_header(
    path: Path, rows: list[tuple[Cell, ...]], header_idx: int, sheet: Sheet
) -> tuple[int, list[int | None]]:
    """The (first) Image Name column and one column per question (None when missing).

    Fills `sheet.questions` and adds header problems to `sheet.problems`. The header row
    holds an Image Name column by construction (`find_header`).
    """
    image_cols, q_found = _classify_columns(path, rows, header_idx, sheet)
    _check_header(path, rows[header_idx], header_idx + 1, image_cols, q_found, sheet)
    return image_cols[0], [cols[0] if cols else None for cols in q_found]


def _classify_columns(
    path: Path, rows: list[tuple[Cell, ...]], header_idx: int, sheet: Sheet
) -> tuple[list[int], list[list[int]]]:
    """The Image Name columns and, per question, the columns headed by it; the questions'
    texts into `sheet.questions`, columns that are neither into `sheet.problems`."""
    header = rows[header_idx]
    header_row = header_idx + 1
    width = max((len(r) for r in rows[header_idx:]), default=0)
    image_cols: list[int] = []
    q_found: list[list[int]] = [[] for _ in range(NUM_QUESTIONS)]
    for j in range(width):
        value = header[j] if j < len(header) else None
        letter = get_column_letter(j + 1)
        text = _cell_text(value)
        match = _Q_HEADER.match(text)
        if _is_image_name_header(value):
            image_cols.append(j)
        elif match and 1 <= int(match[1]) <= NUM_QUESTIONS:
            q = int(match[1]) - 1
            q_found[q].append(j)
            if len(q_found[q]) == 1:
                own = _question_text(q, match[2])
                sheet.questions[q] = own or STANDARD_QUESTIONS[q]
                sheet.questions_from_sheet[q] = own is not None
        elif text.strip():
            why = f" (question numbers go from Q1 to Q{NUM_QUESTIONS})" if match else ""
            sheet.problems.append(
                make_problem(
                    "extra_column",
                    f"Column {letter} is neither 'Image Name' nor Q1..Q{NUM_QUESTIONS}{why}; it is ignored.",
                    fix="nothing if it holds notes; otherwise rename its header to the "
                    "question it answers (e.g. 'Q3').",
                    file=path,
                    row=header_row,
                    column=_label(value),
                    column_letter=letter,
                )
            )
        elif any(j < len(r) and not _is_empty(r[j]) for r in rows[header_idx + 1 :]):
            sheet.problems.append(
                make_problem(
                    "extra_column",
                    f"Column {letter} has values but no header; it is ignored.",
                    fix="give it a header (e.g. 'Q3') if it holds answers, else delete it.",
                    file=path,
                    row=header_row,
                    column="(no header)",
                    column_letter=letter,
                )
            )
    return image_cols, q_found


def _check_header(
    path: Path,
    header: tuple[Cell, ...],
    header_row: int,
    image_cols: list[int],
    q_found: list[list[int]],
    sheet: Sheet,
) -> None:
    """Problems of a header: several Image Name columns, questions missing or heading
    several columns."""
    if len(image_cols) > 1:
        letters = ", ".join(get_column_letter(j + 1) for j in image_cols)
        sheet.problems.append(
            make_problem(
                "duplicate_image_name_column",
                f"Several columns are headed 'Image Name' (columns {letters}); it is not clear "
                "which one names the images.",
                fix="keep one 'Image Name' column and rename or delete the others.",
                file=path,
                row=header_row,
                column="Image Name",
            )
        )
    missing = [f"Q{q + 1}" for q in range(NUM_QUESTIONS) if not q_found[q]]
    if missing:
        sheet.problems.append(
            make_problem(
                "missing_question_column",
                f"Question column{'s' if len(missing) > 1 else ''} {', '.join(missing)} missing from the header. "
                f"Columns found: {_columns_found(header)}.",
                fix=f"add a column for each of {', '.join(missing)} with the header 'Qn' or "
                "'Qn: question text' (n = 1..8), even if its answers are empty.",
                file=path,
                row=header_row,
                value=", ".join(missing),
            )
        )
    for q, cols in enumerate(q_found):
        if len(cols) > 1:
            letters = ", ".join(get_column_letter(j + 1) for j in cols)
            sheet.problems.append(
                make_problem(
                    "duplicate_question_column",
                    f"Q{q + 1} heads several columns ({letters}); it is not clear which holds the answers.",
                    fix=f"keep one Q{q + 1} column: delete the extra one or correct its number.",
                    file=path,
                    row=header_row,
                    column=f"Q{q + 1}",
                )
            )


def _answer(
    value: Cell, *, norm: Normalizer, path: Path, row: int, q: int, letter: str
) -> tuple[str | None, Problem | None]:
    """One answer cell to text (or None when empty/skipped) and the problem, if any."""
    where = {"file": path, "row": row, "column": f"Q{q + 1}", "column_letter": letter}
    if value is None:
        return None, None
    if isinstance(value, str):
        if value.strip() in _EXCEL_ERRORS:
            return None, make_problem(
                "formula_error_answer",
                "The answer is an Excel error value; it is skipped.",
                fix="fix the formula or type the answer as plain text.",
                value=value,
                **where,
            )
        if not value.strip() or value.strip().casefold() == "nan":
            return None, None
        return norm(q, value), None
    if isinstance(value, float) and math.isnan(value):
        return None, None
    if isinstance(value, (dt.datetime, dt.date, dt.time, dt.timedelta)):
        return None, make_problem(
            "date_answer",
            "The answer is a date or time, usually text that Excel converted on entry "
            "(e.g. '12-14' became 14 December); it is skipped.",
            fix="format the column as Text (Format Cells > Text) and retype the answer.",
            value=value,
            **where,
        )
    text = _cell_text(value)
    kind = "TRUE/FALSE" if isinstance(value, bool) else "number"
    problem = make_problem(
        "non_text_answer",
        f"The answer is a {kind}, not text; it is used as the text {text!r}.",
        fix="nothing if that is right; otherwise format the cell as Text and retype it.",
        value=value,
        **where,
    )
    return norm(q, text), problem


def _read_rows(
    path: Path,
    rows: list[tuple[Cell, ...]],
    header_idx: int,
    image_col: int,
    q_cols: list[int | None],
    sheet: Sheet,
    *,
    norm: Normalizer,
    row_numbers: list[int] | None = None,
) -> None:
    """Fill `sheet.rows`, `listed_names` and counts; add row problems."""

    def cell(values: tuple[Cell, ...], j: int | None) -> Cell:
        return values[j] if j is not None and j < len(values) else None

    candidates: list[SheetRow] = []
    for i in range(header_idx + 1, len(rows)):
        values = rows[i]
        excel_row = row_numbers[i - header_idx - 1] if row_numbers is not None else i + 1
        name = _cell_text(cell(values, image_col)).strip()
        if not name:
            if any(not _is_empty(cell(values, j)) for j in q_cols):
                sheet.problems.append(
                    make_problem(
                        "empty_image_name",
                        "The row has answers but no image name; it is skipped.",
                        fix="type the image file name in the 'Image Name' cell, or delete the row.",
                        file=path,
                        row=excel_row,
                        column="Image Name",
                        column_letter=get_column_letter(image_col + 1),
                    )
                )
            continue
        answers: list[str | None] = []
        for q, j in enumerate(q_cols):
            letter = get_column_letter(j + 1) if j is not None else "?"
            text, problem = _answer(cell(values, j), norm=norm, path=path, row=excel_row, q=q, letter=letter)
            answers.append(text)
            if problem is not None:
                sheet.problems.append(problem)
        candidates.append(SheetRow(row=excel_row, image_name=name, answers=answers))

    sheet.listed_names = [r.image_name for r in candidates]
    if not candidates:
        sheet.problems.append(
            make_problem(
                "no_data_rows",
                f"The header (row {sheet.header_row}) is there, but no row below it names an image.",
                fix="add one row per image: its file name under 'Image Name' and the answers under Q1..Q8.",
                file=path,
            )
        )
        return
    sheet.rows = _resolve_duplicates(path, candidates, sheet.problems)
    sheet.empty_answers = [sum(r.answers[q] is None for r in sheet.rows) for q in range(NUM_QUESTIONS)]
    for q, j in enumerate(q_cols):
        if j is not None and sheet.rows and sheet.empty_answers[q] == len(sheet.rows):
            sheet.problems.append(
                make_problem(
                    "question_all_empty",
                    f"Every answer to Q{q + 1} is empty ({plural(len(sheet.rows), 'row')}); the model "
                    "will not learn this question for this category.",
                    fix=f"fill in the Q{q + 1} answers; nothing if the question does not apply.",
                    file=path,
                    column=f"Q{q + 1}",
                    column_letter=get_column_letter(j + 1),
                )
            )


def _resolve_duplicates(path: Path, candidates: list[SheetRow], problems: list[Problem]) -> list[SheetRow]:
    """Keep one row per image: identical duplicates collapse, conflicting ones all drop."""
    groups: dict[str, list[SheetRow]] = {}
    for r in candidates:
        groups.setdefault(name_key(r.image_name), []).append(r)
    dropped: set[int] = set()
    for group in groups.values():
        if len(group) == 1:
            continue
        first = group[0]
        if all(r.answers == first.answers for r in group[1:]):
            for r in group[1:]:
                dropped.add(r.row)
                problems.append(
                    make_problem(
                        "duplicate_row",
                        f"Image {r.image_name!r} is already listed in row {first.row} with "
                        "the same answers; this row is ignored.",
                        fix="delete the repeated row.",
                        file=path,
                        row=r.row,
                        column="Image Name",
                        value=r.image_name,
                    )
                )
            continue
        differ = [f"Q{q + 1}" for q in range(NUM_QUESTIONS) if len({r.answers[q] for r in group}) > 1]
        rows_text = ", ".join(str(r.row) for r in group)
        dropped.update(r.row for r in group)
        problems.append(
            make_problem(
                "conflicting_duplicate_rows",
                f"Image {first.image_name!r} is listed in rows {rows_text} with different "
                f"answers ({', '.join(differ)} differ); all these rows are skipped because "
                "it is not clear which is right.",
                fix="keep one row per image: delete or correct the wrong rows.",
                file=path,
                row=first.row,
                column="Image Name",
                value=first.image_name,
            )
        )
    return [r for r in candidates if r.row not in dropped]
