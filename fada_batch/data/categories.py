"""The FADA team's 14 anatomical categories, their folder and sheet names, display names and
names found in the wild.

Images live in `<data root>/Fetal Ultrasound/{folder}/`; labels either in one sheet per
category, `<data root>/Fetal Ultrasound Labeled/{sheet}_image_list.xlsx`, or in one master
workbook with a `Folder Name` column (`fada_batch.data.workbook`). Real data sets misspell
names (an `Abodomen_image_list.xlsx` belongs to Abdomen), so every category carries aliases,
and lookups are case- and separator-insensitive.

`Cervical` and `Cervix` are two categories in the team's data (a cervical view and a direct
cervix view), so `Cervical` is no alias of `Cervix`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

IMAGES_DIR = "Fetal Ultrasound"
LABELS_DIR = "Fetal Ultrasound Labeled"
SHEET_SUFFIX = "_image_list.xlsx"
# The FADA team's master workbook (every category, a `Folder Name` column), in the data root.
DEFAULT_WORKBOOK = "Fetal Ultrasound Annotations Final.xlsx"
# Written into the data root by `fada-batch demo`: these are synthetic scans, and a report says so.
DEMO_DATA_MARKER = "fada_demo_data.json"
# Written into the tiny test model's folder (`tools.tiny`): a report on it says so.
TINY_MODEL_MARKER = "fada_tiny_model.json"

# The seed's eight standard questions (Q1..Q8). A sheet header may carry its own text for a
# question; when it does not, the prompt uses these.
STANDARD_QUESTIONS: tuple[str, ...] = (
    "Anatomical Structures: List all visible anatomical structures in the image and describe "
    "their appearance",
    "Fetal Orientation: Describe the orientation of the fetus in this ultrasound view",
    "Plane Evaluation: Assess if the image is taken at a standard diagnostic plane and describe "
    "its diagnostic value",
    "Biometric Measurements: Identify any biometric measurements that can be taken from this view",
    "Gestational Age: Based on visible structures, estimate the gestational age range if possible",
    "Image Quality: Evaluate the overall image quality, clarity, and diagnostic utility",
    "Normality/Abnormality: Identify any visible abnormalities or deviations from normal anatomy",
    "Clinical Recommendations: Provide clinical recommendations based on the ultrasound findings",
)
NUM_QUESTIONS = len(STANDARD_QUESTIONS)
# Other titles of the standard questions, as the FADA team's master workbook heads them
# (`Q3: Imaging Plane`): a header that is only a title uses the full standard question.
QUESTION_TITLE_ALIASES: dict[int, tuple[str, ...]] = {2: ("Imaging Plane",), 6: ("Normality Assessment",)}


@dataclass(frozen=True)
class Category:
    """One anatomical category: its canonical name, folder/sheet names and known aliases."""

    name: str  # canonical name, e.g. "Abdomen" (also the `Folder Name` in a master workbook)
    folder: str  # image folder under `Fetal Ultrasound/`
    sheet: str  # sheet stem: `{sheet}_image_list.xlsx`
    aliases: tuple[str, ...] = field(default=())
    display: str = ""  # name shown to people ("Transcerebellar Plane"); empty = `name`

    @property
    def slug(self) -> str:
        """Lower-case name used in output folders: `blip2_{slug}`."""
        return self.name.lower().replace("-", "_")

    @property
    def output_dirname(self) -> str:
        return f"blip2_{self.slug}"

    @property
    def display_name(self) -> str:
        return self.display or self.name

    def all_names(self) -> tuple[str, ...]:
        return (self.name, self.folder, self.sheet, *self.aliases, *((self.display,) if self.display else ()))


def _cat(name: str, *aliases: str, display: str = "") -> Category:
    """A category whose folder and sheet are named like it."""
    return Category(name, name, name, aliases=aliases, display=display)


CATEGORIES: tuple[Category, ...] = (
    _cat("Abdomen", "Abodomen", "Abdominal"),
    _cat("Femur"),
    _cat("Thorax", "Thoracic", "Chest"),
    _cat("Standard_NT", "Standard NT", "StandardNT", display="Standard NT"),
    _cat(
        "Non_standard_NT", "Non-standard_NT", "Nonstandard_NT", "Non standard NT", display="Non-standard NT"
    ),
    _cat("Cervix"),
    _cat(
        "Trans-cerebellum",
        "Trans_cerebellum",
        "Transcerebellum",
        "Trans-cerebellar",
        display="Transcerebellar Plane",
    ),
    _cat("Trans-thalamic", "Trans_thalamic", "Transthalamic", display="Transthalamic Plane"),
    _cat("Trans-ventricular", "Trans_ventricular", "Transventricular", display="Transventricular Plane"),
    _cat("Aorta", "Aortic Arch", display="Aortic Arch"),
    _cat("Cervical", "Cervical View", display="Cervical View"),
    _cat("CRL-View", "CRL", "CRL_View", display="Crown-Rump Length View"),
    _cat("NT-View", "NT_View", "NT View", display="Nuchal Translucency View"),
    _cat(
        "Public_Symphysis_fetal_head",
        "Pubic_Symphysis_fetal_head",
        "Public Symphysis fetal head",
        display="Fetal Head Position",
    ),
)
CATEGORY_NAMES: tuple[str, ...] = tuple(c.name for c in CATEGORIES)
# The seed's nine categories (the first nine above): the tiny test model is built on these
# names, so adding a category does not change it.
SEED_CATEGORY_NAMES: tuple[str, ...] = CATEGORY_NAMES[:9]


def _key(name: str) -> str:
    """Normalise a name for matching: lower case, no spaces, dashes or underscores."""
    return re.sub(r"[\s_\-]+", "", name).lower()


category_key = _key  # public: how names are compared (workbook category values too)

_BY_KEY: dict[str, Category] = {}
for _c in CATEGORIES:
    for _n in _c.all_names():
        _BY_KEY.setdefault(_key(_n), _c)


def with_aliases(category: Category, extra: dict[str, list[str]]) -> Category:
    """`category` with the job's own aliases for it (`data.category_aliases`) added."""
    mine = [
        a
        for name, aliases in extra.items()
        if get_category(name).name == category.name
        for a in aliases
        if a not in category.aliases
    ]
    return replace(category, aliases=(*category.aliases, *mine)) if mine else category


class UnknownCategoryError(ValueError):
    """A category name that is neither a canonical name nor a known alias."""


def get_category(name: str) -> Category:
    """Return the category for a canonical name or an alias (case/separator-insensitive).

    Raises:
        UnknownCategoryError: naming the valid categories.
    """
    cat = _BY_KEY.get(_key(name))
    if cat is None:
        raise UnknownCategoryError(
            f"Unknown category {name!r}. Valid categories are: {', '.join(CATEGORY_NAMES)} "
            "(aliases such as 'Abodomen' are accepted)."
        )
    return cat


class CategoryTable:
    """The categories a job knows: the 14 defaults, plus or re-described by the job's own
    (`data.category_table`, `data.category_aliases`). Looks names up like `get_category`."""

    def __init__(self, categories: tuple[Category, ...] = CATEGORIES) -> None:
        self.categories = tuple(categories)
        self._by_key: dict[str, Category] = {}
        for c in self.categories:
            for n in c.all_names():
                self._by_key.setdefault(_key(n), c)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.categories)

    def __iter__(self) -> Iterator[Category]:
        return iter(self.categories)

    def get(self, name: str) -> Category:
        """The category for a name or alias (case/separator-insensitive).

        Raises:
            UnknownCategoryError: naming the valid categories and how to add one.
        """
        cat = self._by_key.get(_key(name))
        if cat is None:
            raise UnknownCategoryError(
                f"Unknown category {name!r}. Valid categories are: {', '.join(self.names)} "
                "(aliases such as 'Abodomen' are accepted); a new one is added with "
                f"data.category_table: {{{name}: {{display: ..., aliases: [...]}}}}."
            )
        return cat

    def for_folder(self, dirname: str) -> Category | None:
        """The category whose output folder is `dirname` (`blip2_{slug}`), or None."""
        return next((c for c in self.categories if c.output_dirname == dirname), None)


DEFAULT_TABLE = CategoryTable()


def build_table(
    entries: dict[str, dict[str, Any]], extra_aliases: dict[str, list[str]]
) -> tuple[CategoryTable, list[str]]:
    """The job's category table and its problems (each naming the job key and the fix).

    `entries` (`data.category_table`): name -> folder, sheet, aliases, display (each
    optional). A name that is a default category re-describes it (folder, sheet and display
    replaced, aliases added); any other name is a new category whose folder and sheet default
    to the name. `extra_aliases` (`data.category_aliases`) adds names to any category. A
    name may belong to one category only.
    """
    problems: list[str] = []
    cats = {c.name: c for c in CATEGORIES}
    added: list[tuple[str, str, str]] = []  # (job key, category, name it adds)
    for name, entry in entries.items():
        default = DEFAULT_TABLE._by_key.get(_key(name))
        if default is not None and _key(default.name) != _key(name):
            problems.append(
                f"data.category_table: {name!r} is an alias of the category {default.name}; "
                f"use the name {default.name!r} to re-describe it"
            )
            continue
        base = default or Category(name, name, name)
        new = replace(
            base,
            folder=entry.get("folder") or base.folder,
            sheet=entry.get("sheet") or base.sheet,
            aliases=(*base.aliases, *(a for a in entry.get("aliases") or () if a not in base.aliases)),
            display=entry.get("display") or base.display,
        )
        cats[base.name] = new
        key = f"data.category_table.{name}"
        added += [
            (key, new.name, n) for n in new.all_names() if default is None or n not in default.all_names()
        ]
    table = CategoryTable(tuple(cats.values()))
    for name, aliases in extra_aliases.items():
        try:
            cat = table.get(name)
        except UnknownCategoryError as e:
            problems.append(f"data.category_aliases: {e}")
            continue
        cats[cat.name] = replace(cat, aliases=(*cat.aliases, *(a for a in aliases if a not in cat.aliases)))
        added += [("data.category_aliases", cat.name, a) for a in aliases]
    return CategoryTable(tuple(cats.values())), problems + _clashes(added)


def _clashes(added: list[tuple[str, str, str]]) -> list[str]:
    """A problem for each name the job gives a category that already names another one
    (a default category's names first, then the job's in order)."""
    owner = {k: c.name for k, c in DEFAULT_TABLE._by_key.items()}
    problems = []
    for key, cat, name in added:
        first = owner.setdefault(_key(name), cat)
        if first != cat:
            problems.append(
                f"{key}: {name!r} is given for {cat} but already names {first}; remove it from one of them"
            )
    return problems


def find_sheet(data_root: Path, category: Category) -> Path | None:
    """Return the label sheet of a category under `data_root`, or None when it has none.

    Accepts any alias as the sheet stem (`Abodomen_image_list.xlsx` for Abdomen), matched
    case- and separator-insensitively; the canonical name wins when several exist.
    """
    labels = data_root / LABELS_DIR
    if not labels.is_dir():
        return None
    exact = labels / f"{category.sheet}{SHEET_SUFFIX}"
    if exact.is_file():
        return exact
    wanted = {_key(n) for n in category.all_names()}
    for path in sorted(labels.iterdir()):
        name = path.name
        if name.startswith((".", "~$")) or not name.lower().endswith(SHEET_SUFFIX):
            continue
        stem = name[: -len(SHEET_SUFFIX)]
        if _key(stem) in wanted and path.is_file():
            return path
    return None


def find_image_dir(data_root: Path, category: Category) -> Path | None:
    """Return the image folder of a category (any alias), or None when there is none."""
    images = data_root / IMAGES_DIR
    if not images.is_dir():
        return None
    exact = images / category.folder
    if exact.is_dir():
        return exact
    wanted = {_key(n) for n in category.all_names()}
    for path in sorted(images.iterdir()):
        if path.is_dir() and _key(path.name) in wanted:
            return path
    return None
