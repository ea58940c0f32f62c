"""Names outside ASCII: image files, worksheet, data and output folders, from the pre-flight
check through training to the report; and the two Unicode forms of one name.

A Mac writes `café.png` decomposed (NFD: `e` + U+0301) while a sheet typed anywhere holds it
composed (NFC: `é`); byte for byte the names differ, for the user they are one.
"""

from __future__ import annotations

import csv
import json
import shutil
import unicodedata
from pathlib import Path

import openpyxl
import pytest

from fada_batch.cli import main as cli_main
from fada_batch.config import dump_yaml
from fada_batch.data.images import index_images, name_key, resolve_image


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


def test_composed_and_decomposed_forms_of_one_name_match(tmp_path):
    assert nfc("café.png") != nfd("café.png")  # different strings ...
    assert name_key(nfc("café.png")) == name_key(nfd("CAFÉ.PNG")) == name_key(nfc("Café"))  # ... one key
    assert name_key("Straße") == name_key("STRASSE")  # case-folded as well
    assert name_key("café.png") != name_key("cafe.png")  # an accent still counts
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / nfd("échographie fœtale.png")).write_bytes(b"")
    (folder / nfc("ßcan Ångström.png")).write_bytes(b"")
    index = index_images(folder)
    found = resolve_image(folder, nfc("Échographie Fœtale.PNG"), index)
    assert found.name == nfd("échographie fœtale.png")  # the file as it is on disk
    assert resolve_image(folder, nfd("ßcan Ångström"), index).name == nfc("ßcan Ångström.png")


def _non_ascii_femur(src: Path, dst: Path) -> dict[str, str]:
    """Copy the demo data to `dst`, give Femur's images non-ASCII names (decomposed on disk,
    composed in the sheet) and its worksheet a non-ASCII title. Returns sheet name -> file."""
    shutil.copytree(src, dst)
    images = dst / "Fetal Ultrasound" / "Femur"
    renamed = {}
    for i, path in enumerate(sorted(images.glob("*.png"))):
        stem = f"fémur {i:03d} cœur ß"
        path.rename(images / nfd(f"{stem}.png"))
        renamed[path.stem] = stem
    sheet = dst / "Fetal Ultrasound Labeled" / "Femur_image_list.xlsx"
    wb = openpyxl.load_workbook(sheet)
    ws = wb.worksheets[0]
    ws.title = "Fémur – coupes"
    names = {}
    for row in ws.iter_rows(min_row=2, max_col=1):
        cell = row[0]
        stem = Path(cell.value).stem if cell.value.endswith(".png") else cell.value
        new = nfc(renamed[stem] + (".png" if cell.value.endswith(".png") else ""))
        names[new] = nfd(f"{renamed[stem]}.png")
        cell.value = new
    wb.save(sheet)
    return names


@pytest.mark.slow
def test_non_ascii_names_validate_train_and_collect(job_factory, demo_root, tmp_path, capsys):
    data = tmp_path / "données échographiques" / "fœtus"
    names = _non_ascii_femur(demo_root, data)
    cfg = job_factory(
        {"data.categories": ["Femur", "Cervix"], "data.num_images": 10, "train.num_epochs": 1},
        data_root=data,
        out=tmp_path / "résultats ü",
    )
    job = tmp_path / "tâche.yaml"
    job.write_text(dump_yaml(cfg), encoding="utf-8")

    assert cli_main(["validate", "--job", str(job), "--json"]) == 0
    femur = {d["category"]: d for d in json.loads(capsys.readouterr().out)["categories"]}["Femur"]
    assert femur["status"] == "ok", femur["problems"]
    codes = {p["code"] for p in femur["problems"]}
    assert not codes & {
        "image_missing",
        "images_not_listed",
        "duplicate_row",
        "conflicting_duplicate_rows",
    }, codes

    assert cli_main(["train", "--job", str(job), "--category", "Femur"]) == 0
    out = Path(cfg.output.root) / "blip2_femur"
    summary = json.loads((out / "training_summary.json").read_text(encoding="utf-8"))
    assert summary["status"] == "completed" and summary["warnings"] == {}
    split = json.loads((out / "split.json").read_text(encoding="utf-8"))
    used = split["train"] + split["val"] + split["test"]
    assert len(used) == 10 and set(used) <= set(names)  # the sheet's (composed) names
    with (out / "eval" / "predictions.csv").open(newline="", encoding="utf-8") as f:
        predicted = {row["image"] for row in csv.DictReader(f)}
    assert predicted == set(split["test"])

    capsys.readouterr()
    assert cli_main(["collect", "--job", str(job)]) == 0
    printed = capsys.readouterr().out
    assert "Femur" in printed and "Cervix" in printed
    collected = json.loads((Path(cfg.output.root) / "collected.json").read_text(encoding="utf-8"))
    state = {c["category"]: c["state"] for c in collected["categories"]}
    assert state == {"Femur": "completed", "Cervix": "awaiting_labels"}
    femur_row = next(c for c in collected["categories"] if c["category"] == "Femur")
    assert femur_row["images"] == summary["images"] and femur_row["eval"]
    assert "Femur" in (Path(cfg.output.root) / "report.md").read_text(encoding="utf-8")
