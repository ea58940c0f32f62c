"""The master workbook's cell values cached by content for the array's tasks: reused while
the workbook's bytes are the same, never when they changed, a bad cache file ignored, dates
kept as dates, a cache folder that cannot be written only costing speed; submit-like runs
(an existing output root) fill it, a first `validate` leaves nothing behind."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import openpyxl
import pytest

from fada_batch.data import workbook_cache
from fada_batch.data.categories import CATEGORY_NAMES, DEFAULT_WORKBOOK, get_category
from fada_batch.data.samples import prepare_data, workbook_cache_dir
from fada_batch.data.validate import preflight
from fada_batch.data.workbook import read_workbook
from tests.test_workbook import ANSWERS, PER_CATEGORY, job, make_master


def _no_openpyxl(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Make a real read fail loudly; return the list of paths it was asked for."""
    asked: list[Path] = []

    def refuse(path: Path) -> None:
        asked.append(path)
        raise AssertionError(f"{path} read with openpyxl although cached")

    monkeypatch.setattr(workbook_cache, "read_first_worksheet", refuse)
    return asked


def test_second_read_comes_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_master(tmp_path, ("Femur", "Thorax"))
    cache = tmp_path / "cache"
    cats = [get_category("Femur"), get_category("Thorax")]
    first = read_workbook(path, cats, cache_dir=cache)
    (entry,) = cache.iterdir()
    assert entry.name == f"{workbook_cache.file_sha256(path)}.json"
    assert [p.name for p in cache.iterdir()] == [entry.name]  # no temp file left
    asked = _no_openpyxl(monkeypatch)
    again = read_workbook(path, cats, cache_dir=cache)
    assert not asked
    for cat in cats:
        a, b = first.sheet_for(cat), again.sheet_for(cat)
        assert a is not None and b is not None
        assert [(r.row, r.image_name, r.answers) for r in a.rows] == [
            (r.row, r.image_name, r.answers) for r in b.rows
        ]
        assert a.questions == b.questions and a.header_row == b.header_row


def test_a_changed_workbook_is_read_again(tmp_path: Path) -> None:
    """Same size and modification time, other bytes: the content key tells them apart."""
    path = make_master(tmp_path, ("Femur",))
    cache = tmp_path / "cache"
    femur = get_category("Femur")
    before = read_workbook(path, [femur], cache_dir=cache).sheet_for(femur)
    assert before is not None and before.rows[0].answers[1] == "cephalic"
    stat = path.stat()
    wb = openpyxl.load_workbook(path)
    wb.active.cell(row=2, column=4).value = "breech!!"  # Q2 of the first row, same length
    wb.save(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = read_workbook(path, [femur], cache_dir=cache).sheet_for(femur)
    assert after is not None and after.rows[0].answers[1] == "breech!!"
    assert len(list(cache.iterdir())) == 2
    # edited again and again: the newest entries stay, this version's among them
    for i in range(3):
        wb.active.cell(row=2, column=4).value = f"version {i}"
        wb.save(path)
        read_workbook(path, [femur], cache_dir=cache)
    assert len(list(cache.iterdir())) == workbook_cache.KEEP_ENTRIES
    assert (cache / f"{workbook_cache.file_sha256(path)}.json").is_file()


@pytest.mark.parametrize(
    "content", ["{truncated", '{"version": 1, "sha256": "other", "title": "x", "rows": []}']
)
def test_a_bad_cache_file_is_ignored_and_rewritten(tmp_path: Path, content: str) -> None:
    path = make_master(tmp_path, ("Femur",))
    cache = tmp_path / "cache"
    cache.mkdir()
    entry = cache / f"{workbook_cache.file_sha256(path)}.json"
    entry.write_text(content)
    book = read_workbook(path, [get_category("Femur")], cache_dir=cache)
    femur = book.sheet_for(get_category("Femur"))
    assert femur is not None and len(femur.rows) == PER_CATEGORY
    assert json.loads(entry.read_text())["sha256"] == workbook_cache.file_sha256(path)


def test_cell_types_survive_the_cache(tmp_path: Path) -> None:
    """A date stays a date (so `date_answer` still fires), numbers and booleans keep their type."""
    path = make_master(tmp_path, ("Femur",))
    wb = openpyxl.load_workbook(path)
    ws = wb.active
    ws.cell(row=2, column=7).value = dt.datetime(2024, 12, 14)  # Q5 typed as 12-14
    ws.cell(row=3, column=7).value = 22
    ws.cell(row=4, column=7).value = 45.5
    ws.cell(row=4, column=9).value = True
    wb.save(path)
    cache = tmp_path / "cache"
    cold = workbook_cache.first_worksheet(path, cache)
    warm = workbook_cache.first_worksheet(path, cache)
    assert cold == warm
    assert warm[1][1][6] == dt.datetime(2024, 12, 14) and warm[1][2][6] == 22 and warm[1][3][8] is True
    femur = read_workbook(path, [get_category("Femur")], cache_dir=cache).sheet_for(get_category("Femur"))
    assert femur is not None
    assert {p.code for p in femur.problems} == {"date_answer", "non_text_answer"}


def test_unwritable_cache_folder_only_costs_speed(tmp_path: Path) -> None:
    path = make_master(tmp_path, ("Femur",))
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the folder should be")
    book = read_workbook(path, [get_category("Femur")], cache_dir=blocker)
    assert not book.problems and book.sheet_for(get_category("Femur")) is not None


def test_validate_fills_the_cache_only_under_an_existing_output_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_master(tmp_path, CATEGORY_NAMES[:3], extra_rows=[["Femur", "Femur_000.png", *ANSWERS]])
    cfg = job(tmp_path, categories=list(CATEGORY_NAMES[:3]))
    out = Path(cfg.output.root)  # type: ignore[attr-defined]
    assert workbook_cache_dir(cfg) is None  # type: ignore[arg-type]
    preflight(cfg)  # type: ignore[arg-type]
    assert not out.exists()  # a first validate leaves nothing behind
    out.mkdir()  # as submit does before its pre-flight
    cold = preflight(cfg)  # type: ignore[arg-type]
    assert [p.name for p in (out / ".cache" / "workbook").iterdir()] == [
        f"{workbook_cache.file_sha256(tmp_path / DEFAULT_WORKBOOK)}.json"
    ]
    asked = _no_openpyxl(monkeypatch)
    warm = preflight(cfg)  # type: ignore[arg-type]
    assert [d.to_dict() for d in warm.results] == [d.to_dict() for d in cold.results]
    cs = prepare_data(cfg, get_category("Femur"), out / "blip2_femur", resuming=False)  # type: ignore[arg-type]
    assert not asked and len(cs.split.images()) == PER_CATEGORY
