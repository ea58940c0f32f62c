"""Problems found in the data: what failed, where, the offending value and how to fix it.

Every check in `sheets`, `images` and `dataset` reports a `Problem` instead of raising, so a
pre-flight check can list everything wrong with a category at once.

Severity has one meaning everywhere:

- ``"error"``: blocks the category; it is not trained until the problem is fixed.
- ``"warning"``: one row, cell or file is skipped (or converted) and counted; the category
  still trains on the rest.

Each code has one fixed severity, listed in `CODES` (the decision table); `make_problem`
looks it up, so the same situation is never an error in one place and a warning in another.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

Severity = Literal["error", "warning"]

# The decision table: code -> (severity, what happens). Codes are stable identifiers that
# tests, `validate --json` and reports rely on; add new ones, never rename.
CODES: dict[str, tuple[Severity, str]] = {
    # Label sheet: the whole sheet.
    "sheet_unreadable": ("error", "the .xlsx file cannot be opened (corrupt, not xlsx, no access)"),
    "sheet_empty": ("error", "the first sheet has no cells"),
    "data_not_on_first_sheet": ("error", "the labels are on a sheet other than the first"),
    "missing_image_name_column": ("error", "no 'Image Name' column in the header row"),
    "duplicate_image_name_column": ("error", "more than one 'Image Name' column"),
    "missing_question_column": ("error", "one or more of Q1..Q8 is missing"),
    "duplicate_question_column": ("error", "the same Q number heads two columns"),
    "no_data_rows": ("error", "the header is there but no row names an image"),
    "other_sheet_ignored": ("warning", "another sheet also has labels; it is ignored"),
    "extra_column": ("warning", "a column that is neither 'Image Name' nor Q1..Q8; ignored"),
    "question_all_empty": ("warning", "every answer to one question is empty"),
    # Label sheet: one row or cell.
    "empty_image_name": ("warning", "a row with answers but no image name; row skipped"),
    "duplicate_row": ("warning", "an image listed twice with the same answers; one kept"),
    "conflicting_duplicate_rows": (
        "warning",
        "an image listed twice with different answers; all its rows skipped",
    ),
    "non_text_answer": ("warning", "a number or TRUE/FALSE as answer; converted to text"),
    "date_answer": ("warning", "a date or time as answer (Excel auto-format); answer skipped"),
    "formula_error_answer": ("warning", "an Excel error value such as #N/A; answer skipped"),
    # Images: one listed image.
    "unsafe_image_name": ("warning", "an image name that leaves the image folder; row skipped"),
    "image_outside_folder": ("warning", "a link that points outside the image folder; row skipped"),
    "image_missing": ("warning", "a listed image is not in the image folder; row skipped"),
    "image_name_ambiguous": ("warning", "a name without extension matches several files; skipped"),
    "image_unreadable": ("warning", "a corrupt, truncated or non-image file; row skipped"),
    "image_mode_unsupported": ("warning", "a pixel format that cannot become RGB; row skipped"),
    "image_too_large": ("warning", "more pixels than the hard limit; row skipped"),
    "image_large": ("warning", "more pixels than the soft limit; kept"),
    # Category as a whole.
    "workbook_missing": ("error", "data.labels is workbook but the master workbook is not there"),
    "missing_category_column": ("error", "the master workbook has no 'Folder Name' column"),
    "empty_category": ("warning", "a master-workbook row with no category; row skipped"),
    "workbook_category_not_in_job": ("warning", "a workbook category the job does not list; unused"),
    "split_file_unreadable": ("error", "data.split_file cannot be read or has no known shape"),
    "split_image_unknown": ("warning", "a split-file entry that names no usable image; unused"),
    "split_image_duplicate": ("warning", "an image listed twice in the split file"),
    "split_image_unlisted": ("warning", "a usable image the split file does not list; trained on"),
    "data_root_not_found": ("error", "the data root folder does not exist"),
    "image_dir_missing": ("error", "the category has a label sheet but no image folder"),
    "images_not_listed": ("warning", "images on disk that the sheet does not list; unused"),
    "no_usable_images": ("error", "no listed image is usable"),
    "no_qa_pairs": ("error", "the usable images have no non-empty answer"),
}

_VALUE_SHOWN = 80  # characters of an offending value quoted in a message
_VALUE_KEPT = 200  # characters of it kept in the `value` field


@dataclass(frozen=True)
class Problem:
    """One problem in the data, with everything a user needs to find and fix it."""

    severity: Severity  # "error" blocks the category; "warning" skips and counts
    code: str  # stable identifier, a key of `CODES`
    message: str  # full user-facing text: where, what, the value, and how to fix it
    file: str | None = None  # the file concerned (label sheet or image), as a path string
    row: int | None = None  # Excel row number (the header row is 1)
    column: str | None = None  # the column header, e.g. "Q3" or "Image Name"
    value: str | None = None  # the offending value as text, shortened when long

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict with every field (None where it does not apply)."""
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.severity.upper()} [{self.code}] {self.message}"


def make_problem(
    code: str,
    what: str,
    *,
    fix: str,
    file: Path | str | None = None,
    row: int | None = None,
    column: str | None = None,
    column_letter: str | None = None,
    value: object = None,
) -> Problem:
    """Build a `Problem` whose severity comes from `CODES` and whose message says it all.

    The message reads ``"<file>, row 5, column 'Q3' (C): <what> Value: '12-14'. Fix: <fix>"``.

    Args:
        code: a key of `CODES`.
        what: one or more sentences saying what is wrong and what was done about it.
        fix: how to fix it, addressed to the person who maintains the data.
        file, row, column, value: where the problem is and the offending value.
        column_letter: the spreadsheet column letter, shown in the message only.

    Raises:
        KeyError: for a code missing from `CODES` (a programming error, not user input).
    """
    severity = CODES[code][0]
    where = []
    if file is not None:
        where.append(str(file))
    if row is not None:
        where.append(f"row {row}")
    if column is not None:
        where.append(f"column {column!r}" + (f" ({column_letter})" if column_letter else ""))
    text = f"{', '.join(where)}: {what}" if where else what
    shown = None if value is None else _as_text(value)
    if shown is not None:
        text += f" Value: {shorten(shown, _VALUE_SHOWN)!r}."
    text += f" Fix: {fix}"
    return Problem(
        severity=severity,
        code=code,
        message=text,
        file=None if file is None else str(file),
        row=row,
        column=column,
        value=None if shown is None else shorten(shown, _VALUE_KEPT),
    )


def _as_text(value: object) -> str:
    return value if isinstance(value, str) else str(value)


def shorten(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, with an ellipsis when cut (for messages only)."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def has_errors(problems: Iterable[Problem]) -> bool:
    """True when any problem blocks the category."""
    return any(p.severity == "error" for p in problems)


def errors_of(problems: Iterable[Problem]) -> list[Problem]:
    """The problems that block the category."""
    return [p for p in problems if p.severity == "error"]


def warnings_of(problems: Iterable[Problem]) -> list[Problem]:
    """The problems that skip or convert one item."""
    return [p for p in problems if p.severity == "warning"]


def count_by_code(problems: Iterable[Problem]) -> dict[str, int]:
    """How many problems of each code, most frequent first."""
    return dict(Counter(p.code for p in problems).most_common())


def format_problems(problems: Iterable[Problem], *, limit_per_code: int | None = None) -> str:
    """One line per problem, errors first; optionally at most `limit_per_code` per code.

    When lines are left out, a last line per code says how many more there were.
    """
    ordered = sorted(problems, key=lambda p: p.severity != "error")
    lines: list[str] = []
    shown: Counter[str] = Counter()
    hidden: Counter[str] = Counter()
    for p in ordered:
        if limit_per_code is not None and shown[p.code] >= limit_per_code:
            hidden[p.code] += 1
            continue
        shown[p.code] += 1
        lines.append(str(p))
    for code, n in hidden.items():
        lines.append(f"... and {n} more [{code}]")
    return "\n".join(lines)
