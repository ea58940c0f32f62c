"""One category's usable data: label sheet rows joined with safe, readable images.

`load_category` is the single entry point for training and for the pre-flight check
(`fada-batch validate`): it finds the sheet and the image folder (aliases and misspellings
included), reads the sheet (`fada_batch.data.sheets`), resolves and checks every listed image
(`fada_batch.data.images`) and returns a `CategoryData` with the usable records, every problem
found and the counts. It raises only for an unknown category name.

Status:
- ``"awaiting_labels"``: no label sheet yet (not an error; nothing to train).
- ``"error"``: at least one error-severity problem: an unreadable or malformed sheet, no
  image folder, or no usable image / no answer left after the per-row checks.
- ``"ok"``: trainable; warnings say which rows, cells and files were skipped.

Per-row decisions: a listed image that is missing, unsafe (``../``, absolute, link pointing
outside), unreadable, truncated or over the hard pixel limit skips its row with a warning.
Images on disk that the sheet does not list give one warning with their count and a few
names (matched by name without extension, case-insensitively).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from fada_batch.data.categories import (
    DEFAULT_WORKBOOK,
    IMAGES_DIR,
    LABELS_DIR,
    NUM_QUESTIONS,
    SHEET_SUFFIX,
    STANDARD_QUESTIONS,
    Category,
    find_image_dir,
    find_sheet,
    get_category,
)
from fada_batch.data.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_WARN_PIXELS,
    ImageError,
    blocks_image,
    check_image,
    index_images,
    indexed_files,
    name_key,
    resolve_image,
)
from fada_batch.data.normalize import Normalization
from fada_batch.data.problems import Problem, count_by_code, has_errors, make_problem
from fada_batch.data.sheets import Sheet, SheetRow, read_sheet
from fada_batch.data.workbook import Workbook, read_workbook, resolve_labels_form
from fada_batch.text import plural

Status = Literal["ok", "awaiting_labels", "error"]

NOT_LISTED_SHOWN = 5  # unlisted image names quoted in the warning
SUGGEST_FOR_FIRST = 20  # missing images that get "similar names" hints (costly on big folders)


@dataclass(frozen=True)
class ImageRecord:
    """One usable image and its answers."""

    image_name: str  # as written in the sheet (unique within a category)
    path: Path  # the file, inside the category's image folder
    answers: list[str | None]  # NUM_QUESTIONS answers; None when empty
    row: int  # Excel row number in the label sheet

    def qa_pairs(self) -> list[tuple[int, str]]:
        """(question index 0..7, answer) for each non-empty answer, in question order."""
        return [(q, a) for q, a in enumerate(self.answers) if a]

    def to_dict(self) -> dict[str, object]:
        return {
            "image_name": self.image_name,
            "path": str(self.path),
            "answers": self.answers,
            "row": self.row,
        }


@dataclass
class CategoryStats:
    """Counts for one category (all zero when it has no usable sheet)."""

    images_listed: int = 0  # rows naming an image, duplicates included
    images_usable: int = 0  # records: found, inside the folder, readable
    images_skipped: int = 0  # listed rows not used (duplicates, missing, unsafe, unreadable)
    images_on_disk: int = 0  # image files in the category folder
    images_not_listed: int = 0  # image files the sheet does not list
    qa_pairs: int = 0  # non-empty answers over the usable images
    qa_pairs_per_question: list[int] = field(default_factory=lambda: [0] * NUM_QUESTIONS)
    empty_answers_per_question: list[int] = field(default_factory=lambda: [0] * NUM_QUESTIONS)
    # ^ over the usable images: answers that are empty or were skipped with a warning


@dataclass
class CategoryData:
    """Everything known about one category's data after loading and checking it."""

    category: Category
    status: Status
    sheet_path: Path | None  # the label sheet found (any alias), or None
    image_dir: Path | None  # the image folder found (any alias), or None
    questions: list[str]  # NUM_QUESTIONS prompt texts (from the sheet header, else standard)
    records: list[ImageRecord] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    stats: CategoryStats = field(default_factory=CategoryStats)
    expected_sheet: Path | None = None  # where a sheet is looked for (canonical name)
    normalization: Normalization | None = None  # what answer normalisation did (None: no sheet)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def qa_pairs(self) -> list[tuple[ImageRecord, int, str]]:
        """(record, question index, answer) over all records, skipping empty answers."""
        return [(r, q, a) for r in self.records for q, a in r.qa_pairs()]

    def to_dict(self, *, include_records: bool = False) -> dict[str, object]:
        """A JSON-ready summary (paths as strings); records only when asked (large)."""
        out: dict[str, object] = {
            "category": self.category.name,
            "display": self.category.display_name,
            "status": self.status,
            "sheet_path": None if self.sheet_path is None else str(self.sheet_path),
            "image_dir": None if self.image_dir is None else str(self.image_dir),
            "expected_sheet": None if self.expected_sheet is None else str(self.expected_sheet),
            "questions": list(self.questions),
            "stats": asdict(self.stats),
            "counts": {
                "errors": len(self.errors),
                "warnings": len(self.warnings),
                "by_code": count_by_code(self.problems),
            },
            "problems": [p.to_dict() for p in self.problems],
        }
        if self.normalization is not None:
            out["normalization"] = self.normalization.to_dict()
        if include_records:
            out["records"] = [r.to_dict() for r in self.records]
        return out


def load_category(
    data_root: Path,
    category: Category | str,
    *,
    clean_answers: bool = True,
    check_images: bool = True,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    warn_image_pixels: int = DEFAULT_WARN_PIXELS,
    workbook: Workbook | None = None,
    normalize: str | None = None,
) -> CategoryData:
    """Load and check one category's sheet and images.

    Args:
        data_root: holds ``Fetal Ultrasound/`` and ``Fetal Ultrasound Labeled/``.
        category: a `Category`, or a name or alias (``"Abodomen"``).
        clean_answers: normalise answers with `fada_batch.text.clean_answer`.
        check_images: verify and decode every listed image (JPEGs at 1/8 scale) so that
            corrupt or truncated files are found now; off only checks that the file exists
            inside the folder.
        max_image_pixels: images with more pixels are skipped (decompression-bomb guard).
        warn_image_pixels: images with more pixels are used but reported.
        normalize: the `data.normalize` level; None: ``clean`` when `clean_answers`, else ``none``.
        workbook: the master workbook already read (`load_workbook`): the category's rows
            come from it instead of a per-category sheet; None reads the sheet.

    Returns:
        The category's data; see the module docstring for the status rules.

    Raises:
        UnknownCategoryError: for a name that is no category or alias, listing the valid ones.
    """
    cat = category if isinstance(category, Category) else get_category(category)
    data_root = Path(data_root)
    data = CategoryData(
        category=cat,
        status="ok",
        sheet_path=None,
        image_dir=None,
        questions=list(STANDARD_QUESTIONS),
        expected_sheet=data_root / LABELS_DIR / f"{cat.sheet}{SHEET_SUFFIX}",
    )
    if not data_root.is_dir():
        data.problems.append(
            make_problem(
                "data_root_not_found",
                "The data root folder does not exist or is not a folder.",
                fix=f"set data.root to the folder that holds '{IMAGES_DIR}/' and '{LABELS_DIR}/'.",
                file=data_root,
            )
        )
        return _finish(data)

    data.image_dir = find_image_dir(data_root, cat)
    sheet = _category_sheet(data, data_root, workbook, clean_answers=clean_answers, normalize=normalize)
    if sheet is None:
        return _finish(data) if data.problems else data
    data.questions = list(sheet.questions)
    data.problems.extend(sheet.problems)
    data.stats.images_listed = len(sheet.listed_names)
    if data.image_dir is None:
        data.problems.append(_no_image_dir(data_root, cat, data.sheet_path))
        return _finish(data)
    _read_images(
        data,
        sheet,
        check_images=check_images,
        max_pixels=max_image_pixels,
        warn_pixels=warn_image_pixels,
    )
    return _finish(data)


def _category_sheet(
    data: CategoryData,
    data_root: Path,
    workbook: Workbook | None,
    *,
    clean_answers: bool,
    normalize: str | None,
) -> Sheet | None:
    """The category's rows: its rows of the master workbook, else its own sheet. None when
    there are none (status set to awaiting labels) or the workbook is broken (its errors
    added to `data.problems`)."""
    cat = data.category
    if workbook is not None:
        data.expected_sheet = data.sheet_path = workbook.path
        if has_errors(workbook.problems):
            data.problems.extend(p for p in workbook.problems if p.severity == "error")
            return None
        found = workbook.sheet_for(cat)
        if found is None:
            data.status, data.sheet_path = "awaiting_labels", None
        else:
            data.normalization = found.normalization
        return found
    data.sheet_path = find_sheet(data_root, cat)
    if data.sheet_path is None:
        data.status = "awaiting_labels"
        return None
    sheet = read_sheet(data.sheet_path, clean_answers=clean_answers, normalize=normalize)
    data.normalization = sheet.normalization
    return sheet


def load_workbook(
    data_root: Path,
    labels: str,
    workbook: str,
    categories: list[Category],
    *,
    clean_answers: bool = True,
    normalize: str | None = None,
    cache_dir: Path | None = None,
) -> Workbook | None:
    """The master workbook split over `categories` when `data.labels` (`labels`) and the
    data root call for it (`fada_batch.data.workbook.resolve_labels_form`), else None;
    `cache_dir`: see `read_workbook`."""
    path = resolve_labels_form(Path(data_root), labels, workbook)
    if path is None:
        return None
    return read_workbook(
        path, categories, clean_answers=clean_answers, normalize=normalize, cache_dir=cache_dir
    )


def has_labels(
    data_root: Path,
    category: Category,
    *,
    labels: str = "auto",
    workbook: str = "",
    cache_dir: Path | None = None,
) -> bool:
    """True when the category has labels in the form the job reads (`data.labels`): its
    sheet, or rows in the master workbook. A missing or broken workbook counts as labels,
    so that loading the category reports it instead of the category waiting quietly."""
    path = resolve_labels_form(Path(data_root), labels, workbook or DEFAULT_WORKBOOK)
    if path is None:
        return find_sheet(Path(data_root), category) is not None
    book = read_workbook(path, [category], cache_dir=cache_dir)
    return book.sheet_for(category) is not None or has_errors(book.problems)


def _read_images(
    data: CategoryData, sheet: Sheet, *, check_images: bool, max_pixels: int, warn_pixels: int
) -> None:
    """Fill `data.records` with the sheet's rows whose images can be used, and report the
    image folder that cannot be listed, images on disk the sheet does not list, and a sheet
    none of whose images can be used."""
    assert data.image_dir is not None and data.sheet_path is not None
    try:
        index = index_images(data.image_dir)
    except OSError as exc:
        data.problems.append(
            make_problem(
                "image_dir_missing",
                f"The image folder cannot be listed ({type(exc).__name__}: {exc}).",
                fix="check that the folder exists and that this user may read it.",
                file=data.image_dir,
            )
        )
        return
    on_disk = indexed_files(index)
    data.stats.images_on_disk = len(on_disk)
    data.records = _usable_records(
        data,
        sheet,
        index,
        check_images=check_images,
        max_pixels=max_pixels,
        warn_pixels=warn_pixels,
    )
    _report_not_listed(data, sheet, on_disk)
    if sheet.listed_names and not data.records:
        data.problems.append(
            make_problem(
                "no_usable_images",
                f"None of the {plural(len(sheet.listed_names), 'image')} listed in the sheet can be used "
                f"(see the warnings above); nothing is left to train {data.category.name} on.",
                fix=f"put the listed images in '{data.image_dir}' or correct the names in the sheet.",
                file=data.sheet_path,
            )
        )


def _no_image_dir(data_root: Path, cat: Category, sheet_path: Path) -> Problem:
    images = data_root / IMAGES_DIR
    if images.is_dir():
        found = sorted(p.name for p in images.iterdir() if p.is_dir() and not p.name.startswith("."))
        seen = f" Folders in '{images}': {', '.join(found) or 'none'}."
    else:
        seen = f" The folder '{images}' itself does not exist."
    return make_problem(
        "image_dir_missing",
        f"{cat.name} has a label sheet ('{sheet_path.name}') but no image folder: expected "
        f"'{images / cat.folder}'.{seen}",
        fix=f"put the {cat.name} images in '{images / cat.folder}' (also accepted: "
        f"{', '.join(sorted(set(cat.all_names()) - {cat.folder}))}).",
        file=images / cat.folder,
    )


def _usable_records(
    data: CategoryData,
    sheet: Sheet,
    index: dict[str, Path],
    *,
    check_images: bool,
    max_pixels: int,
    warn_pixels: int,
) -> list[ImageRecord]:
    """Resolve and check each sheet row's image; problems go to `data.problems`."""
    assert data.image_dir is not None  # internal invariant: checked by the caller
    records: list[ImageRecord] = []
    missing = 0
    for row in sheet.rows:
        try:
            path = resolve_image(
                data.image_dir,
                row.image_name,
                index,
                sheet=sheet.path,
                row=row.row,
                suggest=missing < SUGGEST_FOR_FIRST,
            )
        except ImageError as exc:
            missing += exc.problem.code == "image_missing"
            data.problems.append(exc.problem)
            continue
        if check_images:
            found = check_image(path, max_pixels=max_pixels, warn_pixels=warn_pixels, row=row.row)
            data.problems.extend(found)
            if any(blocks_image(p) for p in found):
                continue
        records.append(_record(row, path))
    return records


def _record(row: SheetRow, path: Path) -> ImageRecord:
    return ImageRecord(image_name=row.image_name, path=path, answers=list(row.answers), row=row.row)


def _report_not_listed(data: CategoryData, sheet: Sheet, on_disk: list[Path]) -> None:
    listed = {name_key(n) for n in sheet.listed_names}
    unlisted = [p for p in on_disk if name_key(p.name) not in listed]
    data.stats.images_not_listed = len(unlisted)
    if not unlisted:
        return
    shown = ", ".join(p.name for p in unlisted[:NOT_LISTED_SHOWN])
    more = f" and {len(unlisted) - NOT_LISTED_SHOWN} more" if len(unlisted) > NOT_LISTED_SHOWN else ""
    data.problems.append(
        make_problem(
            "images_not_listed",
            f"{plural(len(unlisted), 'image')} in the folder {'is' if len(unlisted) == 1 else 'are'} not "
            f"listed in '{sheet.path.name}' and not used: {shown}{more}.",
            fix="add a row for each image that should be used; nothing if they are meant to stay out.",
            file=data.image_dir,
        )
    )


def _finish(data: CategoryData) -> CategoryData:
    """Fill the answer counts, add the no-answers error, and set the status."""
    s = data.stats
    s.images_usable = len(data.records)
    s.images_skipped = max(0, s.images_listed - s.images_usable)
    s.qa_pairs_per_question = [
        sum(r.answers[q] is not None for r in data.records) for q in range(NUM_QUESTIONS)
    ]
    s.empty_answers_per_question = [s.images_usable - n for n in s.qa_pairs_per_question]
    s.qa_pairs = sum(s.qa_pairs_per_question)
    if data.records and s.qa_pairs == 0:
        data.problems.append(
            make_problem(
                "no_qa_pairs",
                f"The {s.images_usable} usable images have no non-empty answer; there is nothing to "
                "train on.",
                fix="fill in the answers (Q1..Q8) in the label sheet.",
                file=data.sheet_path,
            )
        )
    data.status = "error" if has_errors(data.problems) else "ok"
    return data
