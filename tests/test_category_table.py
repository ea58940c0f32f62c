"""The job's own categories (`data.category_table`): a category beyond the 14 defaults with
its folder, aliases and display name, the defaults re-described, the plain list of names
unchanged, every mistake refused naming the job key and the fix; the new category read from
the master workbook, split, collected and shown by its display name."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from fada_batch.config import ConfigError, config_from_dict, dump_yaml, load_job, training_fingerprint
from fada_batch.data.categories import CATEGORY_NAMES, IMAGES_DIR, build_table
from fada_batch.data.samples import prepare_data
from fada_batch.data.validate import format_table, preflight
from fada_batch.run.collect import LabelSource, collect
from fada_batch.run.report import text_table
from tests.test_workbook import ANSWERS, make_master

KIDNEY = {"Kidney": {"display": "Renal View", "aliases": ["Renal", "Kidneys"]}}


def kidney_job(root: Path, **data: object):  # type: ignore[no-untyped-def]
    return config_from_dict(
        {
            "data": {"root": str(root), "categories": ["Femur", "Kidney"], "category_table": KIDNEY, **data},
            "output": {"root": str(root / "out")},
        }
    )


def test_plain_list_of_names_is_unchanged() -> None:
    cfg = config_from_dict({"data": {"categories": ["Abodomen", "femur"]}})
    assert [cfg.data.category(n).name for n in cfg.data.categories] == ["Abdomen", "Femur"]
    assert cfg.data.table().names == CATEGORY_NAMES
    assert cfg.data.category("Trans-cerebellum").display_name == "Transcerebellar Plane"


def test_new_category_with_folder_aliases_and_display(tmp_path: Path) -> None:
    cfg = kidney_job(
        tmp_path, category_table={**KIDNEY, "Femur": {"display": "Femur Length View", "folder": "FL"}}
    )
    kidney = cfg.data.category("renal")
    assert (kidney.name, kidney.folder, kidney.sheet, kidney.display_name) == (
        "Kidney",
        "Kidney",
        "Kidney",
        "Renal View",
    )
    assert kidney.output_dirname == "blip2_kidney"
    femur = cfg.data.category("Femur")
    assert (femur.folder, femur.display_name) == ("FL", "Femur Length View")
    assert "Femur" in femur.all_names()  # the default's names stay
    assert cfg.data.table().names == (*CATEGORY_NAMES, "Kidney")
    # written next to the outputs and read back: the same table; naming is no training key
    again = config_from_dict(load_job_text(dump_yaml(cfg), tmp_path))
    assert again.data.category("Kidneys") == kidney
    assert not [k for k in training_fingerprint(cfg) if "category" in k]


def load_job_text(text: str, tmp_path: Path) -> dict:  # type: ignore[type-arg]
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return load_job(path).to_dict()


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (
            {"categories": ["Kidney"]},
            ["data.categories: Unknown category 'Kidney'", "data.category_table: {Kidney:"],
        ),
        (
            {"category_table": {"Kidney": {"foldr": "K"}}},
            [
                "'data.category_table.Kidney.foldr'",
                "did you mean 'folder'",
                "folder, sheet, aliases, display",
            ],
        ),
        ({"category_table": {"Kidney": "Renal"}}, ["data.category_table.Kidney: expected a mapping"]),
        (
            {"category_table": {"Kidney": {"aliases": ["Chest"]}}},
            ["data.category_table.Kidney: 'Chest' is given for Kidney but already names Thorax"],
        ),
        (
            {"category_table": {"Abodomen": {"display": "Belly"}}},
            ["'Abodomen' is an alias of the category Abdomen", "use the name 'Abdomen'"],
        ),
        ({"category_table": {"../x": {}}}, ["data.category_table: '../x' cannot name a category"]),
        (
            {"category_table": KIDNEY, "category_aliases": {"Femur": ["Renal"]}},
            ["data.category_aliases: 'Renal' is given for Femur but already names Kidney"],
        ),
    ],
)
def test_mistakes_name_the_job_key_and_the_fix(data: dict, words: list[str]) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError) as e:
        config_from_dict({"data": data})
    for w in words:
        assert w in str(e.value), str(e.value)


def test_job_aliases_reach_a_new_category() -> None:
    table, problems = build_table({"Kidney": {}}, {"Kidney": ["KID"]})
    assert not problems and table.get("kid").name == "Kidney"


def _kidney_data(root: Path) -> None:
    """A master workbook with Femur's rows and Kidney's rows under an alias ('Renal')."""
    make_master(root, ("Femur",), extra_rows=[["Renal", f"k{i}.png", *ANSWERS] for i in range(4)])
    folder = root / IMAGES_DIR / "Kidney"
    folder.mkdir(parents=True)
    for i in range(4):
        Image.new("L", (16, 12), 60 + i).save(folder / f"k{i}.png")


def test_new_category_is_validated_and_split_from_the_workbook(tmp_path: Path) -> None:
    _kidney_data(tmp_path)
    cfg = kidney_job(tmp_path)
    pf = preflight(cfg)
    assert [(d.category.name, d.status, d.stats.images_usable) for d in pf.results] == [
        ("Femur", "ok", 3),
        ("Kidney", "ok", 4),
    ]
    assert not pf.workbook_problems  # 'Renal' is Kidney's: no rows left out
    assert "Kidney (Renal View)" in format_table(pf)
    out = Path(cfg.output.root) / "blip2_kidney"
    cs = prepare_data(cfg, cfg.data.category("Kidney"), out, resuming=False)
    assert len(cs.split.images()) == 4 and (out / "split.json").is_file()
    # a job that does not define it: its rows are reported, with the way to add it
    plain = config_from_dict(
        {"data": {"root": str(tmp_path), "categories": ["Femur"]}, "output": {"root": str(tmp_path / "o")}}
    )
    (problem,) = preflight(plain).workbook_problems
    assert problem.value == "Renal" and "data.category_table: {Renal: {display: ...}}" in problem.message


def test_collector_shows_the_display_name_and_awaiting_labels(tmp_path: Path) -> None:
    make_master(tmp_path, ("Femur",))  # no Kidney rows yet
    cfg = kidney_job(tmp_path)
    out = Path(cfg.output.root)
    labels = LabelSource.from_data({"root": str(tmp_path)}, out)
    result = collect(out, categories=["Femur", "renal"], labels=labels, table=cfg.data.table())
    femur, kidney = result.categories
    assert (kidney.category, kidney.display, kidney.state) == ("Kidney", "Renal View", "awaiting_labels")
    assert femur.state == "not_started"
    table = text_table(result.to_dict())
    assert "Kidney (Renal View)" in table
    # from the outputs alone: the tasks' config.yaml names the job's table
    (out / "blip2_kidney").mkdir(parents=True)
    (out / "blip2_kidney" / "config.yaml").write_text(dump_yaml(cfg))
    (inferred,) = [c for c in collect(out).categories if c.category == "Kidney"]
    assert inferred.display == "Renal View" and inferred.state == "awaiting_labels"
