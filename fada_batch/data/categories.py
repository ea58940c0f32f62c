"""The nine anatomical categories, their folder and sheet names, and names found in the wild.

Images live in `<data root>/Fetal Ultrasound/{folder}/` and labels in
`<data root>/Fetal Ultrasound Labeled/{sheet}_image_list.xlsx`. Real data sets misspell both
(an `Abodomen_image_list.xlsx` belongs to Abdomen), so every category carries aliases, and
lookups are case- and separator-insensitive.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

IMAGES_DIR = "Fetal Ultrasound"
LABELS_DIR = "Fetal Ultrasound Labeled"
SHEET_SUFFIX = "_image_list.xlsx"

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


@dataclass(frozen=True)
class Category:
    """One anatomical category: its canonical name, folder/sheet names and known aliases."""

    name: str  # canonical name, e.g. "Abdomen"
    folder: str  # image folder under `Fetal Ultrasound/`
    sheet: str  # sheet stem: `{sheet}_image_list.xlsx`
    aliases: tuple[str, ...] = field(default=())

    @property
    def slug(self) -> str:
        """Lower-case name used in output folders: `blip2_{slug}`."""
        return self.name.lower().replace("-", "_")

    @property
    def output_dirname(self) -> str:
        return f"blip2_{self.slug}"

    def all_names(self) -> tuple[str, ...]:
        return (self.name, self.folder, self.sheet, *self.aliases)


CATEGORIES: tuple[Category, ...] = (
    Category("Abdomen", "Abdomen", "Abdomen", aliases=("Abodomen", "Abdominal")),
    Category("Femur", "Femur", "Femur"),
    Category("Thorax", "Thorax", "Thorax", aliases=("Thoracic", "Chest")),
    Category("Standard_NT", "Standard_NT", "Standard_NT", aliases=("Standard NT", "StandardNT")),
    Category(
        "Non_standard_NT",
        "Non_standard_NT",
        "Non_standard_NT",
        aliases=("Non-standard_NT", "Nonstandard_NT", "Non standard NT"),
    ),
    Category("Cervix", "Cervix", "Cervix", aliases=("Cervical",)),
    Category(
        "Trans-cerebellum",
        "Trans-cerebellum",
        "Trans-cerebellum",
        aliases=("Trans_cerebellum", "Transcerebellum", "Trans-cerebellar"),
    ),
    Category(
        "Trans-thalamic",
        "Trans-thalamic",
        "Trans-thalamic",
        aliases=("Trans_thalamic", "Transthalamic"),
    ),
    Category(
        "Trans-ventricular",
        "Trans-ventricular",
        "Trans-ventricular",
        aliases=("Trans_ventricular", "Transventricular"),
    ),
)
CATEGORY_NAMES: tuple[str, ...] = tuple(c.name for c in CATEGORIES)


def _key(name: str) -> str:
    """Normalise a name for matching: lower case, no spaces, dashes or underscores."""
    return re.sub(r"[\s_\-]+", "", name).lower()


_BY_KEY: dict[str, Category] = {}
for _c in CATEGORIES:
    for _n in _c.all_names():
        _BY_KEY.setdefault(_key(_n), _c)


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
