"""`data.split_file`: an existing split (image -> train/val/test) used instead of ours, on a
generated 14-category master workbook; unknown, duplicate and unlisted images reported; the
split used written to split.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fada_batch.config import config_from_dict, training_fingerprint
from fada_batch.data.categories import CATEGORY_NAMES, get_category
from fada_batch.data.given_split import SplitFileError, read_split_entries, split_from_file
from fada_batch.data.samples import DataError, prepare_data
from fada_batch.data.split import read_split
from fada_batch.data.validate import format_table, preflight
from tests.test_workbook import make_master


def team_split(root: Path, extra_test: list[str] = ()) -> Path:  # type: ignore[assignment]
    """The FADA team's shape: part -> category -> 'Category/image'; per category image 0 in
    test, 1 in val, 2 in train."""
    splits: dict[str, dict[str, list[str]]] = {"train": {}, "val": {}, "test": {}}
    for name in CATEGORY_NAMES:
        for i, part in enumerate(("test", "val", "train")):
            splits[part].setdefault(name, []).append(f"{name}/{name}_{i:03d}.png")
    splits["test"]["Femur"] += list(extra_test)
    path = root / "dataset_splits.json"
    path.write_text(json.dumps({"metadata": {"seed": 42}, "splits": splits}))
    return path


def job(root: Path, **data: object):  # type: ignore[no-untyped-def]
    return config_from_dict(
        {
            "data": {"root": str(root), "split_file": "dataset_splits.json", **data},
            "output": {"root": str(root / "out")},
        }
    )


def test_team_split_file_is_used_and_written_to_split_json(tmp_path: Path) -> None:
    make_master(tmp_path)
    team_split(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    cs = prepare_data(job(tmp_path), get_category("Femur"), out, resuming=False)
    assert (cs.split.train, cs.split.val, cs.split.test) == (
        ["Femur_002.png"],
        ["Femur_001.png"],
        ["Femur_000.png"],
    )
    saved = read_split(out)
    assert saved is not None and saved.test == ["Femur_000.png"]
    assert saved.source == str(tmp_path / "dataset_splits.json")
    assert not [p for p in cs.data.problems if p.code.startswith("split_")]


def test_unknown_duplicate_and_unlisted_images_are_reported(tmp_path: Path) -> None:
    make_master(tmp_path)
    path = team_split(tmp_path, extra_test=["Femur/ghost.png", "Femur/Femur_002.png", "Femur/Femur_001"])
    femur = get_category("Femur")
    names = ["Femur_000.png", "Femur_001.png", "Femur_002.png", "Femur_new.png"]
    split, problems = split_from_file(path, femur, names, seed=42, fractions=(0.8, 0.1, 0.1))
    codes = {p.code: p for p in problems}
    assert set(codes) == {"split_image_unknown", "split_image_duplicate", "split_image_unlisted"}
    assert "Femur/ghost.png" in codes["split_image_unknown"].message
    assert "2 images of Femur listed more than once" in codes["split_image_duplicate"].message
    assert "Femur_new.png" in codes["split_image_unlisted"].message
    # 001 and 002 were listed in two parts: left out of every part; the unlisted one trains
    assert (split.train, split.val, split.test) == (["Femur_new.png"], [], ["Femur_000.png"])


def test_validate_reports_the_split_file_problems(tmp_path: Path) -> None:
    make_master(tmp_path)
    team_split(tmp_path, extra_test=["Femur/ghost.png"])
    pf = preflight(job(tmp_path, categories=["Femur", "Thorax"]))
    femur, thorax = pf.results
    assert [p.code for p in femur.problems] == ["split_image_unknown"] and femur.status == "ok"
    assert not thorax.problems
    assert "ghost.png" in format_table(pf)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("{not json", "Expecting property name"),
        ('{"a.png": "holdout"}', "parts must be train, val or test"),
        ("[1, 2]", "none of the known shapes"),
    ],
)
def test_bad_split_file_is_a_clear_error(tmp_path: Path, content: str, why: str) -> None:
    make_master(tmp_path, ("Femur",))
    (tmp_path / "dataset_splits.json").write_text(content)
    with pytest.raises(SplitFileError, match=why):
        read_split_entries(tmp_path / "dataset_splits.json")
    pf = preflight(job(tmp_path, categories=["Femur"]))
    assert pf.results[0].status == "error" and pf.results[0].errors[0].code == "split_file_unreadable"
    with pytest.raises(DataError, match=r"data\.split_file cannot be used"):
        prepare_data(job(tmp_path, categories=["Femur"]), get_category("Femur"), tmp_path, resuming=False)


def test_other_shapes_and_the_fingerprint(tmp_path: Path) -> None:
    femur = get_category("Femur")
    names = ["a.png", "b.png", "c.png"]
    for raw in (
        {"train": ["a.png"], "val": ["b"], "test": ["c.png"]},
        {"a.png": "train", "b.png": "val", "c.png": "test"},
    ):
        (tmp_path / "s.json").write_text(json.dumps(raw))
        split, problems = split_from_file(
            tmp_path / "s.json", femur, names, seed=1, fractions=(0.8, 0.1, 0.1)
        )
        assert (split.train, split.val, split.test) == (["a.png"], ["b.png"], ["c.png"]) and not problems
    assert "data.split_file" not in training_fingerprint(config_from_dict({}))
    assert training_fingerprint(job(tmp_path))["data.split_file"] == "dataset_splits.json"
