"""Write a collected run as report.md, a self-contained report.html, results.csv and collected.json.

    paths = write_report(collect(root, ...).to_dict(), root)

Everything here works on the plain dict that `collect.CollectResult.to_dict()` returns (the same
content as `collected.json`), so a report can be rebuilt from `collected.json` alone. Plots are
matplotlib PNGs (Agg, no display): embedded in the HTML as data URIs, and written to
`report_plots/` for the Markdown. The HTML loads nothing: its Content-Security-Policy allows
only inline styles and `data:` images, and it has no scripts. Every file is written atomically.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fada_batch.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text
from fada_batch.run import report_questions as rq
from fada_batch.run.questions import QUESTION_COLUMNS, question_rows
from fada_batch.text import plural

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
RESULTS_CSV = "results.csv"
COLLECTED_JSON = "collected.json"
PLOTS_DIR = "report_plots"
METRICS = ("exact_match", "token_f1", "bleu1", "rouge_l")  # metrics.METRIC_NAMES, in that order
MODELS = ("adapter", "base", "majority")
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STATE_LABELS = {
    "completed": "completed",
    "running": "running",
    "queued": "queued",
    "incomplete": "incomplete",
    "stopped": "stopped unfinished",
    "failed": "failed",
    "invalid_data": "failed (invalid data)",
    "awaiting_labels": "awaiting labels",
    "not_started": "not started",
    "unreadable": "unreadable summary",
}
STATE_COLOURS = {
    "completed": "#1a7f37",
    "running": "#0969da",
    "queued": "#54aeff",
    "incomplete": "#bf8700",
    "stopped": "#bc4c00",
    "failed": "#cf222e",
    "invalid_data": "#cf222e",
    "awaiting_labels": "#8250df",
    "not_started": "#6e7781",
    "unreadable": "#82071e",
}

# --------------------------------------------------------------------------------- formatting


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def fmt_num(v: float | None, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def fmt_splits(d: dict[str, int] | None) -> str:
    if not d:
        return "–"
    return "/".join(str(d.get(k, "–")) for k in ("train", "val", "test"))


def fmt_change(c: dict[str, Any] | None, digits: int = 4, *, duration: bool = False) -> tuple[str, str, str]:
    """(this, other, change) as text for a `compare_runs` cell."""
    c = c or {}
    show = fmt_duration if duration else (lambda v: fmt_num(v, digits))
    this, other, change, pct = c.get("this"), c.get("other"), c.get("change"), c.get("change_pct")
    if change is None:
        delta = "–"
    else:
        delta = ("+" if change >= 0 else "−") + (
            fmt_duration(abs(change)) if duration else f"{abs(change):.{digits}f}"
        )
        if pct is not None:
            delta += f" ({'+' if pct >= 0 else '−'}{abs(pct):.1f}%)"
    return show(this), show(other), delta


def _slurm(c: dict[str, Any]) -> str:
    array, task, job = c.get("slurm_array_job_id"), c.get("slurm_array_task_id"), c.get("slurm_job_id")
    if array and task is not None:
        return f"{array}_{task}" + (f" (job {job})" if job and job != array else "")
    return job or "–"


def _eval_overall(c: dict[str, Any], model: str = "adapter") -> dict[str, float]:
    return ((c.get("eval") or {}).get(model) or {}).get("overall") or {}


def _question_key(q: str) -> tuple[int, int, str]:
    if q == "overall":
        return (2, 0, q)
    if q[:1] == "Q" and q[1:].isdigit():
        return (0, int(q[1:]), q)
    return (1, 0, q)


def _questions(cats: list[dict[str, Any]], model: str = "adapter") -> list[str]:
    qs = {q for c in cats for q in ((c.get("eval") or {}).get(model) or {})}
    return sorted(qs, key=_question_key)


def _memory(c: dict[str, Any]) -> str:
    gb = c.get("peak_memory_gb")
    if gb is None:
        return "–"
    kind = "GPU" if c.get("peak_memory_kind") == "gpu_max_allocated" else "RSS"
    return f"{gb:.2f} GB {kind}"


def _steps(c: dict[str, Any]) -> str:
    if c.get("state") == "completed":
        return str(c.get("steps")) if c.get("steps") is not None else "–"
    last, total = c.get("last_step"), c.get("total_steps")
    if last is None:
        return "–"
    return f"{last}/{total}" if total else str(last)


def _time_lines(t: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) lines for the run's time totals: GPU and CPU kept apart."""
    lines = []
    by = t.get("by_device") or {}
    for dev, label in (
        ("cuda", "GPU time"),
        ("cpu", "CPU time (no GPU)"),
        ("unknown", "Unfinished tasks (device not recorded yet)"),
    ):
        d = by.get(dev)
        if d:
            parts = [f"{fmt_duration(d.get('train_time_s'))} in the training loop"]
            if d.get("wall_time_s") is not None:
                parts.append(f"{fmt_duration(d['wall_time_s'])} task wall time")
            n = d.get("categories")
            lines.append((label, ", ".join(parts) + f" ({n} {'category' if n == 1 else 'categories'})"))
    if not lines:
        lines.append(("GPU time", "none recorded yet"))
    wall = fmt_duration(t.get("run_wall_time_s"))
    if t.get("still_running"):
        wall += " so far (still running)"
    lines.append(("Run wall time", f"{wall}, earliest start to latest end"))
    return lines


# --------------------------------------------------------------------------------------- plots


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def plot_losses(cats: list[dict[str, Any]]) -> bytes | None:
    """Training loss per step and validation loss per epoch, one panel per category."""
    fig = loss_figure(cats)
    return _png(fig) if fig is not None else None


def loss_figure(cats: list[dict[str, Any]]) -> Any:
    """The matplotlib Figure of `plot_losses` (None without curves); its legend sits above the panels."""
    from matplotlib.figure import Figure

    with_curves = [c for c in cats if c.get("loss_curve") or c.get("val_loss_steps")]
    if not with_curves:
        return None
    ncols = min(3, len(with_curves))
    nrows = math.ceil(len(with_curves) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, c in zip(axes.flat, with_curves, strict=False):
        if c.get("loss_curve"):
            xs, ys = zip(*c["loss_curve"], strict=True)
            marker = "o" if len(xs) < 30 else None  # a curve of one or two steps stays visible
            ax.plot(xs, ys, color="#0969da", linewidth=1.2, marker=marker, markersize=3, label="training")
        if c.get("val_loss_steps"):
            xs, ys = zip(*c["val_loss_steps"], strict=True)
            ax.plot(xs, ys, color="#d1242f", marker="o", linewidth=1.5, label="validation (epoch end)")
        ax.set_title(f"{c['category']} ({STATE_LABELS.get(c.get('state', ''), c.get('state'))})", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    # one legend above the panels, where it covers no curve
    handles, labels = max((ax.get_legend_handles_labels() for ax in axes.flat), key=lambda hl: len(hl[1]))
    fig.legend(handles, labels, loc="outside upper center", ncol=len(labels), fontsize=8)
    for ax in list(axes.flat)[len(with_curves) :]:
        ax.set_visible(False)
    return fig


def plot_eval_heatmaps(cats: list[dict[str, Any]]) -> bytes | None:
    """The adapter's metrics per question (columns) and category (rows), one panel per metric."""
    from matplotlib.figure import Figure

    rows = [c for c in cats if (c.get("eval") or {}).get("adapter")]
    if not rows:
        return None
    qs = _questions(rows)
    names = [c["category"] for c in rows]
    panel_w, panel_h = 0.6 * len(qs) + 1.8, 0.45 * len(rows) + 1.1  # inches per metric panel
    fig = Figure(figsize=(2 * panel_w + 1.0, 2 * panel_h), layout="constrained")
    axes = fig.subplots(2, 2, squeeze=False)
    image = None
    for ax, metric in zip(axes.flat, METRICS, strict=True):
        grid = [[(c["eval"]["adapter"].get(q) or {}).get(metric, math.nan) for q in qs] for c in rows]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(qs)), qs, fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_title(f"adapter {metric}", fontsize=10)
        for i, line in enumerate(grid):
            for j, v in enumerate(line):
                if not math.isnan(v):
                    ax.text(
                        j,
                        i,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="black" if v > 0.6 else "white",
                    )
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="score (0-1)")
    return _png(fig)


def plot_eval_models(cats: list[dict[str, Any]]) -> bytes | None:
    """Overall metrics of the adapter against the base model and the majority answer."""
    fig = eval_models_figure(cats)
    return _png(fig) if fig is not None else None


def eval_models_figure(cats: list[dict[str, Any]]) -> Any:
    """The matplotlib Figure of `plot_eval_models` (None without evaluations); legend above the panels."""
    from matplotlib.figure import Figure

    rows = [c for c in cats if c.get("eval")]
    if not rows:
        return None
    names = [c["category"] for c in rows]
    fig = Figure(figsize=(4.0 * len(METRICS), 3.6), layout="constrained")
    axes = fig.subplots(1, len(METRICS), squeeze=False)[0]
    width = 0.8 / len(MODELS)
    colours = {"adapter": "#0969da", "base": "#8c959f", "majority": "#bf8700"}
    for ax, metric in zip(axes, METRICS, strict=True):
        for k, model in enumerate(MODELS):
            vals = [_eval_overall(c, model).get(metric, math.nan) for c in rows]
            xs = [i + (k - (len(MODELS) - 1) / 2) * width for i in range(len(rows))]
            ax.bar(xs, vals, width=width, label=model, color=colours[model])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"overall {metric}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    # above the panels, where it covers no bar
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper center", ncol=len(MODELS), fontsize=8)
    return fig


def make_plots(collected: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes by file name; plots without data are left out."""
    cats = collected.get("categories") or []
    plots = {
        "loss.png": plot_losses(cats),
        "eval_per_question.png": plot_eval_heatmaps(cats),
        "eval_vs_baselines.png": plot_eval_models(cats),
    }
    return {name: png for name, png in plots.items() if png}


PLOT_TITLES = {
    "loss.png": "Training and validation loss",
    "eval_per_question.png": "Evaluation per question and category (adapter)",
    "eval_vs_baselines.png": "Evaluation: adapter against base model and majority answer",
}

# -------------------------------------------------------------------------------------- CSV

CSV_COLUMNS = (
    "category", "state", "detail", "summary_status", "last_step", "total_steps",
    "images_train", "images_val", "images_test", "qa_train", "qa_val", "qa_test",
    "epochs", "epochs_completed", "steps", "wall_time_s", "train_time_s", "samples_per_s",
    "peak_memory_gb", "peak_memory_kind", "device_type", "device_name",
    "final_train_loss", "final_val_loss",
    *(f"eval_{m}" for m in METRICS),
    *(f"base_{m}" for m in METRICS),
    *(f"majority_{m}" for m in METRICS),
    "requeues", "resumes", "slurm_job_id", "slurm_array_job_id", "slurm_array_task_id",
    "adapter_path", "adapter_bytes", "start_time", "end_time", "error_tail",
    "stop_reason", "job_state", "resume",
)  # fmt: skip


# one row per category (question "all"), then one per category and question (`run.questions`)
RESULT_COLUMNS = ("category", "question", *CSV_COLUMNS[1:], *QUESTION_COLUMNS[2:])


def csv_rows(collected: dict[str, Any]) -> list[dict[str, Any]]:
    """A category's row (question "all": state, training, overall scores), then its question rows."""
    per_question = collected.get("per_question")
    if not isinstance(per_question, list):  # a collected.json from before per-question rows
        per_question = question_rows(collected.get("categories") or [])
    out = []
    for c in collected.get("categories") or []:
        row = {k: c.get(k) for k in CSV_COLUMNS if k in c}
        row["question"] = "all"
        for split in ("train", "val", "test"):
            row[f"images_{split}"] = (c.get("images") or {}).get(split)
            row[f"qa_{split}"] = (c.get("qa_pairs") or {}).get(split)
        for prefix, model in (("eval", "adapter"), ("base", "base"), ("majority", "majority")):
            for m in METRICS:
                row[f"{prefix}_{m}"] = _eval_overall(c, model).get(m)
        out.append(row)
        out += [r for r in per_question if isinstance(r, dict) and r.get("category") == c.get("category")]
    return out


def render_csv(collected: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in csv_rows(collected):
        w.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


# --------------------------------------------------------------------------------- Markdown


def _md(text: Any) -> str:
    """One table cell: no newlines, pipes escaped."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").strip() or " "


def _md_table(head: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(_md(v) for v in r) + " |" for r in rows]
    return [*lines, ""]


def _fence(text: str) -> list[str]:
    """A fenced code block (one line per item) whose fence outruns any backticks in `text`."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence, *text.splitlines(), fence, ""]


def _attention(cats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in cats if c.get("state") != "completed"]


def resume_all(cats: list[dict[str, Any]]) -> list[str]:
    """One `submit` per job file for every category with a resume command on SLURM
    (`... --categories A,B`); `train` commands (one category each) as they are."""
    grouped: dict[str, list[str]] = {}
    out = []
    for c in cats:
        cmd = c.get("resume")
        if not cmd:
            continue
        head, sep, _name = cmd.rpartition(" --categories ")
        if sep:
            grouped.setdefault(head, []).append(c["category"])
        else:
            out.append(cmd)
    return [f"{head} --categories {','.join(names)}" for head, names in grouped.items()] + out


def _totals_line(t: dict[str, Any]) -> str:
    by = t.get("by_state") or {}
    total = plural(t.get("categories", 0), "category", "categories")
    line = f"{t.get('done', 0)} of {total} done, {t.get('failed', 0)} failed, "
    if t.get("stopped"):
        line += f"{t['stopped']} stopped unfinished (need a rerun), "
    line += (
        f"{t.get('waiting', 0)} waiting ({by.get('running', 0)} running, "
        + (f"{by['queued']} queued, " if by.get("queued") else "")
        + f"{by.get('incomplete', 0)} incomplete, {by.get('not_started', 0)} not started, "
        f"{by.get('awaiting_labels', 0)} awaiting labels)"
    )
    return line + (f", {by['unreadable']} unreadable" if by.get("unreadable") else "")


def render_markdown(collected: dict[str, Any], plot_files: dict[str, str] | None = None) -> str:
    """report.md: totals, categories, training, what needs attention, evaluation, plots (as
    `plot_files`: name -> relative path), the comparison and the problems found."""
    cats = collected.get("categories") or []
    out = _md_totals(collected)
    banner = rq.synthetic_banner(cats)
    if banner:
        out[1:1] = [f"> **{banner}**", ""]
    out += _md_categories(cats, collected.get("output_root"))
    out += _md_training(cats)
    out += _md_attention(cats)
    out += _md_evaluation(cats)
    out += _md_joint(cats)
    if plot_files:
        out += ["## Plots", ""]
        for name, rel in plot_files.items():
            out += [f"![{PLOT_TITLES.get(name, name)}]({rel})", ""]
    cmp = collected.get("compare")
    if cmp:
        out += [f"## Compared with `{cmp.get('other_root')}`", ""]
        out += ["Change = this run − the other run.", ""]
        head, rows = _compare_rows(cmp)
        out += _md_table(head, rows)
        if cmp.get("questions"):
            out += ["Per question (adapter):", ""]
            out += _md_table(rq.COMPARE_HEAD, rq.compare_rows(cmp))
    if collected.get("problems"):
        out += ["## Problems found while collecting", ""]
        out += [f"- {_md(p)}" for p in collected["problems"]] + [""]
    return "\n".join(out).rstrip() + "\n"


def _md_totals(collected: dict[str, Any]) -> list[str]:
    t = collected.get("totals") or {}
    out = [
        "# Training run report",
        "",
        f"Output root `{collected.get('output_root')}`; collected {collected.get('generated')}; "
        f"categories from {collected.get('categories_from')}.",
        "",
        "## Totals",
        "",
        "- **" + _totals_line(t).replace(" done, ", " done**, ", 1),
    ]
    return out + [f"- {label}: {value}" for label, value in _time_lines(t)]


def _links(c: dict[str, Any], root: str | None) -> list[tuple[str, str]]:
    """(label, target) of a category's files to open: its model card, its TensorBoard event
    files and its exports; targets relative to the output root (where the report is) when
    they lie in it."""

    def rel(path: str) -> str:
        if root and Path(path).is_relative_to(root):
            return Path(path).relative_to(root).as_posix()
        return Path(path).as_posix()

    out = []
    if c.get("card_path"):
        out.append(("model card", rel(c["card_path"])))
    if c.get("tensorboard_dir"):
        out.append(("TensorBoard events", rel(c["tensorboard_dir"])))
    for e in c.get("exports") or []:
        label = f"merged {e.get('dtype') or ''}".strip() if e.get("merged") else "adapter export"
        out.append((label, rel(e["path"])))
    return out


def _md_link(label: str, target: str) -> str:
    return f"[{label}](<{target}>)"


def _md_categories(cats: list[dict[str, Any]], root: str | None = None) -> list[str]:
    out = ["", "## Categories", ""]
    if any(c.get("tensorboard_dir") for c in cats):
        out += [f"Curves of every category, live while they train: `tensorboard --logdir {root}`.", ""]
    return out + _md_table(
        ["Category", "Status", "Detail", "SLURM job", "Requeues", "Adapter", "Files"],
        [
            [
                category_label(c),
                STATE_LABELS.get(c.get("state"), c.get("state")),
                c.get("detail", ""),
                _slurm(c),
                c.get("requeues") if c.get("requeues") is not None else "–",
                f"`{c['adapter_path']}` ({fmt_bytes(c.get('adapter_bytes'))})"
                if c.get("adapter_path")
                else "–",
                " · ".join(_md_link(label, t) for label, t in _links(c, root)) or "–",
            ]
            for c in cats
        ],
    )


def _md_training(cats: list[dict[str, Any]]) -> list[str]:
    out = ["## Training", ""]
    return out + _md_table(
        ["Category", "Images tr/val/test", "QA pairs tr/val/test", "Epochs", "Steps", "Wall time",
         "Train time", "Samples/s", "Peak memory", "Final train loss", "Final val loss",
         "Token F1", "Exact match"],
        [
            [
                c["category"],
                fmt_splits(c.get("images")),
                fmt_splits(c.get("qa_pairs")),
                c.get("epochs") if c.get("epochs") is not None else "–",
                _steps(c),
                fmt_duration(c.get("wall_time_s")),
                fmt_duration(c.get("train_time_s")),
                fmt_num(c.get("samples_per_s"), 1),
                _memory(c),
                fmt_num(c.get("final_train_loss")),
                fmt_num(c.get("final_val_loss")),
                fmt_num(_eval_overall(c).get("token_f1"), 3),
                fmt_num(_eval_overall(c).get("exact_match"), 3),
            ]
            for c in cats
        ],
    )  # fmt: skip


def _md_attention(cats: list[dict[str, Any]]) -> list[str]:
    attention = _attention(cats)
    if not attention:
        return []
    out = ["## Needs attention", ""]
    for c in attention:
        out.append(
            f"- **{c['category']}**: {STATE_LABELS.get(c.get('state'), c.get('state'))}: {c.get('detail', '')}"
        )
        if c.get("error_tail"):  # a code block inside the list item
            out += ["", *(f"  {line}" for line in _fence(c["error_tail"])[:-1]), ""]
        if c.get("resume"):
            out += ["", "  To resume:", "", *(f"  {line}" for line in _fence(c["resume"])[:-1]), ""]
    out.append("")
    every = resume_all(attention)
    if len([c for c in attention if c.get("resume")]) > 1:
        out += ["To resume all of them:", "", *_fence("\n".join(every))]
    return out


def _md_evaluation(cats: list[dict[str, Any]]) -> list[str]:
    evaluated = [c for c in cats if c.get("eval")]
    if not evaluated:
        return []
    out = ["## Evaluation", "", rq.HEADLINE_NOTE, ""]
    for c in evaluated:
        out += [f"### {c['category']}", ""]
        out += rq.md_headline(c)
        out += rq.md_confusion(c)
        out += ["Text overlap per question (adapter; base and majority answer as token F1):", ""]
        out += _md_table(*_eval_table(c))
    data = rq.data_rows(cats)
    if data:
        out += ["## Data and normalisation", ""]
        out += _md_table(rq.DATA_HEAD, data)
    return out


JOINT_HEAD = [
    "Category",
    "own adapter exact match",
    "own adapter token F1",
    "joint adapter exact match",
    "joint adapter token F1",
    "base token F1",
    "majority token F1",
]
JOINT_NOTE = (
    "The joint adapter (train.mode=joint) on each category's held-out images, beside that "
    "category's own adapter where one was trained in this output root (the same images when "
    "both used the same split settings)."
)


def joint_rows(cats: list[dict[str, Any]]) -> list[list[str]]:
    """One row per category the joint adapter was evaluated on: its scores there beside the
    category's own adapter's (blank where none), and the base model's and majority answer's."""
    joint = next((c for c in cats if c.get("joint_scores")), None)
    if joint is None:
        return []
    own = {c["category"]: _eval_overall(c) for c in cats if not c.get("joint_scores")}
    rows = []
    for name, models in joint["joint_scores"].items():
        mine, j = own.get(name) or {}, models.get("adapter") or {}
        rows.append(
            [name, fmt_num(mine.get("exact_match"), 3), fmt_num(mine.get("token_f1"), 3),
             fmt_num(j.get("exact_match"), 3), fmt_num(j.get("token_f1"), 3),
             fmt_num((models.get("base") or {}).get("token_f1"), 3),
             fmt_num((models.get("majority") or {}).get("token_f1"), 3)]
        )  # fmt: skip
    return rows


def _md_joint(cats: list[dict[str, Any]]) -> list[str]:
    rows = joint_rows(cats)
    if not rows:
        return []
    return [
        "## Joint adapter beside the per-category adapters",
        "",
        JOINT_NOTE,
        "",
        *_md_table(JOINT_HEAD, rows),
    ]


def _html_joint(cats: list[dict[str, Any]]) -> list[str]:
    rows = joint_rows(cats)
    if not rows:
        return []
    body = ["<tr>" + "".join(_td(x, "num") for x in row) + "</tr>" for row in rows]
    return [
        '<section id="joint"><h2>Joint adapter beside the per-category adapters</h2>',
        f'<p class="note">{_e(JOINT_NOTE)}</p>',
        _html_table(JOINT_HEAD, body, table_id="joint-table"),
        "</section>",
    ]


def _eval_table(c: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per question: the adapter's metrics, and token F1 of the base model and majority answer."""
    ev = c.get("eval") or {}
    qs = sorted({q for m in ev.values() for q in m}, key=_question_key)
    head = ["Question", "n", *METRICS, "base token_f1", "majority token_f1"]
    names = {q: e.get("name") for q, e in (c.get("questions") or {}).items() if isinstance(e, dict)}
    rows = []
    for q in qs:
        a = (ev.get("adapter") or {}).get(q) or {}
        rows.append(
            [f"{q} {names[q]}" if names.get(q) and q != "overall" else q, fmt_num(a.get("n"), 0), *(fmt_num(a.get(m), 3) for m in METRICS),
             fmt_num(((ev.get("base") or {}).get(q) or {}).get("token_f1"), 3),
             fmt_num(((ev.get("majority") or {}).get(q) or {}).get("token_f1"), 3)]
        )  # fmt: skip
    return head, rows


_COMPARE_COLUMNS = (
    ("final_train_loss", "train loss", 4, False),
    ("final_val_loss", "val loss", 4, False),
    ("eval_token_f1", "token F1", 3, False),
    ("eval_exact_match", "exact match", 3, False),
    ("train_time_s", "train time", 0, True),
    ("wall_time_s", "wall time", 0, True),
)


def _compare_rows(cmp: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One cell per figure, "this / other (change)", so the table fits a 1200 px window."""
    head = ["Category", "Status (this / other)"]
    head += [f"{label}: this / other (change)" for _key, label, _d, _dur in _COMPARE_COLUMNS]
    rows = []
    for r in cmp.get("rows") or []:
        row = [r["category"], f"{STATE_LABELS.get(r.get('state'), r.get('state') or '–')} / "
               f"{STATE_LABELS.get(r.get('other_state'), r.get('other_state') or '–')}"]  # fmt: skip
        for key, _label, digits, dur in _COMPARE_COLUMNS:
            this, other, change = fmt_change(r.get(key), digits, duration=dur)
            row.append(f"{this} / {other} ({change})")
        rows.append(row)
    return head, rows


# ------------------------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:24px;color:#1f2328;background:#fff}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px}.meta{color:#57606a;margin:0 0 16px}code{font-size:12px}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #d0d7de;border-radius:6px;padding:10px 14px;min-width:120px}
.card .n{font-size:24px;font-weight:600}.card .l{color:#57606a;font-size:12px}
.scroll{overflow-x:auto;max-width:100%}table{border-collapse:collapse;font-size:12.5px;max-width:100%}
th,td{border:1px solid #d0d7de;padding:3px 5px;text-align:left;vertical-align:top}
td{overflow-wrap:anywhere}td.wrap{min-width:120px;max-width:300px}th{background:#f6f8fa}.badge{overflow-wrap:normal}tbody th{overflow-wrap:anywhere}
thead th{vertical-align:bottom}td.path{word-break:break-all;min-width:90px;max-width:200px;font-size:11px}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.pair{white-space:normal;overflow-wrap:normal}
.banner{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:8px 12px;font-weight:600}
.note{color:#57606a;font-size:12px;max-width:1100px}.ci{color:#57606a;font-size:11px}
td.same{background:#f6f8fa;color:#57606a}th.q{max-width:170px}
.confusion{display:flex;flex-wrap:wrap;gap:12px;margin:8px 0}.matrix caption{text-align:left;font-weight:600;font-size:12px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-size:12px;font-weight:600}
pre{background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;padding:8px;overflow-x:auto;font-size:12px;white-space:pre-wrap}
img.plot{max-width:100%;border:1px solid #d0d7de;border-radius:6px;margin:4px 0 12px}
ul.times{margin:8px 0}
"""


def _e(v: Any) -> str:
    return html.escape("–" if v is None else str(v), quote=True)


def _badge(state: str | None) -> str:
    colour = STATE_COLOURS.get(state or "", "#6e7781")
    return (
        f'<span class="badge" style="background:{colour}">{_e(STATE_LABELS.get(state or "", state))}</span>'
    )


def _html_table(head: list[str], rows: list[str], *, table_id: str) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    return (
        f'<div class="scroll"><table id="{table_id}"><thead><tr>{th}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _td(v: Any, cls: str = "") -> str:
    return f'<td class="{cls}">{_e(v)}</td>' if cls else f"<td>{_e(v)}</td>"


def render_html(collected: dict[str, Any], plots: dict[str, bytes]) -> str:
    """report.html, self-contained (plots inline as PNG data, no scripts): the sections of
    `render_markdown`, with a status badge per category."""
    cats = collected.get("categories") or []
    parts = _html_head(collected)
    banner = rq.synthetic_banner(cats)
    if banner:
        parts.append(f'<p class="banner" id="synthetic-banner" role="note">{_e(banner)}</p>')
    parts += _html_totals(collected.get("totals") or {})
    parts += _html_categories(cats, collected.get("output_root"))
    parts += _html_attention(cats)
    parts += _html_plots(plots)
    parts += _html_evaluation(cats)
    parts += _html_joint(cats)
    parts += _html_compare(collected.get("compare"))
    if collected.get("problems"):
        parts.append('<section id="problems"><h2>Problems found while collecting</h2><ul>')
        parts += [f"<li>{_e(p)}</li>" for p in collected["problems"]]
        parts.append("</ul></section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _html_head(collected: dict[str, Any]) -> list[str]:
    return [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>fada-batch report: {_e(collected.get('output_root'))}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Training run report</h1>",
        f'<p class="meta">Output root <code>{_e(collected.get("output_root"))}</code>; collected '
        f"{_e(collected.get('generated'))}; categories from {_e(collected.get('categories_from'))}.</p>",
    ]


def _html_totals(t: dict[str, Any]) -> list[str]:
    by = t.get("by_state") or {}
    cards = [
        ("done", t.get("done", 0)),
        ("failed", t.get("failed", 0)),
        ("stopped unfinished", by.get("stopped", 0)),
        ("running", by.get("running", 0)),
        ("queued", by.get("queued", 0)),
        ("incomplete", by.get("incomplete", 0)),
        ("not started", by.get("not_started", 0)),
        ("awaiting labels", by.get("awaiting_labels", 0)),
    ]
    if by.get("unreadable"):
        cards.append(("unreadable", by["unreadable"]))
    parts = ['<section id="totals"><h2>Totals</h2><div class="cards">']
    parts += [
        f'<div class="card"><div class="n">{_e(n)}</div><div class="l">{_e(label)}</div></div>'
        for label, n in cards
    ]
    parts.append('</div><ul class="times">')
    parts += [f"<li><b>{_e(label)}</b>: {_e(value)}</li>" for label, value in _time_lines(t)]
    parts.append("</ul></section>")
    return parts


def _html_categories(cats: list[dict[str, Any]], root: str | None = None) -> list[str]:
    # paired figures share a column, so the table fits a 1200 px window
    head = ["Category", "Status", "Detail", "Images train / val / test", "QA pairs train / val / test", "Epochs",
            "Steps", "Time train / wall", "Samples /s", "Peak memory", "Final loss train / val",
            "Adapter exact match / token F1", "Re-queues", "SLURM job", "Adapter", "Files"]  # fmt: skip
    rows = [_html_category_row(c, root) for c in cats]
    curves = (
        [
            f"<p>Curves of every category, live while they train: <code>tensorboard --logdir {_e(root)}</code></p>"
        ]
        if any(c.get("tensorboard_dir") for c in cats)
        else []
    )
    return [
        '<section id="categories"><h2>Categories</h2>',
        *curves,
        _html_table(head, rows, table_id="results"),
        "</section>",
    ]


def _html_category_row(c: dict[str, Any], root: str | None = None) -> str:
    adapter = (
        f"{_e(c['adapter_path'])} ({_e(fmt_bytes(c.get('adapter_bytes')))})" if c.get("adapter_path") else "–"
    )
    return (
        f'<tr data-category="{_e(c["category"])}" data-state="{_e(c.get("state"))}">'
        f"<th>{_e(category_label(c))}</th><td>{_badge(c.get('state'))}</td>"
        + _td(c.get("detail", ""), "wrap")
        + _td(fmt_splits(c.get("images")), "num")
        + _td(fmt_splits(c.get("qa_pairs")), "num")
        + _td(c.get("epochs"), "num")
        + _td(_steps(c), "num")
        + _td(f"{fmt_duration(c.get('train_time_s'))} / {fmt_duration(c.get('wall_time_s'))}", "num pair")
        + _td(fmt_num(c.get("samples_per_s"), 1), "num")
        + _td(_memory(c), "num pair")
        + _td(f"{fmt_num(c.get('final_train_loss'))} / {fmt_num(c.get('final_val_loss'))}", "num pair")
        + _td(
            f"{fmt_num(_eval_overall(c).get('exact_match'), 3)} / {fmt_num(_eval_overall(c).get('token_f1'), 3)}",
            "num pair",
        )
        + _td(c.get("requeues"), "num")
        + _td(_slurm(c))
        + f'<td class="path">{adapter}</td>'
        + '<td class="files">'
        + (" · ".join(f'<a href="{_e(quote(t))}">{_e(label)}</a>' for label, t in _links(c, root)) or "–")
        + "</td></tr>"
    )


def _html_attention(cats: list[dict[str, Any]]) -> list[str]:
    attention = _attention(cats)
    if not attention:
        return []
    parts = ['<section id="attention"><h2>Needs attention</h2>']
    for c in attention:
        parts.append(
            f'<div class="attention" data-category="{_e(c["category"])}"><h3>{_e(c["category"])} '
            f"{_badge(c.get('state'))}</h3>"
        )
        if not (c.get("error_tail") and c.get("detail", "") in c["error_tail"]):
            parts.append(f"<p>{_e(c.get('detail', ''))}</p>")
        if c.get("error_tail"):
            parts.append(f"<pre>{_e(c['error_tail'])}</pre>")
        if c.get("resume"):
            parts.append(f'<p>To resume:</p><pre class="resume">{_e(c["resume"])}</pre>')
        parts.append("</div>")
    if len([c for c in attention if c.get("resume")]) > 1:
        every = "\n".join(resume_all(attention))
        parts.append(f'<p>To resume all of them:</p><pre class="resume">{_e(every)}</pre>')
    parts.append("</section>")
    return parts


def _html_plots(plots: dict[str, bytes]) -> list[str]:
    if not plots:
        return []
    parts = ['<section id="plots"><h2>Plots</h2>']
    for name, png in plots.items():
        title = PLOT_TITLES.get(name, name)
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            f"<h3>{_e(title)}</h3>"
            f'<img class="plot" id="plot-{_e(name.removesuffix(".png"))}" alt="{_e(title)}" '
            f'src="data:image/png;base64,{data}">'
        )
    parts.append("</section>")
    return parts


def _html_evaluation(cats: list[dict[str, Any]]) -> list[str]:
    evaluated = [c for c in cats if c.get("eval")]
    if not evaluated:
        return []
    parts = ['<section id="evaluation"><h2>Evaluation</h2>', f'<p class="note">{_e(rq.HEADLINE_NOTE)}</p>']
    for c in evaluated:
        parts.append(f"<h3>{_e(c['category'])}</h3>")
        parts.append(rq.html_headline(c))
        parts.append(rq.html_confusion(c))
        head_cells, cells = _eval_table(c)
        body = ["<tr>" + "".join(_td(x, "num") for x in row) + "</tr>" for row in cells]
        parts.append("<p>Text overlap per question (adapter; base and majority answer as token F1):</p>")
        parts.append(_html_table(head_cells, body, table_id=f"eval-{c['category']}"))
    parts.append("</section>")
    data = rq.data_rows(cats)
    if data:
        body = ["<tr>" + "".join(_td(x) for x in row) + "</tr>" for row in data]
        parts += [
            '<section id="data"><h2>Data and normalisation</h2>',
            _html_table(rq.DATA_HEAD, body, table_id="data-table"),
            "</section>",
        ]
    return parts


def _html_compare(cmp: dict[str, Any] | None) -> list[str]:
    if not cmp:
        return []
    head, crow = _compare_rows(cmp)
    body = [f'<tr data-category="{_e(r[0])}">' + "".join(_td(x) for x in r) + "</tr>" for r in crow]
    return [
        f'<section id="compare"><h2>Compared with <code>{_e(cmp.get("other_root"))}</code></h2>'
        "<p>Change = this run − the other run.</p>",
        _html_table(head, body, table_id="compare-table"),
        *(
            [
                "<p>Per question (adapter):</p>",
                _html_table(
                    rq.COMPARE_HEAD,
                    ["<tr>" + "".join(_td(x) for x in r) + "</tr>" for r in rq.compare_rows(cmp)],
                    table_id="compare-questions",
                ),
            ]
            if cmp.get("questions")
            else []
        ),
        "</section>",
    ]


# ------------------------------------------------------------------------------------ stdout


def category_label(c: dict[str, Any]) -> str:
    """A category as people read it: its name, and its display name when the job gives one
    that differs (`Trans-cerebellum (Transcerebellar Plane)`)."""
    display = c.get("display")
    return f"{c['category']} ({display})" if display and display != c["category"] else str(c["category"])


def text_table(collected: dict[str, Any]) -> str:
    """A short plain-text table for the terminal."""
    lines = [
        f"{'category':<18} {'status':<22} {'steps':>7} {'train loss':>10} {'val loss':>9} {'time':>8}  detail"
    ]
    for c in collected.get("categories") or []:
        detail = (c.get("detail") or "").replace("\n", " ")
        lines.append(
            f"{category_label(c):<18} {STATE_LABELS.get(c.get('state'), c.get('state')):<22} {_steps(c):>7} "
            f"{fmt_num(c.get('final_train_loss')):>10} {fmt_num(c.get('final_val_loss')):>9} "
            f"{fmt_duration(c.get('wall_time_s') or c.get('train_time_s')):>8}  {detail[:80]}"
        )
    t = collected.get("totals") or {}
    lines.append(_totals_line(t))
    lines += [f"{label}: {value}" for label, value in _time_lines(t)]
    # the detail column is cut to fit: in full, with the command, for what needs a person
    for c in collected.get("categories") or []:
        if c.get("state") in ("stopped", "failed", "invalid_data", "incomplete", "unreadable"):
            lines.append(
                f"{c['category']}: {STATE_LABELS.get(c['state'], c['state'])}: {c.get('detail', '')}"
            )
            if c.get("resume"):
                lines.append(f"    to resume: {c['resume']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ write


def write_report(collected: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write report.md, report.html, results.csv, collected.json and report_plots/*.png.

    Returns:
        {"md": path, "html": path, "csv": path, "json": path, "<plot>.png": path, ...}
    """
    out_dir = Path(out_dir)
    plots = make_plots(collected)
    written: dict[str, Path] = {}
    plot_files = {}
    for name in PLOT_TITLES:  # a plot this report has no data for must not linger from the last
        if name not in plots:
            (out_dir / PLOTS_DIR / name).unlink(missing_ok=True)
    for name, png in plots.items():
        path = out_dir / PLOTS_DIR / name
        atomic_write_bytes(path, png)
        written[name] = path
        plot_files[name] = f"{PLOTS_DIR}/{name}"
    for key, name, text in (
        ("md", REPORT_MD, render_markdown(collected, plot_files)),
        ("html", REPORT_HTML, render_html(collected, plots)),
        ("csv", RESULTS_CSV, render_csv(collected)),
    ):
        atomic_write_text(out_dir / name, text)
        written[key] = out_dir / name
    atomic_write_json(out_dir / COLLECTED_JSON, collected)
    written["json"] = out_dir / COLLECTED_JSON
    return dict(sorted(written.items(), key=lambda kv: kv[0] not in ("md", "html", "csv", "json")))
