"""`load_category`: sheets joined with images in the real layout, statuses, stats and problems.

Each test builds `<root>/Fetal Ultrasound/<folder>/` and
`<root>/Fetal Ultrasound Labeled/<sheet>_image_list.xlsx` under a root with spaces and a quote.
"""

from __future__ import annotations

import json
from pathlib import Path

import openpyxl
import pytest
from PIL import Image

from fada_batch.data.categories import (
    IMAGES_DIR,
    LABELS_DIR,
    STANDARD_QUESTIONS,
    UnknownCategoryError,
    get_category,
)
from fada_batch.data.dataset import CategoryData, load_category
from fada_batch.data.problems import Problem

HEADER = ["Image Name", "Q1:\nWhat do you see?"] + [f"Q{i}" for i in range(2, 9)]
ANSWERS = ["Femur  shaft.", "left", "standard", "FL", "22 weeks", "good", "normal", "none"]
CLEAN = ["Femur shaft", "left", "standard", "FL", "22 weeks", "good", "normal", "none"]
FEMUR = get_category("Femur")


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    r = tmp_path / "it's my data"
    (r / IMAGES_DIR).mkdir(parents=True)
    (r / LABELS_DIR).mkdir(parents=True)
    return r


def add_images(root: Path, folder: str, names: list[str]) -> Path:
    image_dir = root / IMAGES_DIR / folder
    image_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("L", (16, 12), 90).save(image_dir / name)
    return image_dir


def add_sheet(root: Path, stem: str, rows: list[list[object]], header: list[object] = HEADER) -> Path:
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(header)
    for r in rows:
        ws.append(r)
    path = root / LABELS_DIR / f"{stem}_image_list.xlsx"
    wb.save(path)
    return path


def only(data: CategoryData, code: str) -> Problem:
    found = [p for p in data.problems if p.code == code]
    assert len(found) == 1, [str(p) for p in data.problems]
    return found[0]


def femur(root: Path, names_on_disk: list[str], rows: list[list[object]], **kw: object) -> CategoryData:
    add_images(root, "Femur", names_on_disk)
    add_sheet(root, "Femur", rows)
    return load_category(root, FEMUR, **kw)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the good path


def test_alias_sheet_and_folder_for_abdomen(root: Path) -> None:
    image_dir = add_images(root, "Abodomen", ["abd_001.png", "abd_002.jpg", "abd_003.JPEG"])
    sheet = add_sheet(
        root,
        "Abodomen",
        [
            ["abd_001.png", *ANSWERS],
            ["abd_002", *ANSWERS[:4], None, *ANSWERS[5:]],
            ["ABD_003.jpeg", *ANSWERS],
        ],
    )
    data = load_category(root, "Abdomen")
    assert data.status == "ok" and data.problems == []
    assert data.category.name == "Abdomen"
    assert (data.sheet_path, data.image_dir) == (sheet, image_dir)
    assert data.questions == ["What do you see?", *STANDARD_QUESTIONS[1:]]
    assert [(r.image_name, r.path.name, r.row) for r in data.records] == [
        ("abd_001.png", "abd_001.png", 2),
        ("abd_002", "abd_002.jpg", 3),
        ("ABD_003.jpeg", "abd_003.JPEG", 4),
    ]
    assert data.records[0].answers == CLEAN
    assert data.records[1].qa_pairs() == [(q, a) for q, a in enumerate(CLEAN) if q != 4]
    s = data.stats
    assert (s.images_listed, s.images_usable, s.images_skipped, s.images_on_disk, s.images_not_listed) == (
        3,
        3,
        0,
        3,
        0,
    )
    assert s.qa_pairs == 23 and s.qa_pairs_per_question == [3, 3, 3, 3, 2, 3, 3, 3]
    assert s.empty_answers_per_question == [0, 0, 0, 0, 1, 0, 0, 0]
    assert len(data.qa_pairs()) == 23


def test_clean_up_can_be_switched_off(root: Path) -> None:
    data = femur(root, ["a.png"], [["a", *ANSWERS]], clean_answers=False)
    assert data.records[0].answers == ANSWERS


def test_to_dict_is_json_ready(root: Path) -> None:
    data = femur(root, ["a.png", "b.png"], [["a", *ANSWERS], ["missing", *ANSWERS]])
    out = json.loads(json.dumps(data.to_dict(include_records=True)))
    assert out["category"] == "Femur" and out["status"] == "ok"
    assert out["stats"]["images_usable"] == 1 and out["stats"]["qa_pairs"] == 8
    assert out["counts"] == {
        "errors": 0,
        "warnings": 2,
        "by_code": {"image_missing": 1, "images_not_listed": 1},
    }
    assert out["problems"][0]["code"] == "image_missing" and out["problems"][0]["row"] == 3
    assert out["records"][0]["path"].endswith("a.png")
    assert "records" not in data.to_dict()


def test_unknown_category_name() -> None:
    with pytest.raises(UnknownCategoryError, match="Valid categories are"):
        load_category(Path("."), "Kidney")


# ----------------------------------------------------------------------------- category problems


def test_missing_sheet_is_awaiting_labels(root: Path) -> None:
    add_images(root, "Cervix", ["c.png"])
    data = load_category(root, "Cervix")
    assert data.status == "awaiting_labels" and data.problems == [] and data.records == []
    assert data.to_dict()["expected_sheet"].endswith("Cervix_image_list.xlsx")
    assert data.questions == list(STANDARD_QUESTIONS)


def test_missing_data_root(tmp_path: Path) -> None:
    data = load_category(tmp_path / "no such root", FEMUR)
    p = only(data, "data_root_not_found")
    assert data.status == "error" and p.severity == "error"
    assert "no such root" in p.message and "set data.root" in p.message


def test_missing_image_folder(root: Path) -> None:
    add_images(root, "Thorax", ["t.png"])
    add_sheet(root, "Femur", [["a", *ANSWERS]])
    data = load_category(root, FEMUR)
    p = only(data, "image_dir_missing")
    assert data.status == "error" and p.severity == "error"
    assert str(root / IMAGES_DIR / "Femur") in p.message
    assert "Folders in" in p.message and "Thorax" in p.message
    assert "put the Femur images in" in p.message


def test_sheet_errors_block_the_category(root: Path) -> None:
    add_images(root, "Femur", ["a.png"])
    (root / LABELS_DIR / "Femur_image_list.xlsx").write_bytes(b"garbage")
    data = load_category(root, FEMUR)
    assert data.status == "error" and only(data, "sheet_unreadable").severity == "error"


def test_listed_images_missing_on_disk(root: Path) -> None:
    data = femur(root, ["a.png"], [["a", *ANSWERS], ["img_404.png", *ANSWERS]])
    p = only(data, "image_missing")
    assert data.status == "ok" and p.severity == "warning"
    assert "Femur_image_list.xlsx, row 3, column 'Image Name'" in p.message and "img_404.png" in p.message
    assert "row is skipped" in p.message
    assert data.stats.images_usable == 1 and data.stats.images_skipped == 1


def test_no_usable_image_is_an_error(root: Path) -> None:
    data = femur(root, [], [["x", *ANSWERS], ["y", *ANSWERS]])
    p = only(data, "no_usable_images")
    assert data.status == "error" and p.severity == "error"
    assert "None of the 2 images listed" in p.message and "correct the names in the sheet" in p.message
    assert len([q for q in data.problems if q.code == "image_missing"]) == 2


def test_images_on_disk_not_listed(root: Path) -> None:
    names = ["a.png"] + [f"extra_{i}.png" for i in range(7)]
    data = femur(root, names, [["a", *ANSWERS]])
    p = only(data, "images_not_listed")
    assert p.severity == "warning" and data.status == "ok"
    assert "7 images in the folder are not listed in 'Femur_image_list.xlsx' and not used" in p.message
    assert "extra_0.png, extra_1.png, extra_2.png, extra_3.png, extra_4.png and 2 more" in p.message
    assert "add a row for each image" in p.message
    assert data.stats.images_not_listed == 7


def test_conflicting_duplicates_do_not_count_as_unlisted(root: Path) -> None:
    other = ["other", *ANSWERS[1:]]
    data = femur(root, ["a.png", "b.png"], [["a", *ANSWERS], ["b", *ANSWERS], ["b.png", *other]])
    assert {p.code for p in data.problems} == {"conflicting_duplicate_rows"}
    assert [r.image_name for r in data.records] == ["a"]


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_corrupt_and_truncated_images_are_skipped(root: Path, damage: str) -> None:
    image_dir = add_images(root, "Femur", ["a.png"])
    big = Image.effect_noise((64, 64), 50)
    big.save(image_dir / "bad.jpg", quality=90)
    data_bytes = (image_dir / "bad.jpg").read_bytes()
    broken = b"not an image at all" if damage == "corrupt" else data_bytes[: len(data_bytes) // 2]
    (image_dir / "bad.jpg").write_bytes(broken)
    add_sheet(root, "Femur", [["a", *ANSWERS], ["bad", *ANSWERS]])
    data = load_category(root, FEMUR)
    p = only(data, "image_unreadable")
    assert data.status == "ok" and p.severity == "warning" and p.row == 3
    assert "bad.jpg" in p.message and "listed in row 3 of the label sheet" in p.message
    assert [r.image_name for r in data.records] == ["a"]
    # Without the image check, only existence is tested: the broken file stays in.
    assert len(load_category(root, FEMUR, check_images=False).records) == 2


def test_large_images_over_the_limit_are_skipped(root: Path) -> None:
    image_dir = add_images(root, "Femur", ["a.png"])
    Image.new("L", (400, 300)).save(image_dir / "huge.png")
    add_sheet(root, "Femur", [["a", *ANSWERS], ["huge", *ANSWERS]])
    data = load_category(root, FEMUR, max_image_pixels=100_000)
    p = only(data, "image_too_large")
    assert "over the limit of 100,000" in p.message and [r.image_name for r in data.records] == ["a"]
    kept = load_category(root, FEMUR, warn_image_pixels=100_000)
    assert only(kept, "image_large").severity == "warning" and len(kept.records) == 2


def test_unsafe_names_and_outside_links_are_skipped(root: Path) -> None:
    image_dir = add_images(root, "Femur", ["a.png"])
    outside = add_images(root, "Thorax", ["secret.png"]) / "secret.png"
    (image_dir / "link.png").symlink_to(outside)
    rows = [["a", *ANSWERS], ["../Thorax/secret.png", *ANSWERS], [str(outside), *ANSWERS], ["link", *ANSWERS]]
    add_sheet(root, "Femur", rows)
    data = load_category(root, FEMUR)
    assert [p.code for p in data.problems] == [
        "unsafe_image_name",
        "unsafe_image_name",
        "image_outside_folder",
    ]
    assert [p.row for p in data.problems] == [3, 4, 5]
    assert [r.image_name for r in data.records] == ["a"] and data.status == "ok"


def test_usable_images_without_any_answer(root: Path) -> None:
    data = femur(root, ["a.png"], [["a", *([None] * 8)], ["b", *([None] * 3)]])
    p = only(data, "no_qa_pairs")
    assert data.status == "error" and "fill in the answers" in p.message
    assert len([q for q in data.problems if q.code == "question_all_empty"]) == 8
