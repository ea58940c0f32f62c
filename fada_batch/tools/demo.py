"""A small synthetic data set in the real folder layout, for demos and end-to-end tests.

`make_demo_data(root)` writes grayscale ultrasound-like scans (a fan-shaped sector with
speckle and one bright structure) under `root/Fetal Ultrasound/{folder}/` and label sheets
under `root/Fetal Ultrasound Labeled/{sheet}_image_list.xlsx`, in the style real sheets use:
an `Image Name` column, then eight columns whose headers are `Q1:` + newline + the question.

Two answers are a function of what is drawn, so that learning can be measured:

- Q2 (Fetal Orientation) says on which side of the image the structure lies;
- Q6 (Image Quality) says whether the scan is clean or heavily speckled.

Side and noise are balanced within a category, so the majority answer scores 50% on them.
The other answers are constant per category or drawn independently of the image. The
sheets carry blemishes found in the wild: names without extension, double spaces, trailing
periods and empty cells; Abdomen uses the misspelled folder and sheet name `Abodomen`; and
Cervix has images but no sheet (it must come out as "awaiting labels").

With `abnormal_fraction` > 0 (off by default), that share of each category's scans also
carries an abnormal finding: a large echogenic (bright) mass in the half opposite the
structure, and Q7 (Normality Assessment) says so (`ABNORMAL_ANSWERS`: "Femoral abnormality
seen") instead of "No abnormality seen". The finding is rare, as abnormal answers are in the
real sheets (most of their Q7 answers say normal), so the majority answer ("normal") has a
sensitivity of 0 for it. The other scans keep their pixels and answers.

`form="workbook"` writes the labels as the FADA team holds them instead: one master workbook
(`Fetal Ultrasound Annotations Final.xlsx`, a `Folder Name` column, the team's short question
titles) with no Cervix rows, and with their kind of noise on about a quarter of the rows:
misspellings the spelling table fixes (`palne`, `lengh`, `iamge`, `chammber`) and
answer variants the canonical table unifies (`routine follow up`), so that `validate` with
`data.normalize: canonical` shows what each layer does.

`render_scan` and `describe` are public because the tiny model's pretraining
(`fada_batch.tools.tiny`) draws its captioned scans from the same renderer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from fada_batch.data.categories import (
    DEFAULT_WORKBOOK,
    DEMO_DATA_MARKER,
    IMAGES_DIR,
    LABELS_DIR,
    SHEET_SUFFIX,
    STANDARD_QUESTIONS,
    get_category,
)

logger = logging.getLogger(__name__)

SIDES: tuple[str, ...] = ("left", "right")
DEFAULT_IMAGE_SIZE = 128  # pixels per side of the PNGs written by make_demo_data
DEFAULT_IMAGES_PER_CATEGORY = 60

# (category, folder name written, sheet stem written or None for "no sheet").
# Abdomen uses the misspelled names found in the wild; categories.py aliases resolve them.
DEMO_LAYOUT: tuple[tuple[str, str, str | None], ...] = (
    ("Abdomen", "Abodomen", "Abodomen"),
    ("Femur", "Femur", "Femur"),
    ("Thorax", "Thorax", "Thorax"),
    ("Cervix", "Cervix", None),
)

# Answers that depend on the drawn image (index 1 = Q2, index 5 = Q6).
ORIENTATION_ANSWERS: dict[str, str] = {
    "left": "Fetus lies on the left side",
    "right": "Fetus lies on the right side",
}
QUALITY_ANSWERS: dict[bool, str] = {
    False: "Good image quality",
    True: "Poor image quality, heavy noise",
}

# Answers that do not depend on the image: per category, Q1, Q3, Q4, Q7, Q8 are constant.
_CONSTANT_ANSWERS: dict[str, dict[int, str]] = {
    "Abdomen": {
        0: "Stomach bubble and liver",
        2: "Standard abdominal plane",
        3: "Abdominal circumference",
        6: "No abnormality seen",
        7: "Routine follow-up",
    },
    "Femur": {
        0: "Femoral diaphysis",
        2: "Standard femur plane",
        3: "Femur length",
        6: "No abnormality seen",
        7: "Routine follow-up",
    },
    "Thorax": {
        0: "Heart and lungs",
        2: "Standard four chamber plane",
        3: "Thoracic circumference",
        6: "No abnormality seen",
        7: "Routine follow-up",
    },
    "Cervix": {
        0: "Cervical canal",
        2: "Standard cervical plane",
        3: "Cervical length",
        6: "No abnormality seen",
        7: "Routine follow-up",
    },
}
# Q7 of a scan drawn with the abnormal finding (`abnormal_fraction`), per category. Made of
# words the tiny model already answers with (its tokenizer has one token for each): with
# "Abnormality seen" the adapter told the scans apart but started its answer with a wrong
# token ("A", "Abno") on 2-16 of 16 abnormal scans. Kept out of `all_answers`, whose corpus
# the tiny model's recipe is built from (adding them would change the recipe).
ABNORMAL_ANSWERS: dict[str, str] = {
    "Abdomen": "Abdominal abnormality seen",
    "Femur": "Femoral abnormality seen",
    "Thorax": "Thoracic abnormality seen",
    "Cervix": "Cervical abnormality seen",
}
# Q5 (gestational age) is drawn at random, independently of the image: not learnable.
GESTATIONAL_AGE_ANSWERS: tuple[str, ...] = ("20 to 24 weeks", "24 to 28 weeks")

# The master workbook's noise: (question index, right text, wrong text), each fixed by a
# layer of data.normalize (spelling.json, canonical.json).
DEMO_MISSPELLINGS: tuple[tuple[int, tuple[str, str]], ...] = (
    (2, ("plane", "palne")),
    (2, ("chamber", "chammber")),
    (3, ("length", "lengh")),
    (5, ("image", "iamge")),
    (7, ("Routine follow-up", "routine follow up")),
)
# The team's workbook heads its questions with short titles.
WORKBOOK_QUESTION_HEADERS: tuple[str, ...] = (
    "Q1: Anatomical Structures",
    "Q2: Fetal Orientation",
    "Q3: Imaging Plane",
    "Q4: Biometric Measurements",
    "Q5: Gestational Age",
    "Q6: Image Quality",
    "Q7: Normality Assessment",
    "Q8: Clinical Recommendations",
)

# The abnormal finding (`_mass`): centre's distance from the middle towards the half without the
# structure, its depth and its radius, in image units.
MASS_OFFSET, MASS_DEPTH, MASS_RADIUS = 0.2, 0.55, 0.15

# Shape of the bright structure per category; categories not listed get an ellipse.
_SHAPES: dict[str, str] = {
    "Abdomen": "ring",
    "Femur": "bar",
    "Thorax": "heart",
    "Cervix": "band",
}


def all_answers() -> dict[int, tuple[str, ...]]:
    """Every answer the demo data can hold, per question index 0..7 (for tokenizer corpora)."""
    out: dict[int, set[str]] = {i: set() for i in range(len(STANDARD_QUESTIONS))}
    for answers in _CONSTANT_ANSWERS.values():
        for i, a in answers.items():
            out[i].add(a)
    out[1].update(ORIENTATION_ANSWERS.values())
    out[4].update(GESTATIONAL_AGE_ANSWERS)
    out[5].update(QUALITY_ANSWERS.values())
    return {i: tuple(sorted(v)) for i, v in out.items()}


def describe(*, side: str, noisy: bool, category: str) -> str:
    """A caption of a rendered scan in words other than the VQA answers.

    Pretraining on these captions teaches the vision side to encode side and noise without
    teaching the language model the demo's answers ("left side", "image quality").

    >>> describe(side="left", noisy=False, category="Femur")
    'femur sweep, bright echo at nine o clock, crisp smooth texture'
    """
    _check_side(side)
    where = "nine o clock" if side == "left" else "three o clock"
    texture = "grainy speckled texture" if noisy else "crisp smooth texture"
    name = get_category(category).name.lower().replace("_", " ")
    return f"{name} sweep, bright echo at {where}, {texture}"


def render_scan(
    rng: np.random.Generator,
    *,
    side: str,
    noisy: bool,
    size: int = DEFAULT_IMAGE_SIZE,
    category: str = "Abdomen",
    finding: bool = False,
    finding_rng: np.random.Generator | None = None,
) -> Image.Image:
    """Draw one grayscale ultrasound-like scan.

    A fan-shaped sector opens from the top centre; tissue carries multiplicative speckle;
    one bright structure (its shape set by the category) lies in the left or right half.
    A noisy scan has coarse, strong speckle, additive noise and haze; a clean one fine, weak
    speckle.
    The grain of the speckle scales with `size`, so it survives resizing to the model's input.

    Args:
        rng: source of all randomness (position, shape jitter, speckle).
        side: "left" or "right": the image half that holds the structure.
        noisy: heavy noise (poor quality) or not.
        size: width and height in pixels.
        category: a category name or alias; selects the structure's shape.
        finding: also draw the abnormal finding, a large bright mass in the other half
            (`_mass`).
        finding_rng: source of the finding's position and size (default: `rng`);
            `make_demo_data` passes one of its own, so that the scans drawn after an abnormal
            one keep the pixels they have without the finding.

    Returns:
        A `size` x `size` PIL image in mode "L".
    """
    _check_side(side)
    shape = _SHAPES.get(get_category(category).name, "ellipse")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # (S, S) each, in [0, 1)

    # Sector: apex above the top edge, +-40 degrees, depth 0.08..0.97.
    dx, dy = xx - 0.5, yy + 0.02
    radius = np.hypot(dx, dy)
    fan = (np.abs(np.arctan2(dx, dy)) < np.radians(40)) & (radius > 0.08) & (radius < 0.97)

    tissue = 0.28 * np.exp(-0.8 * radius) + 0.06 * _smooth_noise(rng, size, grain=8)
    cx = 0.5 + (-0.2 if side == "left" else 0.2) + rng.uniform(-0.04, 0.04)
    cy = 0.55 + rng.uniform(-0.08, 0.08)
    structure = _structure(shape, xx - cx, yy - cy, rng)
    image = np.maximum(tissue, structure)
    if finding:
        image = np.maximum(image, _mass(xx, yy, finding_rng or rng, side=side))

    if noisy:
        # Poor scans: coarse strong speckle, electronic noise, and haze (clutter that fills in
        # dark regions and lowers contrast, as in scans through a thick abdominal wall).
        speckle = _speckle(rng, size, grain=max(1, size // 32), strength=0.75)
        haze = 0.25 + 0.05 * _smooth_noise(rng, size, grain=max(1, size // 8))
        image = image * speckle + haze + rng.normal(0.0, 0.08, image.shape)
    else:
        image = image * _speckle(rng, size, grain=1, strength=0.15)
    image = np.clip(image, 0.0, 1.0) * fan
    return Image.fromarray((image * 255.0).round().astype(np.uint8), mode="L")


def make_demo_data(
    root: Path,
    *,
    images_per_category: int = DEFAULT_IMAGES_PER_CATEGORY,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    form: str = "per_category",
    abnormal_fraction: float = 0.0,
) -> dict[str, Any]:
    """Write the demo data set under `root` (created if needed; existing files are replaced).

    Args:
        root: the data root; gets `Fetal Ultrasound/` and `Fetal Ultrasound Labeled/`.
        images_per_category: images per category; even numbers balance side and noise exactly.
        seed: the same seed writes the same images and sheets.
        image_size: width and height of the PNGs.
        form: ``per_category`` (one sheet per category) or ``workbook`` (one master workbook
            with misspellings and answer variants; module docstring).
        abnormal_fraction: the share of each category's scans, in [0, 0.5], drawn with the
            abnormal finding and answered `ABNORMAL_ANSWERS` on Q7 (rounded; 0 = none).

    Returns:
        `{"root": Path, "labeled": [names], "unlabeled": [names],
          "counts": {name: number of images}, "sheets": {name: Path},
          "image_dirs": {name: Path}, "abnormal": {name: [file names]}}`.

    Raises:
        ValueError: when `images_per_category` < 2, `form` is unknown or
            `abnormal_fraction` is outside [0, 0.5].
    """
    _check_arguments(form, images_per_category, abnormal_fraction)
    root = Path(root)
    labels_dir = root / LABELS_DIR
    if form == "per_category":
        labels_dir.mkdir(parents=True, exist_ok=True)
    frames: list[pd.DataFrame] = []
    result: dict[str, Any] = {"root": root, "labeled": [], "unlabeled": []}
    result.update({key: {} for key in ("counts", "sheets", "image_dirs", "abnormal")})
    for index, (name, folder, sheet) in enumerate(DEMO_LAYOUT):
        # One generator per category, so categories do not shift each other's draws.
        rng = np.random.default_rng([seed, index])
        image_dir = root / IMAGES_DIR / folder
        image_dir.mkdir(parents=True, exist_ok=True)
        # The finding has its own generator: the other scans keep their pixels and answers.
        finding_rng = np.random.default_rng([seed, index, 7])
        rows = _write_category_images(
            rng, name, image_dir, images_per_category, image_size, (finding_rng, abnormal_fraction)
        )
        result["abnormal"][name] = [r["file"] for r in rows if r["abnormal"]]
        result["counts"][name] = len(rows)
        result["image_dirs"][name] = image_dir
        if sheet is None:
            result["unlabeled"].append(name)
            continue
        result["labeled"].append(name)
        if form == "workbook":
            frame = _sheet_frame(rng, rows, misspell=True)
            frame.insert(0, "Folder Name", folder)
            frames.append(frame)
            result["sheets"][name] = root / DEFAULT_WORKBOOK
            continue
        sheet_path = labels_dir / f"{sheet}{SHEET_SUFFIX}"
        _sheet_frame(rng, rows).to_excel(sheet_path, index=False, engine="openpyxl")
        result["sheets"][name] = sheet_path
    if frames:
        book = pd.concat(frames, ignore_index=True)
        book.columns = ["Folder Name", "Image Name", *WORKBOOK_QUESTION_HEADERS]
        book.to_excel(root / DEFAULT_WORKBOOK, index=False, engine="openpyxl")
    marker = {"synthetic": True, "seed": seed, "form": form, "abnormal_fraction": abnormal_fraction}
    (root / DEMO_DATA_MARKER).write_text(json.dumps(marker) + "\n")
    logger.info(
        "Demo data in %s: %s labeled, %s awaiting labels",
        root,
        ", ".join(result["labeled"]),
        ", ".join(result["unlabeled"]) or "none",
    )
    return result


def _check_arguments(form: str, images_per_category: int, abnormal_fraction: float) -> None:
    """Raise ValueError for arguments of `make_demo_data` it cannot honour."""
    if form not in ("per_category", "workbook"):
        raise ValueError(f"form must be 'per_category' or 'workbook', got {form!r}")
    if images_per_category < 2:
        raise ValueError(f"images_per_category must be at least 2 (one per side), got {images_per_category}")
    if not 0.0 <= abnormal_fraction <= 0.5:
        raise ValueError(
            f"abnormal_fraction must be in [0, 0.5] (a minority of the scans), got {abnormal_fraction}"
        )


def question_header(number: int, question: str) -> str:
    """A sheet header in the style of real sheets: `Q{n}:` + newline + the question text."""
    return f"Q{number}:\n{question}"


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be one of {', '.join(SIDES)}, got {side!r}")


def _smooth_noise(rng: np.random.Generator, size: int, *, grain: int) -> np.ndarray:
    """Zero-mean noise drawn at `size / grain` cells, smoothly upsampled to (size, size)."""
    cells = max(2, -(-size // grain))
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    if cells >= size:
        return coarse[:size, :size]
    smooth = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(smooth, dtype=np.float32)  # (S, S)


def _speckle(rng: np.random.Generator, size: int, *, grain: int, strength: float) -> np.ndarray:
    """Multiplicative speckle with mean ~1: Rayleigh-like magnitude at `grain`-pixel cells."""
    re = _smooth_noise(rng, size, grain=grain)
    im = _smooth_noise(rng, size, grain=grain)
    rayleigh = np.hypot(re, im) / np.sqrt(np.pi / 2.0)  # mean 1 for unit-variance parts
    return (1.0 - strength) + strength * rayleigh  # (S, S)


def _mass(xx: np.ndarray, yy: np.ndarray, rng: np.random.Generator, *, side: str) -> np.ndarray:
    """Intensity map of the abnormal finding: a large, round, very bright (echogenic) mass in the
    half opposite the structure (`side` is the structure's side).

    Its size is what the tiny model can see: on its frozen image features (240 scans to fit a
    linear probe, 160 held out, half of them abnormal), the class means lie 5.3 apart at
    radius 0.15 against 1.4 at radius 0.11 and 0.6 at 0.05 (the features' spread: 4-8), and
    the probe separated radius 0.15 perfectly; LoRA learned it within 8 epochs (docs/evaluation.md).
    """
    cx = 0.5 + (MASS_OFFSET if side == "left" else -MASS_OFFSET) + rng.uniform(-0.03, 0.03)
    cy = MASS_DEPTH + rng.uniform(-0.04, 0.04)
    radius = MASS_RADIUS * rng.uniform(0.9, 1.1)
    return np.where(np.hypot(xx - cx, yy - cy) < radius, 0.95, 0.0)


def _pick_abnormal(rng: np.random.Generator, count: int, fraction: float) -> np.ndarray:
    """(count,) bool: which scans of a category carry the finding (`round(fraction * count)`)."""
    chosen = np.zeros(count, dtype=bool)
    if fraction > 0:
        chosen[rng.permutation(count)[: round(fraction * count)]] = True
    return chosen


def _structure(shape: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Intensity map of one bright structure centred at x = y = 0 (coordinates in image units)."""
    angle = rng.uniform(-0.4, 0.4)
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    scale = rng.uniform(0.9, 1.1)
    if shape == "bar":  # femur: a long, thick, very bright bone
        inside = (np.abs(u) < 0.17 * scale) & (np.abs(v) < 0.035 * scale)
        return np.where(inside, 0.95, 0.0)
    if shape == "band":  # cervix: a curved elongated band
        curve = v - 1.2 * u**2
        inside = (np.abs(u) < 0.18 * scale) & (np.abs(curve) < 0.05 * scale)
        return np.where(inside, 0.8, 0.0)
    r = np.hypot(u / (1.15 * scale), v / (0.95 * scale))
    if shape == "ring":  # abdomen: bright wall, darker inside with a bright spot
        wall = np.where((r > 0.11) & (r < 0.15), 0.9, 0.0)
        spot = np.where(np.hypot(u - 0.04, v) < 0.035, 0.75, 0.0)
        return np.maximum(wall, spot) + np.where(r <= 0.11, 0.35, 0.0)
    if shape == "heart":  # thorax: ribs ring and a bright heart
        wall = np.where((r > 0.12) & (r < 0.15), 0.85, 0.0)
        heart = np.where(np.hypot(u + 0.03, v - 0.02) < 0.06, 0.9, 0.0)
        return np.maximum(wall, heart) + np.where(r <= 0.12, 0.3, 0.0)
    return np.where(r < 0.14, 0.85, 0.0)  # anything else: a bright ellipse


def _write_category_images(
    rng: np.random.Generator,
    category: str,
    image_dir: Path,
    count: int,
    size: int,
    finding: tuple[np.random.Generator, float],
) -> list[dict[str, Any]]:
    """Render and save `count` scans; return one row per image: name, side, noisy, abnormal.

    `finding` is the abnormal finding's own generator and the share of scans that get it.
    """
    finding_rng, fraction = finding
    abnormal = _pick_abnormal(finding_rng, count, fraction)
    # Balanced, independently shuffled sides and noise levels: majority answers score 50%.
    sides = rng.permutation(np.arange(count) % 2)
    noise = rng.permutation(np.arange(count) % 2)
    rows = []
    prefix = image_dir.name.lower()
    for i in range(count):
        side = SIDES[int(sides[i])]
        noisy = bool(noise[i])
        finding = bool(abnormal[i])
        image = render_scan(
            rng,
            side=side,
            noisy=noisy,
            size=size,
            category=category,
            finding=finding,
            finding_rng=finding_rng,
        )
        file_name = f"{prefix}_{i + 1:03d}.png"
        image.save(image_dir / file_name)
        rows.append(
            {"file": file_name, "side": side, "noisy": noisy, "category": category, "abnormal": finding}
        )
    return rows


def _misspell(rng: np.random.Generator, records: list[list[Any]]) -> None:
    """The FADA workbook's kind of noise on about a quarter of the rows (module docstring)."""
    for i in rng.permutation(len(records))[: max(1, len(records) // 4)]:
        for q, (right, wrong) in DEMO_MISSPELLINGS:
            cell = records[i][1 + q]
            if isinstance(cell, str) and right in cell:
                records[i][1 + q] = cell.replace(right, wrong)


def _sheet_frame(
    rng: np.random.Generator, rows: list[dict[str, Any]], *, misspell: bool = False
) -> pd.DataFrame:
    """The label sheet of one category, with a few real-world blemishes mixed in (`rows` from
    `_write_category_images`; a row without "abnormal", as scripts/scale_benchmark.py writes, is normal)."""
    headers = [question_header(i + 1, q) for i, q in enumerate(STANDARD_QUESTIONS)]
    records = []
    for row in rows:
        constant = _CONSTANT_ANSWERS[row["category"]]
        answers = [
            constant[0],
            ORIENTATION_ANSWERS[row["side"]],
            constant[2],
            constant[3],
            GESTATIONAL_AGE_ANSWERS[int(rng.integers(len(GESTATIONAL_AGE_ANSWERS)))],
            QUALITY_ANSWERS[row["noisy"]],
            ABNORMAL_ANSWERS[row["category"]] if row.get("abnormal") else constant[6],
            constant[7],
        ]
        records.append([row["file"], *answers])

    n = len(records)
    # Blemishes, at fixed fractions so every sheet of a reasonable size has some of each:
    # names without extension, double spaces, trailing periods, empty answer cells.
    picks = rng.permutation(n)
    per_kind = max(1, n // 12)
    no_ext, spaces, periods, empty = (picks[k * per_kind : (k + 1) * per_kind] for k in range(4))
    for i in no_ext:
        records[i][0] = Path(records[i][0]).stem
    for i in spaces:
        q = 1 + int(rng.integers(8))
        records[i][q] = records[i][q].replace(" ", "  ", 1)
    for i in periods:
        q = 1 + int(rng.integers(8))
        records[i][q] = records[i][q] + "."
    for i in empty:
        q = 1 + int(rng.integers(8))
        records[i][q] = None
    if misspell:
        _misspell(rng, records)
    return pd.DataFrame(records, columns=["Image Name", *headers])
