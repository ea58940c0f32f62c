"""The synthetic demo data set: layout, sheets as real ones look, determinism, and answers
that follow what is drawn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openpyxl
import pandas as pd
import pytest
from PIL import Image

from fada_batch.data.categories import (
    DEMO_DATA_MARKER,
    IMAGES_DIR,
    LABELS_DIR,
    STANDARD_QUESTIONS,
    find_image_dir,
    find_sheet,
    get_category,
)
from fada_batch.text import clean_answer
from fada_batch.tools.demo import (
    ORIENTATION_ANSWERS,
    QUALITY_ANSWERS,
    describe,
    make_demo_data,
    render_scan,
)

N_IMAGES = 24  # per category: small and fast, still balanced and with every blemish


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    # A root with spaces and quotes, as real data roots have (`data/Fetal Ultrasound/`).
    root = tmp_path_factory.mktemp("demo") / "my data 'v1'"
    return make_demo_data(root, images_per_category=N_IMAGES, seed=0)


def _read_sheet(path: Path) -> pd.DataFrame:
    return pd.read_excel(path, dtype=str, keep_default_na=False)


def _image_path(image_dir: Path, name: str) -> Path:
    path = image_dir / name
    return path if path.suffix else path.with_suffix(".png")


def test_layout_and_return_value(demo: dict) -> None:
    root: Path = demo["root"]
    assert sorted(demo["labeled"]) == ["Abdomen", "Femur", "Thorax"]
    assert demo["unlabeled"] == ["Cervix"]
    assert demo["counts"] == dict.fromkeys(["Abdomen", "Femur", "Thorax", "Cervix"], N_IMAGES)
    folders = sorted(p.name for p in (root / IMAGES_DIR).iterdir())
    assert folders == ["Abodomen", "Cervix", "Femur", "Thorax"]  # the wild misspelling
    assert json.loads((root / DEMO_DATA_MARKER).read_text())["synthetic"] is True  # reports say so
    sheets = sorted(p.name for p in (root / LABELS_DIR).iterdir())
    assert sheets == [
        "Abodomen_image_list.xlsx",
        "Femur_image_list.xlsx",
        "Thorax_image_list.xlsx",
    ]
    for folder in folders:
        pngs = sorted((root / IMAGES_DIR / folder).glob("*.png"))
        assert len(pngs) == N_IMAGES
        with Image.open(pngs[0]) as image:
            assert image.mode == "L"


def test_category_lookup_resolves_the_misspelled_names(demo: dict) -> None:
    root: Path = demo["root"]
    abdomen = get_category("Abdomen")
    assert find_sheet(root, abdomen) == root / LABELS_DIR / "Abodomen_image_list.xlsx"
    assert find_image_dir(root, abdomen) == root / IMAGES_DIR / "Abodomen"
    cervix = get_category("Cervix")
    assert find_sheet(root, cervix) is None  # awaiting labels
    assert find_image_dir(root, cervix) == root / IMAGES_DIR / "Cervix"


def test_sheet_headers_carry_the_question_text(demo: dict) -> None:
    for sheet in demo["sheets"].values():
        workbook = openpyxl.load_workbook(sheet, read_only=True)
        header = next(workbook.active.iter_rows(min_row=1, max_row=1, values_only=True))
        workbook.close()
        expected = ["Image Name"] + [f"Q{i + 1}:\n{q}" for i, q in enumerate(STANDARD_QUESTIONS)]
        assert list(header) == expected


def test_sheets_hold_real_world_blemishes_that_resolve(demo: dict) -> None:
    for name, sheet in demo["sheets"].items():
        frame = _read_sheet(sheet)
        assert len(frame) == N_IMAGES
        names = frame["Image Name"].tolist()
        answers = frame.iloc[:, 1:].to_numpy().ravel().tolist()
        assert any(not Path(n).suffix for n in names), "expected names without extension"
        assert any("  " in a for a in answers), "expected double spaces"
        assert any(a.endswith(".") for a in answers), "expected trailing periods"
        assert any(a == "" for a in answers), "expected empty cells"
        for n in names:
            assert _image_path(demo["image_dirs"][name], n).is_file(), n


def _drawn_side(image: np.ndarray) -> str:
    """Side of the bright structure: where more very bright pixels are."""
    half = image.shape[1] // 2
    bright = image > 0.75
    return "left" if bright[:, :half].sum() > bright[:, half:].sum() else "right"


def _is_noisy(image: np.ndarray) -> bool:
    """Heavy noise: large differences between neighbouring pixels inside the sector."""
    inside = (image[:, 1:] > 0) & (image[:, :-1] > 0)
    return float(np.abs(np.diff(image, axis=1))[inside].mean()) > 0.06


def test_image_dependent_answers_follow_what_is_drawn(demo: dict) -> None:
    for name, sheet in demo["sheets"].items():
        frame = _read_sheet(sheet)
        sides, noise = [], []
        for _, row in frame.iterrows():
            with Image.open(_image_path(demo["image_dirs"][name], row["Image Name"])) as im:
                pixels = np.asarray(im, dtype=np.float32) / 255.0  # (H, W)
            orientation, quality = clean_answer(row.iloc[2]), clean_answer(row.iloc[6])
            if orientation:
                assert orientation == ORIENTATION_ANSWERS[_drawn_side(pixels)], row["Image Name"]
                sides.append(orientation)
            if quality:
                assert quality == QUALITY_ANSWERS[_is_noisy(pixels)], row["Image Name"]
                noise.append(quality)
        # Balanced: the majority answer scores about 50%.
        for answers in (sides, noise):
            assert max(pd.Series(answers).value_counts()) <= 0.65 * len(answers)


def test_same_seed_same_data_other_seed_other_data(demo: dict, tmp_path: Path) -> None:
    again = make_demo_data(tmp_path / "again", images_per_category=N_IMAGES, seed=0)
    other = make_demo_data(tmp_path / "other", images_per_category=N_IMAGES, seed=1)
    for name in demo["labeled"]:
        pd.testing.assert_frame_equal(_read_sheet(demo["sheets"][name]), _read_sheet(again["sheets"][name]))
        assert not _read_sheet(demo["sheets"][name]).equals(_read_sheet(other["sheets"][name]))
    for name, image_dir in demo["image_dirs"].items():
        for path in sorted(image_dir.iterdir()):
            assert path.read_bytes() == (again["image_dirs"][name] / path.name).read_bytes()
    first = demo["image_dirs"]["Femur"] / "femur_001.png"
    assert first.read_bytes() != (other["image_dirs"]["Femur"] / "femur_001.png").read_bytes()


def test_render_scan_and_describe() -> None:
    rng = np.random.default_rng(0)
    image = render_scan(rng, side="right", noisy=False, size=80, category="Abodomen")
    assert image.size == (80, 80) and image.mode == "L"
    assert _drawn_side(np.asarray(image, dtype=np.float32) / 255.0) == "right"
    with pytest.raises(ValueError, match="side must be one of left, right"):
        render_scan(rng, side="up", noisy=False)
    # Captions describe what is drawn in words other than the VQA answers.
    captions = {describe(side=s, noisy=n, category="Femur") for s in ("left", "right") for n in (0, 1)}
    assert len(captions) == 4
    for caption in captions:
        assert not {"left", "right", "quality", "noise"} & set(caption.replace(",", "").split())


def test_too_few_images_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="images_per_category must be at least 2"):
        make_demo_data(tmp_path, images_per_category=1)


def test_workbook_form_with_misspellings_counted_per_layer(tmp_path: Path) -> None:
    """The master-workbook variant: one workbook, Cervix awaiting labels, and the noise each
    layer of data.normalize removes (counts grow with the level; nothing left after canonical)."""
    from fada_batch.config import config_from_dict
    from fada_batch.data.categories import DEFAULT_WORKBOOK
    from fada_batch.data.validate import preflight

    info = make_demo_data(tmp_path, images_per_category=N_IMAGES, seed=0, form="workbook")
    assert not (tmp_path / LABELS_DIR).exists() and (tmp_path / DEFAULT_WORKBOOK).is_file()
    assert info["unlabeled"] == ["Cervix"] and set(info["sheets"].values()) == {tmp_path / DEFAULT_WORKBOOK}
    unique = {}
    for level in ("none", "clean", "spelling", "canonical"):
        cfg = config_from_dict(
            {"data": {"root": str(tmp_path), "normalize": level}, "output": {"root": str(tmp_path / "out")}}
        )
        pf = preflight(cfg, ["Abdomen", "Femur", "Thorax", "Cervix"])
        assert [d.status for d in pf.results] == ["ok", "ok", "ok", "awaiting_labels"]
        assert all(d.stats.images_usable == N_IMAGES for d in pf.ready)
        norm = pf.normalization()
        assert norm is not None
        unique[level] = sum(norm.unique_after())
        if level == "spelling":
            fixed = {a for layer, a, _, _ in norm.top_fixes(20) if layer == "spelling"}
            assert fixed == {"palne", "lengh", "iamge", "chammber"}
    assert unique["none"] > unique["clean"] > unique["spelling"] > unique["canonical"]
    with pytest.raises(ValueError, match="form must be"):
        make_demo_data(tmp_path, form="csv")
