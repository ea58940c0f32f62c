"""The collector on real tiny-model training runs, plus hand-made failed/stale/corrupt folders.

One output root is built once per session (`real_run`) by the production training entry on
the tiny model and demo data, one category per state:

    Femur, Abdomen      completed, evaluated after training (real eval/metrics.json)
    Thorax              interrupted by `should_stop` after step 3      -> incomplete, step 3
    Standard_NT         raised inside the loop after step 2            -> failed
    Trans-ventricular   label sheet is not an xlsx                     -> invalid_data
    Cervix              no label sheet (summary written by train)      -> awaiting_labels
    Trans-thalamic      has a sheet, never ran                         -> not_started
    Non_standard_NT     Thorax's files, status running, lock of a dead pid -> incomplete
    Trans-cerebellum    truncated training_summary.json                -> unreadable, named

Tests that write reports work on a copy, so the shared root stays as training left it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fada_batch import cli
from fada_batch.config import config_from_dict, dump_yaml, load_job
from fada_batch.run.collect import EXIT_FAILED, EXIT_OK, STALE_AFTER_S, collect
from fada_batch.run.report import (
    make_plots,
    render_csv,
    render_html,
    render_markdown,
    write_report,
)
from fada_batch.run.task import run_category
from fada_batch.training.recipe import StopRequested

REPO = Path(__file__).resolve().parent.parent
ALL = [
    "Abdomen",
    "Femur",
    "Thorax",
    "Standard_NT",
    "Non_standard_NT",
    "Cervix",
    "Trans-cerebellum",
    "Trans-thalamic",
    "Trans-ventricular",
]
EXPECTED = {
    "Abdomen": "completed",
    "Femur": "completed",
    "Thorax": "incomplete",
    "Standard_NT": "failed",
    "Non_standard_NT": "incomplete",
    "Cervix": "awaiting_labels",
    "Trans-cerebellum": "unreadable",
    "Trans-thalamic": "not_started",
    "Trans-ventricular": "invalid_data",
}
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity)"

_RUNS: dict[str, dict] = {}  # one build per session, shared with test_report_browser.py


def _stop_after(calls: int, *, fail: bool = False):
    """A `should_stop` that says stop (or raises like an OOM) on its `calls`-th poll."""
    seen = {"n": 0}

    def should_stop() -> bool:
        seen["n"] += 1
        if seen["n"] >= calls:
            if fail:
                raise RuntimeError(OOM)
            return True
        return False

    return should_stop


def _data_copy(demo_root: Path, target: Path) -> Path:
    """The demo data plus sheets for two more categories (copies of Femur) and a broken one."""
    shutil.copytree(demo_root, target)
    images, labels = target / "Fetal Ultrasound", target / "Fetal Ultrasound Labeled"
    for name in ("Standard_NT", "Trans-thalamic", "Trans-ventricular"):
        shutil.copytree(images / "Femur", images / name)
        shutil.copy(labels / "Femur_image_list.xlsx", labels / f"{name}_image_list.xlsx")
    (labels / "Trans-ventricular_image_list.xlsx").write_bytes(b"this is not a spreadsheet")
    return target


def _cfg(tiny_model_dir: Path, data_root: Path, out: Path, *, evaluate: bool = True, **train):
    raw = load_job(REPO / "job" / "demo.yaml").to_dict()
    raw["name"] = "collect-test"
    raw["data"].update(root=str(data_root), num_images=12, categories=ALL)
    raw["model"]["name_or_path"] = str(tiny_model_dir)
    raw["output"]["root"] = str(out)
    raw["train"].update({"num_epochs": 2, "log_every_s": 0.0, "checkpoint_every_steps": 1, **train})
    raw["eval"]["after_training"] = evaluate  # writes eval/metrics.json, as the evaluation does
    return config_from_dict(raw)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def build_real_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, demo_root: Path) -> dict:
    """Train the tiny model into one output root with every state (see the module docstring)."""
    if "run" in _RUNS:
        return _RUNS["run"]
    base = tmp_path_factory.mktemp("collect")
    data_root = _data_copy(demo_root, base / "data 'copy'")
    out = base / "run out's"
    cfg = _cfg(tiny_model_dir, data_root, out)
    for name in ("Femur", "Abdomen"):
        assert run_category(cfg, name)["status"] == "completed"
    with pytest.raises(StopRequested):
        run_category(cfg, "Thorax", should_stop=_stop_after(3), requeues=1)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_category(cfg, "Standard_NT", should_stop=_stop_after(2, fail=True))
    from fada_batch.data.samples import DataError

    with pytest.raises(DataError):
        run_category(cfg, "Trans-ventricular")
    assert run_category(cfg, "Cervix")["status"] == "awaiting_labels"
    for name in ("femur", "abdomen"):
        assert (out / f"blip2_{name}" / "eval" / "metrics.json").is_file()
    # A task killed (SIGKILL, node failure) while running: its lock names a dead pid.
    stale = out / "blip2_non_standard_nt"
    shutil.copytree(out / "blip2_thorax", stale)
    s = json.loads((stale / "training_summary.json").read_text())
    s.update(status="running", category="Non_standard_NT", output_dir=str(stale))
    s.pop("end_time", None)
    s.pop("checkpoint", None)
    (stale / "training_summary.json").write_text(json.dumps(s))
    (stale / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    # A summary cut short (disk full while someone copied the folder by hand).
    corrupt = out / "blip2_trans_cerebellum"
    corrupt.mkdir()
    text = (out / "blip2_femur" / "training_summary.json").read_text()
    (corrupt / "training_summary.json").write_text(text[:150])
    # submitit's folder with a pickle the collector must never need.
    (out / "logs").mkdir()
    (out / "logs" / "123_submitted.pkl").write_bytes(b"\x80\x04garbage")

    # A previous run to compare with: Femur for one epoch only.
    other = base / "previous run"
    prev = _cfg(tiny_model_dir, data_root, other, evaluate=False, num_epochs=1)
    assert run_category(prev, "Femur")["status"] == "completed"
    _RUNS["run"] = {"root": out, "data_root": data_root, "cfg": cfg, "other": other}
    return _RUNS["run"]


@pytest.fixture(scope="session")
def real_run(tmp_path_factory, tiny_model_dir, demo_root) -> dict:
    return build_real_run(tmp_path_factory, tiny_model_dir, demo_root)


@pytest.fixture()
def run_copy(real_run, tmp_path) -> Path:
    """A copy of the real run's output root that a test may write into."""
    dst = tmp_path / "copy of run"
    shutil.copytree(real_run["root"], dst, symlinks=True)
    return dst


def _by_name(result) -> dict:
    return {c.category: c for c in result.categories}


def _snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st_ = p.stat()
            out[str(p.relative_to(root))] = (
                st_.st_size,
                st_.st_mtime_ns,
                hashlib.sha256(p.read_bytes()).hexdigest(),
            )
    return out


# ------------------------------------------------------------------------- real training runs


def test_every_state_is_reported(real_run):
    result = collect(real_run["root"], categories=ALL, data_root=real_run["data_root"])
    cats = _by_name(result)
    assert [c.category for c in result.categories] == ALL  # the job's order
    assert {n: c.state for n, c in cats.items()} == EXPECTED

    thorax = cats["Thorax"]
    assert thorax.summary_status == "interrupted"
    assert thorax.last_step == 3 and thorax.last_checkpoint.endswith("checkpoint-3")
    assert "interrupted at step 3 (checkpoint-3)" in thorax.detail
    assert thorax.requeues == 1
    assert [s for s, _ in thorax.loss_curve] == [1, 2, 3]  # partial curve from the checkpoint

    stale = cats["Non_standard_NT"]
    assert stale.summary_status == "running"
    assert "is gone" in stale.detail and "step 3" in stale.detail

    failed = cats["Standard_NT"]
    assert OOM in failed.error_tail and OOM in failed.detail
    assert failed.last_step == 1  # its last checkpoint (the error came before the one at step 2)

    invalid = cats["Trans-ventricular"]
    assert "cannot be used" in invalid.error and invalid.error_tail

    assert "no label sheet" in cats["Cervix"].detail
    assert "no folder" in cats["Trans-thalamic"].detail

    corrupt = cats["Trans-cerebellum"]
    assert "not valid JSON" in corrupt.detail
    assert any("blip2_trans_cerebellum/training_summary.json" in p for p in result.problems)

    t = result.totals
    assert (t["done"], t["failed"], t["waiting"]) == (2, 2, 4)
    assert t["by_state"]["unreadable"] == 1
    assert result.exit_code() == EXIT_FAILED


def test_completed_category_fields(real_run):
    result = collect(real_run["root"], categories=["Femur"], data_root=real_run["data_root"])
    (femur,) = result.categories
    s = json.loads((real_run["root"] / "blip2_femur" / "training_summary.json").read_text())
    assert femur.images == s["images"] and femur.qa_pairs == s["qa_pairs"]
    assert sum(femur.images.values()) == 12
    assert (femur.epochs, femur.steps, femur.total_steps) == (2, s["steps"], s["total_steps"])
    assert femur.wall_time_s == s["wall_time_s"] and femur.train_time_s == s["train_time_s"]
    assert femur.samples_per_s == s["samples_per_s"] > 0
    assert femur.peak_memory_gb == s["peak_memory"]["gb"] and femur.peak_memory_kind == "process_max_rss"
    assert femur.device_type == "cpu"
    assert femur.final_train_loss == s["final_train_loss"] and femur.final_val_loss == s["final_val_loss"]
    assert femur.adapter_bytes == s["adapter_bytes"] > 0 and Path(femur.adapter_path).is_dir()
    assert femur.requeues == 0 and femur.resumes == 0
    # validation loss sits at each epoch's last step
    spe = s["steps"] // 2
    assert [x for x, _ in femur.val_loss_steps] == [spe, 2 * spe]
    metrics = json.loads((real_run["root"] / "blip2_femur" / "eval" / "metrics.json").read_text())
    assert femur.eval_source.endswith("metrics.json")
    for model in ("adapter", "base", "majority"):
        assert list(femur.eval[model]) == [f"Q{i}" for i in range(1, 9)] + ["overall"]
        assert femur.eval[model]["overall"] == metrics[model]["overall"]
    assert femur.questions == metrics["questions"]  # each question on its own terms, as written
    assert femur.generation == {"num_beams": 1, "no_repeat_ngram_size": 0, "repetition_penalty": 1.0,
                                "max_new_tokens": metrics["settings"]["max_new_tokens"]}  # fmt: skip
    # the tiny model on demo scans: the report's banner says so
    assert femur.tiny_model is True and femur.demo_data is True and femur.base_model == s["base_model"]
    assert (
        femur.normalization == s["normalization"]
        and femur.empty_answers_skipped == s["empty_answers_skipped"]
    )
    # CPU run: no GPU time, CPU time reported on its own
    assert result.totals["gpu_train_time_s"] == 0.0
    assert result.totals["cpu_train_time_s"] == s["train_time_s"]
    assert result.exit_code() == EXIT_OK


def test_collect_changes_nothing_it_reads(real_run):
    before = _snapshot(real_run["root"])
    collect(real_run["root"], categories=ALL, data_root=real_run["data_root"], compare=real_run["other"])
    collect(real_run["root"], categories=None)
    assert _snapshot(real_run["root"]) == before


def test_outputs_only_infers_the_job(real_run):
    """Without a job, the categories and data root come from the folders' config.yaml."""
    result = collect(real_run["root"], categories=None)
    assert result.categories_from.startswith("the config.yaml")
    assert {c.category: c.state for c in result.categories} == EXPECTED


def test_compare_two_runs(real_run, run_copy):
    result = collect(
        run_copy, categories=["Femur", "Abdomen"], data_root=real_run["data_root"], compare=real_run["other"]
    )
    rows = {r["category"]: r for r in result.compare["rows"]}
    femur = rows["Femur"]
    assert femur["state"] == femur["other_state"] == "completed"
    this_loss, other_loss = femur["final_train_loss"]["this"], femur["final_train_loss"]["other"]
    assert femur["final_train_loss"]["change"] == pytest.approx(this_loss - other_loss)
    assert this_loss < other_loss  # two epochs against one
    # the other run asked for Abdomen too (its config.yaml says so) but never trained it
    assert rows["Abdomen"]["other_state"] == "not_started"
    assert rows["Abdomen"]["final_train_loss"]["change"] is None
    # per question: this run evaluated Femur, the previous one did not
    femur_q = [r for r in result.compare["questions"] if r["category"] == "Femur"]
    assert [r["question"] for r in femur_q] == [*(f"Q{i}" for i in range(1, 9)), "overall"]
    q2 = femur_q[1]
    assert q2["question_name"] == "Fetal Orientation" and q2["metric"] == "orientation_accuracy"
    assert q2["adapter_metric"]["this"] is not None and q2["adapter_metric"]["other"] is None
    assert q2["adapter_metric"]["change"] is None
    paths = write_report(result.to_dict(), run_copy)
    md = paths["md"].read_text()
    assert "## Compared with" in md and "previous run" in md
    assert "Per question (adapter):" in md and "| Femur | Q7 Normality/Abnormality |" in md
    assert 'id="compare-table"' in paths["html"].read_text()


# ------------------------------------------------------------------------------ the reports


def test_cli_writes_reports_and_exit_status(real_run, run_copy, tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(dump_yaml(real_run["cfg"]))
    code = cli.main(["collect", "--job", str(job), "-p", f"output.root={run_copy}"])
    out = capsys.readouterr()
    assert code == EXIT_FAILED  # Standard_NT and Trans-ventricular failed
    for name in ALL:
        assert name in out.out
    assert "report.html" in out.out and "Trans-cerebellum" in out.err  # the corrupt file named

    every = list(csv.DictReader(io.StringIO((run_copy / "results.csv").read_text())))
    rows = [r for r in every if r["question"] == "all"]
    assert [r["category"] for r in rows] == ALL
    assert {r["category"]: r["state"] for r in rows} == EXPECTED
    femur = next(r for r in rows if r["category"] == "Femur")
    assert float(femur["eval_token_f1"]) >= 0 and float(femur["base_token_f1"]) >= 0
    collected = json.loads((run_copy / "collected.json").read_text())
    assert len(collected["categories"]) == len(ALL)
    # one row per category and question, the same figures in results.csv and collected.json
    questions = [f"Q{i}" for i in range(1, 9)]
    for name in ("Femur", "Abdomen"):
        got = [r for r in every if r["category"] == name and r["question"] != "all"]
        assert [r["question"] for r in got] == [*questions, "overall"]
        assert got[6]["question_name"] == "Normality/Abnormality"
        assert (got[6]["metric"], got[6]["metric_2"]) == ("sensitivity", "specificity")
        assert got[4]["metric"] == "ga_within_2w" and got[0]["metric"] == "structure_f1"
        same = [r for r in collected["per_question"] if r["category"] == name]
        for csv_row, json_row in zip(got, same, strict=True):
            assert float(csv_row["adapter_exact_match"]) == pytest.approx(json_row["adapter_exact_match"])
            assert float(csv_row["adapter_exact_match_low"]) <= float(csv_row["adapter_exact_match"])
            assert csv_row["p_exact_vs_majority"] != "" and csv_row["num_beams"] == "1"
    assert not [r for r in every if r["category"] == "Cervix" and r["question"] != "all"]
    md = (run_copy / "report.md").read_text()
    assert OOM in md and "report_plots/loss.png" in md and "report_plots/eval_per_question.png" in md
    for name in ("loss.png", "eval_per_question.png", "eval_vs_baselines.png"):
        assert (run_copy / "report_plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (run_copy / "report.html").read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert html.count("data:image/png;base64,") == 3

    # only categories that did not fail: exit 0
    code = cli.main(
        [
            "collect",
            "--job",
            str(job),
            "-p",
            f"output.root={run_copy}",
            "-p",
            "data.categories=[Femur,Cervix,Thorax]",
        ]
    )
    assert code == EXIT_OK
    code = cli.main(["collect", "--outputs", str(run_copy), "--compare", str(real_run["other"])])
    assert code == EXIT_FAILED
    assert "## Compared with" in (run_copy / "report.md").read_text()


def test_report_rebuilds_from_collected_json(real_run):
    """The report is a function of collected.json alone."""
    collected = collect(real_run["root"], categories=ALL, data_root=real_run["data_root"]).to_dict()
    again = json.loads(json.dumps(collected))
    assert render_markdown(again) == render_markdown(collected)
    assert render_csv(again) == render_csv(collected)
    assert set(make_plots(again)) == {"loss.png", "eval_per_question.png", "eval_vs_baselines.png"}


# ----------------------------------------------------------------------- hand-made summaries


def _summary(folder: Path, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "training_summary.json").write_text(json.dumps({"schema_version": 1, **fields}))


def _running_copy(real_run, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(real_run["root"] / "blip2_non_standard_nt", root / "blip2_non_standard_nt")
    return root


@pytest.mark.parametrize(
    ("holder", "age_s", "finished", "state", "words"),
    [
        ("self", 0, False, "running", "is alive"),
        ("dead", 0, False, "incomplete", "is gone"),
        ("other-host", 60, False, "running", "last write"),
        ("other-host", STALE_AFTER_S + 60, False, "incomplete", "nothing written for"),
        (None, 0, False, "incomplete", "no task holds the lock"),
        ("self", 0, True, "stopped", "still marked running"),
    ],
)
def test_running_or_incomplete(real_run, tmp_path, holder, age_s, finished, state, words):
    root = _running_copy(real_run, tmp_path)
    folder = root / "blip2_non_standard_nt"
    lock = folder / ".lock"
    if holder is None:
        lock.unlink()
    elif holder == "self":
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    elif holder == "other-host":
        lock.write_text(json.dumps({"host": "gpu-node-17", "pid": 4242, "slurm_job_id": "991"}))
    past = time.time() - age_s
    for p in [folder, *folder.rglob("*")]:
        os.utime(p, (past, past))
    (c,) = collect(root, categories=["Non_standard_NT"], finished=finished).categories
    assert c.state == state, c.detail
    assert words in c.detail and c.last_step == 3
    assert lock.exists() == (holder is not None)  # the lock is read, never taken or removed


def test_a_task_that_finishes_while_it_is_read_is_completed_not_incomplete(real_run, tmp_path, monkeypatch):
    """The summary read says running; by the time the lock is read the task has written its
    completed summary and let the lock go. The collector reads the folder again instead of
    reporting a category that just completed as incomplete."""
    import fada_batch.run.collect as collect_mod

    folder = tmp_path / "root" / "blip2_femur"
    shutil.copytree(real_run["root"] / "blip2_femur", folder)
    done = (folder / "training_summary.json").read_text()
    (folder / "training_summary.json").write_text(json.dumps({**json.loads(done), "status": "running"}))
    (folder / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    real_task_alive = collect_mod.task_alive
    calls = []

    def finishes_meanwhile(folder_, **kw):
        calls.append(folder_)
        (folder_ / "training_summary.json").write_text(done)  # its last summary, then the lock goes
        (folder_ / ".lock").unlink()
        return real_task_alive(folder_, **kw)

    monkeypatch.setattr(collect_mod, "task_alive", finishes_meanwhile)
    (c,) = collect(tmp_path / "root", categories=["Femur"]).categories
    assert calls == [folder]
    assert c.state == "completed", c.detail


def test_awaiting_labels_without_summary(tmp_path, demo_root):
    root = tmp_path / "out"
    result = collect(root, categories=["Femur", "Cervix"], data_root=demo_root)  # nothing started
    assert [c.state for c in result.categories] == ["not_started", "awaiting_labels"]
    assert "does not exist yet" in result.problems[0] and not root.exists()
    with pytest.raises(FileNotFoundError, match="--outputs DIR"):
        collect(root, categories=None)
    root.mkdir()
    (c,) = collect(root, categories=["Cervix"], data_root=demo_root).categories
    assert c.state == "awaiting_labels" and "no label sheet" in c.detail
    (c,) = collect(root, categories=["Cervix"], data_root=None).categories
    assert c.state == "not_started"
    (c,) = collect(root, categories=["Femur"], data_root=demo_root).categories
    assert c.state == "not_started"


def test_failed_error_tail_and_unknown_status(tmp_path):
    root = tmp_path / "out"
    trace = "\n".join(f"  frame {i}" for i in range(40)) + "\nValueError: the last line says why"
    _summary(
        root / "blip2_femur",
        status="failed",
        category="Femur",
        error=trace,
        start_time="2026-01-01T00:00:00+00:00",
    )
    _summary(root / "blip2_thorax", status="exploded", category="Thorax")
    (root / "blip2_abdomen").mkdir()
    (root / "blip2_abdomen" / "training_summary.json").write_text("[1, 2, 3]")
    (root / "blip2_bogus").mkdir()
    result = collect(root, categories=["Femur", "Thorax", "Abdomen"])
    femur, thorax, abdomen = result.categories
    assert femur.state == "failed" and femur.detail == "ValueError: the last line says why"
    assert femur.error_tail.splitlines()[-1] == "ValueError: the last line says why"
    assert len(femur.error_tail.splitlines()) == 8
    assert thorax.state == abdomen.state == "unreadable"
    assert any("unknown status 'exploded'" in p for p in result.problems)
    assert any("does not hold a JSON object" in p for p in result.problems)
    assert any("blip2_bogus" in p for p in result.problems)
    assert result.exit_code() == EXIT_FAILED
    # a failed category that the job did not ask for does not fail the collector
    assert collect(root, categories=["Thorax"]).exit_code() == EXIT_OK


def test_eval_from_summary_and_bad_metrics_file(real_run, tmp_path):
    """Without eval/metrics.json, the summary's `eval` block (as train writes it) is used."""
    root = tmp_path / "out"
    real = json.loads((real_run["root"] / "blip2_femur" / "training_summary.json").read_text())
    assert "per_question" in real["eval"]  # the shape train writes
    _summary(root / "blip2_femur", status="completed", category="Femur", eval=real["eval"])
    overall = {"n": 10, "exact_match": 0.5, "token_f1": 0.7, "bleu1": 0.6, "rouge_l": 0.65}
    _summary(root / "blip2_abdomen", status="completed", category="Abdomen", eval={"overall": overall})
    _summary(root / "blip2_thorax", status="completed", category="Thorax")
    (root / "blip2_thorax" / "eval").mkdir()
    (root / "blip2_thorax" / "eval" / "metrics.json").write_text("{not json")
    result = collect(root, categories=["Femur", "Abdomen", "Thorax"])
    femur, abdomen, thorax = result.categories
    metrics = json.loads((real_run["root"] / "blip2_femur" / "eval" / "metrics.json").read_text())
    assert femur.eval == {m: metrics[m] for m in ("adapter", "base", "majority")}
    assert abdomen.eval == {"adapter": {"overall": overall}}
    assert thorax.eval is None
    assert any("metrics.json is not valid JSON" in p for p in result.problems)
    assert any("adapter is missing" in p for p in result.problems)  # completed, no final_model


def test_gpu_and_cpu_time_kept_apart(tmp_path):
    root = tmp_path / "out"
    common = {"status": "completed", "epochs": 1, "steps": 10}
    _summary(root / "blip2_femur", category="Femur", device={"type": "cuda", "name": "H100"},
             train_time_s=3600.0, wall_time_s=4000.0, start_time="2026-01-01T10:00:00+00:00",
             end_time="2026-01-01T11:06:40+00:00", peak_memory={"kind": "gpu_max_allocated", "gb": 21.5},
             **common)  # fmt: skip
    _summary(root / "blip2_thorax", category="Thorax", device={"type": "cuda"}, train_time_s=1800.0,
             wall_time_s=2000.0, start_time="2026-01-01T10:30:00+00:00", end_time="2026-01-01T12:00:00+00:00",
             **common)  # fmt: skip
    _summary(root / "blip2_cervix", category="Cervix", device={"type": "cpu"}, train_time_s=60.0,
             wall_time_s=70.0, start_time="2026-01-01T09:00:00+00:00", end_time="2026-01-01T09:01:10+00:00",
             **common)  # fmt: skip
    t = collect(root, categories=["Femur", "Thorax", "Cervix"]).totals
    assert t["gpu_train_time_s"] == 5400.0 and t["gpu_wall_time_s"] == 6000.0
    assert t["cpu_train_time_s"] == 60.0
    assert t["by_device"]["cuda"]["categories"] == 2
    assert t["run_wall_time_s"] == 3 * 3600.0  # 09:00 to 12:00
    md = render_markdown(collect(root, categories=["Femur", "Thorax", "Cervix"]).to_dict())
    assert "GPU time: 1h30m in the training loop, 1h40m task wall time (2 categories)" in md
    assert "CPU time (no GPU): 1m00s" in md
    assert "21.50 GB GPU" in md


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=True)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_KEYS = ["status", "category", "images", "qa_pairs", "epochs", "steps", "total_steps", "wall_time_s",
         "train_time_s", "samples_per_s", "peak_memory", "loss_curve", "val_loss", "epoch_train_loss",
         "final_train_loss", "final_val_loss", "requeues", "resumes", "slurm", "adapter_path",
         "adapter_bytes", "error", "device", "start_time", "end_time", "eval", "batch_size",
         "grad_accum_steps", "message", "updated", "checkpoint"]  # fmt: skip
_curve = st.lists(st.tuples(st.integers(0, 10**6), st.floats(-1e6, 1e6)).map(list), max_size=20)
_summaries = st.dictionaries(
    st.sampled_from(_KEYS),
    _json | _curve | st.sampled_from(["completed", "running", "failed", "interrupted", "awaiting_labels"]),
    max_size=len(_KEYS),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(summary=_summaries, metrics=_json)
def test_any_summary_never_crashes_the_report(tmp_path, summary, metrics):
    root = tmp_path / "fuzz"
    shutil.rmtree(root, ignore_errors=True)
    folder = root / "blip2_femur"
    folder.mkdir(parents=True)
    (folder / "training_summary.json").write_text(json.dumps(summary))
    (folder / "eval").mkdir()
    (folder / "eval" / "metrics.json").write_text(json.dumps(metrics))
    result = collect(root, categories=["Femur"])
    collected = json.loads(json.dumps(result.to_dict(), allow_nan=False))  # strict JSON
    render_markdown(collected)
    render_csv(collected)
    render_html(collected, make_plots(collected))


def test_workbook_job_category_without_rows_awaits_labels(tmp_path, capsys, monkeypatch):
    """A workbook job: a listed category that never ran and has no row in the master workbook
    awaits labels; one with rows is not started; the job's aliases count; the CLI passes it on."""
    import fada_batch.run.collect as collect_mod
    from fada_batch.config import config_from_dict
    from fada_batch.run.collect import LabelSource
    from tests.test_workbook import ANSWERS, make_master

    data = tmp_path / "data"
    data.mkdir()
    make_master(data, ("Femur",), extra_rows=[["Aortic view", "a.png", *ANSWERS]])
    out = tmp_path / "out"
    cfg = config_from_dict(
        {
            "data": {"root": str(data), "labels": "workbook", "categories": ["Femur", "Aorta", "Cervix"]},
            "output": {"root": str(out)},
        }
    )
    labels = LabelSource.from_data(asdict(cfg.data), out)
    reads = []
    real_read = collect_mod.read_workbook
    monkeypatch.setattr(
        collect_mod, "read_workbook", lambda *a, **k: reads.append(a[1]) or real_read(*a, **k)
    )
    result = collect(out, categories=["Femur", "Aorta", "Cervix"], labels=labels)
    assert [[c.name for c in cats] for cats in reads] == [["Femur", "Aorta", "Cervix"]]  # read once for all
    states = {c.category: (c.state, c.detail) for c in result.categories}
    assert states["Femur"][0] == "not_started"
    assert states["Aorta"] == (
        "awaiting_labels",
        f"no rows in the master workbook {data / 'Fetal Ultrasound Annotations Final.xlsx'}",
    )
    assert states["Cervix"][0] == "awaiting_labels"
    # the job's alias (its category table) gives Aorta its row
    cfg.data.category_aliases = {"Aorta": ["Aortic view"]}
    labels = LabelSource.from_data(asdict(cfg.data), out)
    (aorta,) = collect(out, categories=["Aorta"], labels=labels, table=cfg.data.table()).categories
    assert aorta.state == "not_started"
    # a data root alone (the default workbook, auto) reads the workbook too
    (aorta,) = collect(out, categories=["Aorta"], data_root=data).categories
    assert aorta.state == "awaiting_labels"
    # a broken workbook cannot tell: not started, not awaiting
    (data / "Fetal Ultrasound Annotations Final.xlsx").write_bytes(b"not a workbook")
    (aorta,) = collect(out, categories=["Aorta"], data_root=data).categories
    assert aorta.state == "not_started"
    # through the CLI with --job
    make_master(data, ("Femur",))
    job = tmp_path / "job.yaml"
    job.write_text(dump_yaml(cfg))
    cli.main(["collect", "--job", str(job)])
    table = capsys.readouterr().out
    assert "awaiting" in table and "no rows in the master workbook" in (out / "collected.json").read_text()


def test_report_links_event_files_card_and_exports(real_run, run_copy, tmp_path):
    """Each category's TensorBoard folder, model card and exports are linked from the report,
    relative to the output root when they lie in it; links resolve to what they name."""
    from urllib.parse import unquote

    from fada_batch.tools.export import export_adapter

    femur_dir = run_copy / "blip2_femur"
    inside = run_copy / "exports" / "femur adapter"
    elsewhere = tmp_path / "published femur"
    export_adapter(femur_dir / "final_model", inside)
    export_adapter(femur_dir / "final_model", elsewhere)
    gone = tmp_path / "deleted export"
    export_adapter(femur_dir / "final_model", gone)
    shutil.rmtree(gone)
    result = collect(run_copy, categories=ALL, data_root=real_run["data_root"])
    cats = _by_name(result)
    femur, thorax = cats["Femur"], cats["Thorax"]
    assert femur.tensorboard_dir == str(femur_dir / "tensorboard")
    assert femur.card_path == str(femur_dir / "final_model" / "README.md")
    assert [e["path"] for e in femur.exports] == [str(inside.resolve()), str(elsewhere.resolve())]
    # stopped part-way: its curves are there, no card yet
    assert thorax.tensorboard_dir is not None and thorax.card_path is None and thorax.exports == []
    assert cats["Cervix"].tensorboard_dir is None  # awaiting labels
    paths = write_report(result.to_dict(), run_copy)
    md = paths["md"].read_text()
    assert f"tensorboard --logdir {run_copy}" in md
    row = next(line for line in md.splitlines() if line.startswith("| Femur |"))
    targets = re.findall(r"\]\(<([^>]+)>\)", row)
    assert targets == [
        (Path("blip2_femur") / "final_model" / "README.md").as_posix(),
        "blip2_femur/tensorboard",
        "exports/femur adapter",
        str(elsewhere.resolve()),
    ]
    for t in targets:
        assert (run_copy / t).exists(), t  # an absolute target joins as itself
    html = paths["html"].read_text()
    femur_row = html.split('data-category="Femur"', 1)[1].split("</tr>", 1)[0]
    hrefs = [unquote(h) for h in re.findall(r'<a href="([^"]+)"', femur_row)]
    assert hrefs == targets


def test_plot_legends_cover_no_panel(real_run):
    """The legends sit outside every panel, so none hides a bar or a curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from fada_batch.run.report import eval_models_figure, loss_figure

    cats = collect(real_run["root"], categories=ALL, data_root=real_run["data_root"]).to_dict()["categories"]
    for make in (loss_figure, eval_models_figure):
        fig = make(cats)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer = canvas.get_renderer()
        (legend,) = fig.legends
        box = legend.get_window_extent(renderer)
        panels = [ax.get_window_extent(renderer) for ax in fig.axes if ax.get_visible()]
        assert panels and not [p for p in panels if box.overlaps(p)], make.__name__
        assert not [ax for ax in fig.axes if ax.get_legend() is not None]  # no legend inside a panel
