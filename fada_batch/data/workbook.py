"""The master workbook: every category's labels in one worksheet with a category column.

The FADA team keeps its annotations as one workbook (`Fetal Ultrasound Annotations
Final.xlsx` by default, `data.workbook`) whose first worksheet has a `Folder Name` column
naming each row's category, an `Image Name` column and Q1..Q8; images stay under
`Fetal Ultrasound/<Folder Name>/`. `read_workbook` reads it once and splits it into one
`Sheet` per category, through the same parser as the per-category sheets
(`fada_batch.data.sheets.parse_rows`), so every per-row check and message is the same and
Excel row numbers are those of the workbook.

Category values are matched to the job's categories by name or alias, case- and
separator-insensitively. Rows whose category is not in the job are not dropped silently:
`Workbook.not_in_job` counts them per value and `unknown_category_problems` words the
warning (`workbook_category_not_in_job`); a category of the job with no row is awaiting
labels. Rows with answers but no category give `empty_category` (warning, row skipped).

Which form a job uses is `data.labels`: ``per_category``, ``workbook``, or ``auto`` (the
workbook when `data.workbook` exists under the data root and no per-category sheet does;
`resolve_labels_form`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from fada_batch.data.categories import (
    DEFAULT_TABLE,
    LABELS_DIR,
    SHEET_SUFFIX,
    Category,
    CategoryTable,
    UnknownCategoryError,
    category_key,
)
from fada_batch.data.problems import Problem, make_problem, shorten
from fada_batch.data.sheets import Cell, Sheet, find_header, header_key, parse_rows
from fada_batch.data.workbook_cache import first_worksheet
from fada_batch.text import plural

logger = logging.getLogger(__name__)

CATEGORY_HEADERS = frozenset({"foldername", "folder", "category", "class", "view"})  # `header_key`s


@dataclass
class Workbook:
    """A master workbook split by category."""

    path: Path
    sheets: dict[str, Sheet] = field(default_factory=dict)  # canonical category name -> rows
    not_in_job: dict[str, int] = field(default_factory=dict)  # category value -> row count
    first_row_not_in_job: dict[str, int] = field(default_factory=dict)  # value -> Excel row
    problems: list[Problem] = field(default_factory=list)  # about the whole workbook
    rows_read: int = 0  # data rows with a category and an image name

    def sheet_for(self, category: Category) -> Sheet | None:
        """The category's rows, or None when the workbook has none (awaiting labels)."""
        return self.sheets.get(category.name)


def _find_category_column(rows: list[tuple[Cell, ...]]) -> tuple[int, int] | None:
    """(header row index, category column index): the header row is found as in a
    per-category sheet (`sheets.find_header`, the first rows' first with an Image Name
    column); None when there is none or it has no category column."""
    header_idx = find_header(rows)
    if header_idx is None:
        return None
    for j, value in enumerate(rows[header_idx]):
        if header_key(value) in CATEGORY_HEADERS:
            return header_idx, j
    return None


def read_workbook(
    path: Path,
    categories: list[Category],
    *,
    clean_answers: bool = True,
    normalize: str | None = None,
    cache_dir: Path | None = None,
) -> Workbook:
    """Read the master workbook and split its rows over `categories`; never raises for bad
    data (problems go to `Workbook.problems`, and per category to each `Sheet`).

    `cache_dir` keeps the cell values read, keyed by the file's content
    (`fada_batch.data.workbook_cache`), so that the next read of the same workbook (the
    array's other tasks) skips openpyxl."""
    book = Workbook(path=path)
    if not path.is_file():
        book.problems.append(
            make_problem(
                "workbook_missing",
                "The master workbook is not there (data.labels is 'workbook').",
                fix="set data.workbook to the workbook's path (relative to data.root or absolute), "
                "or data.labels: per_category (or auto) to read one sheet per category.",
                file=path,
            )
        )
        return book
    try:
        title, rows = first_worksheet(path, cache_dir)
    except Exception as exc:  # openpyxl/zipfile raise many types for a bad file
        book.problems.append(
            make_problem(
                "sheet_unreadable",
                f"The master workbook cannot be opened as an Excel .xlsx workbook "
                f"({type(exc).__name__}: {shorten(str(exc), 200)}).",
                fix="open it in Excel or LibreOffice and save it again as 'Excel Workbook (.xlsx)'.",
                file=path,
            )
        )
        return book
    found = _find_category_column(rows)
    if found is None:
        book.problems.append(
            make_problem(
                "missing_category_column",
                f"The first worksheet ({title!r}) of the master workbook has no header row with "
                "both 'Image Name' and a category column ('Folder Name').",
                fix="add a 'Folder Name' column naming each row's category (its image folder), "
                "or set data.labels: per_category to read one sheet per category.",
                file=path,
            )
        )
        return book
    header_idx, cat_col = found
    _split_rows(
        book, title, rows, header_idx, cat_col, categories, clean_answers=clean_answers, normalize=normalize
    )
    return book


def _split_rows(
    book: Workbook,
    title: str,
    rows: list[tuple[Cell, ...]],
    header_idx: int,
    cat_col: int,
    categories: list[Category],
    *,
    clean_answers: bool,
    normalize: str | None,
) -> None:
    """Group the rows by category and parse each group as a sheet of its own."""
    by_key = {category_key(n): c for c in categories for n in c.all_names()}

    def without_category(values: tuple[Cell, ...]) -> tuple[Cell, ...]:
        return (*values[:cat_col], None, *values[cat_col + 1 :])

    groups: dict[str, list[tuple[Cell, ...]]] = {}
    for i in range(header_idx + 1, len(rows)):
        values = rows[i]
        raw = values[cat_col] if cat_col < len(values) else None
        text = str(raw).strip() if raw is not None else ""
        rest = without_category(values)
        if not text:
            if any(v is not None and str(v).strip() for v in rest):
                book.problems.append(
                    make_problem(
                        "empty_category",
                        "The row has data but no category in 'Folder Name'; it is skipped.",
                        fix="type the row's category (its image folder name) in 'Folder Name'.",
                        file=book.path,
                        row=i + 1,
                        column="Folder Name",
                    )
                )
            continue
        cat = by_key.get(category_key(text))
        if cat is None:
            book.not_in_job[text] = book.not_in_job.get(text, 0) + 1
            book.first_row_not_in_job.setdefault(text, i + 1)
            continue
        book.rows_read += 1
        groups.setdefault(cat.name, []).append((i, rest))
    header = without_category(rows[header_idx])
    top = [*rows[:header_idx], header]
    for name, members in groups.items():
        book.sheets[name] = parse_rows(
            book.path,
            title,
            top + [values for _, values in members],
            clean_answers=clean_answers,
            normalize=normalize,
            row_numbers=[i + 1 for i, _ in members],
        )
    logger.debug("%s: %d rows in %d categories", book.path, book.rows_read, len(groups))


def unknown_category_problems(book: Workbook, table: CategoryTable = DEFAULT_TABLE) -> list[Problem]:
    """One warning per workbook category that the job does not list (its rows unused);
    `table`: the job's categories (`DataConfig.table`)."""
    problems = []
    for value, n in sorted(book.not_in_job.items()):
        try:
            known = table.get(value).name
        except UnknownCategoryError:
            fix = (
                f"{value!r} is no known category or alias: correct it in 'Folder Name', name its "
                f"category in data.category_aliases (known: {', '.join(table.names)}), or add it as "
                f"a category of its own with data.category_table: {{{value}: {{display: ...}}}} and "
                "list it in data.categories; nothing if these rows are meant to stay out."
            )
        else:
            fix = f"add {known!r} to data.categories to train it; nothing if it is meant to stay out."
        problems.append(
            make_problem(
                "workbook_category_not_in_job",
                f"{plural(n, 'row')} of category {value!r} (first at row "
                f"{book.first_row_not_in_job[value]}) belong to no category of the job; they are not used.",
                fix=fix,
                file=book.path,
                column="Folder Name",
                value=value,
            )
        )
    return problems


def has_category_sheets(data_root: Path) -> bool:
    """True when `Fetal Ultrasound Labeled/` holds at least one `*_image_list.xlsx`."""
    labels = data_root / LABELS_DIR
    if not labels.is_dir():
        return False
    return any(
        p.name.lower().endswith(SHEET_SUFFIX) and not p.name.startswith((".", "~$")) for p in labels.iterdir()
    )


def resolve_labels_form(data_root: Path, labels: str, workbook: str) -> Path | None:
    """The master workbook to read, or None for per-category sheets.

    ``workbook`` forces the workbook (returned even when missing, so that its absence is
    reported); ``per_category`` never reads it; ``auto`` reads it when it exists and no
    per-category sheet does.
    """
    path = Path(workbook)
    path = path if path.is_absolute() else data_root / path
    if labels == "workbook":
        return path
    if labels == "per_category":
        return None
    return path if path.is_file() and not has_category_sheets(data_root) else None
