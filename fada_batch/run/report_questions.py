"""The report's clinical sections: a banner over synthetic runs, one headline table per
category (adapter, base and majority answer on exact match and on each question's own score,
with 95% intervals and McNemar tests), the Q7 confusion matrix, data and normalisation counts,
and the per-question comparison of two runs. Markdown and HTML, from collected.json alone.
"""

from __future__ import annotations

import html
from typing import Any

from fada_batch.evaluation.intervals import N_BOOT
from fada_batch.run.questions import MODELS

ALPHA = 0.05  # a McNemar p at or above it: the test set cannot tell the two models apart
SAME = "≈"  # marks a difference the test set cannot tell apart
FIGURE_LABELS = {
    "exact_match": "exact match",
    "structure_f1": "structure F1",
    "orientation_accuracy": "orientation accuracy",
    "token_f1": "token F1",
    "rouge_l": "ROUGE-L",
    "ga_within_2w": "within ±2 weeks",
    "ga_abs_error_weeks": "mean error (weeks)",
    "tier_accuracy": "quality tier accuracy",
    "sensitivity": "sensitivity (abnormal)",
    "specificity": "specificity",
}
NORMALITY = ("abnormal", "normal", "unparseable")


def _e(v: Any) -> str:
    return html.escape("–" if v is None else str(v), quote=True)


def _num(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "–"


def figure_text(block: dict[str, Any] | None, figure: str) -> tuple[str, str]:
    """("0.833", "0.71–0.92") of one figure of one model's block; "–" where absent."""
    block = block or {}
    digits = 2 if figure == "ga_abs_error_weeks" else 3
    ci = block.get(f"{figure}_ci")
    interval = f"{_num(ci[0], digits)}–{_num(ci[1], digits)}" if isinstance(ci, list) and len(ci) == 2 else ""
    return _num(block.get(figure), digits), interval


def _test_text(entry: dict[str, Any], kind: str, other: str) -> tuple[str, bool]:
    """("p=0.031", distinguishable) of the adapter against `other`; ("–", False) when untested."""
    test = ((entry.get("tests") or {}).get(kind) or {}).get(other)
    if not isinstance(test, dict) or not isinstance(test.get("p"), (int, float)):
        return "–", False
    p = float(test["p"])
    return (f"p={p:.3f}" if p >= 0.001 else "p<0.001"), p < ALPHA


def synthetic_banner(cats: list[dict[str, Any]]) -> str | None:
    """The warning for runs on the tiny test model or the synthetic demo scans; None otherwise."""
    tiny = sorted(c["category"] for c in cats if c.get("tiny_model"))
    demo = sorted(c["category"] for c in cats if c.get("demo_data"))
    if not tiny and not demo:
        return None
    what = []
    if tiny:
        what.append("the tiny test model (a few-layer BLIP-2 built offline, not a real base model)")
    if demo:
        what.append("the synthetic demo scans (drawn shapes and noise, not ultrasound)")
    return (
        "Not a clinical result: these figures come from " + " and ".join(what) + ". They show "
        "that the pipeline runs end to end; they say nothing about how well a model reads real scans."
    )


def question_title(q: str, entry: dict[str, Any]) -> str:
    return f"{q} {entry.get('name')}" if entry.get("name") and q != "overall" else str(entry.get("name") or q)


def headline_rows(c: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per question (then "overall"): title, n, and per model the exact match and the
    question's own figures, each as (value, interval); the McNemar texts against base and majority."""
    block = c.get("questions") if isinstance(c.get("questions"), dict) else {}
    rows = []
    for q, entry in block.items():
        if not isinstance(entry, dict):
            continue
        figures = ["exact_match", *[h for h in entry.get("headline") or [] if isinstance(h, str)]]
        row: dict[str, Any] = {
            "question": q,
            "title": question_title(q, entry),
            "n": (entry.get("adapter") or {}).get("n"),
            "figures": figures,
            "values": {m: {f: figure_text(entry.get(m), f) for f in figures} for m in MODELS},
            "tests": {},
        }
        for other in ("base", "majority"):
            em, em_apart = _test_text(entry, "exact_match", other)
            own, own_apart = _test_text(entry, "own", other)
            row["tests"][other] = {
                "exact": (em, em_apart),
                "own": (own, own_apart) if q != "overall" else None,
            }
        rows.append(row)
    return rows


def _test_cell(t: dict[str, Any]) -> list[str]:
    """Lines of a test cell: 'EM p=0.250 ≈', 'own p=0.010'."""
    lines = []
    for key, label in (("exact", "EM"), ("own", "own")):
        if t.get(key) is None:
            continue
        text, apart = t[key]
        lines.append(f"{label} {text}" + ("" if apart or text == "–" else f" {SAME}"))
    return lines


HEADLINE_HEAD = [
    "Question",
    "n",
    "Figure",
    "Adapter",
    "Base model",
    "Majority answer",
    "Adapter vs base",
    "Adapter vs majority",
]


def md_headline(c: dict[str, Any]) -> list[str]:
    """A Markdown table per category: one line per question and figure."""
    rows = headline_rows(c)
    if not rows:
        return []
    out = ["| " + " | ".join(HEADLINE_HEAD) + " |", "|" + "---|" * len(HEADLINE_HEAD)]
    for r in rows:
        for i, f in enumerate(r["figures"]):
            cells = [
                r["title"] if i == 0 else "",
                str(r["n"] or "–") if i == 0 else "",
                FIGURE_LABELS.get(f, f),
            ]
            for m in MODELS:
                value, ci = r["values"][m][f]
                cells.append(f"{value} ({ci})" if ci else value)
            for other in ("base", "majority"):
                cells.append("; ".join(_test_cell(r["tests"][other])) if i == 0 else "")
            out.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    return [*out, ""]


def html_headline(c: dict[str, Any]) -> str:
    """The headline table of one category as HTML: a value with its interval below it."""
    rows = headline_rows(c)
    body = []
    for r in rows:
        span = len(r["figures"])
        for i, f in enumerate(r["figures"]):
            cells = []
            if i == 0:
                cells.append(f'<th rowspan="{span}" class="q">{_e(r["title"])}</th>')
                cells.append(f'<td rowspan="{span}" class="num">{_e(r["n"])}</td>')
            cells.append(f"<td>{_e(FIGURE_LABELS.get(f, f))}</td>")
            for m in MODELS:
                value, ci = r["values"][m][f]
                cells.append(f'<td class="num">{_e(value)}<br><span class="ci">{_e(ci)}</span></td>')
            if i == 0:
                for other in ("base", "majority"):
                    lines = _test_cell(r["tests"][other])
                    same = any(line.endswith(SAME) for line in lines)
                    cls = ' class="same"' if same else ""
                    cells.append(f'<td rowspan="{span}"{cls}>' + "<br>".join(_e(x) for x in lines) + "</td>")
            body.append(f'<tr data-question="{_e(r["question"])}">' + "".join(cells) + "</tr>")
    th = "".join(f"<th>{_e(h)}</th>" for h in HEADLINE_HEAD)
    return (
        f'<table class="headline" id="headline-{_e(c["category"])}"><thead><tr>{th}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def text_headline(c: dict[str, Any]) -> list[str]:
    """Terminal lines of one category's own-terms figures (exact match is `format_metrics`'s
    table): per question and figure, the adapter with its interval, base and majority, and the
    McNemar test of the adapter against the majority in the question's own terms."""
    out = []
    for r in headline_rows(c):
        own = [f for f in r["figures"] if f != "exact_match"]
        for i, f in enumerate(own):
            value, ci = r["values"]["adapter"][f]
            test = ""
            if i == 0 and r["tests"]["majority"]["own"] is not None:
                text, apart = r["tests"]["majority"]["own"]
                test = f"  vs majority {text}" + ("" if apart or text == "–" else f" {SAME}")
            out.append(
                f"  {r['title'] if i == 0 else '':<28} {FIGURE_LABELS.get(f, f):<22} adapter "
                f"{value}{f' ({ci})' if ci else ''}, base {r['values']['base'][f][0]}, "
                f"majority {r['values']['majority'][f][0]}{test}"
            )
    if out:
        out.insert(
            0, f"  each question on its own terms (95% interval over images; {SAME}: cannot tell apart):"
        )
    return out


HEADLINE_NOTE = (
    f"Each figure with its 95% bootstrap interval over held-out images ({N_BOOT} resamples). The last two "
    f"columns: McNemar's exact test on per-answer exact match (EM) and on per-answer correctness in the "
    f"question's own terms (own); {SAME} marks a difference this test set cannot tell apart (p ≥ 0.05)."
)


def confusion(c: dict[str, Any]) -> dict[str, dict[str, dict[str, int]]]:
    """{model: {reference: {prediction: count}}} of Q7, for the models that have one."""
    entry = (c.get("questions") or {}).get("Q7") if isinstance(c.get("questions"), dict) else None
    if not isinstance(entry, dict):
        return {}
    return {
        m: entry[m]["confusion"] for m in MODELS if isinstance((entry.get(m) or {}).get("confusion"), dict)
    }


def md_confusion(c: dict[str, Any]) -> list[str]:
    matrices = confusion(c)
    if not matrices:
        return []
    out = ["Q7 normal/abnormal: rows are the reference, columns the answer.", ""]
    out.append("| Model | Reference | " + " | ".join(f"answered {p}" for p in NORMALITY) + " |")
    out.append("|" + "---|" * (2 + len(NORMALITY)))
    for m, matrix in matrices.items():
        for ref in NORMALITY:
            counts = matrix.get(ref) or {}
            out.append(f"| {m} | {ref} | " + " | ".join(str(counts.get(p, 0)) for p in NORMALITY) + " |")
    return [*out, ""]


def html_confusion(c: dict[str, Any]) -> str:
    matrices = confusion(c)
    if not matrices:
        return ""
    parts = [f'<div class="confusion" id="q7-confusion-{_e(c["category"])}">']
    for m, matrix in matrices.items():
        head = "".join(f"<th>answered {_e(p)}</th>" for p in NORMALITY)
        body = "".join(
            f"<tr><th>reference {_e(ref)}</th>"
            + "".join(f'<td class="num">{_e((matrix.get(ref) or {}).get(p, 0))}</td>' for p in NORMALITY)
            + "</tr>"
            for ref in NORMALITY
        )
        parts.append(
            f'<table class="matrix" data-model="{_e(m)}"><caption>Q7 {_e(m)}</caption>'
            f"<thead><tr><th></th>{head}</tr></thead><tbody>{body}</tbody></table>"
        )
    parts.append("</div>")
    return "".join(parts)


def data_rows(cats: list[dict[str, Any]]) -> list[list[str]]:
    """Per category with counts: images and QA pairs per split, answers skipped, rows skipped by
    problem, the normalisation level, cells it changed and unique answers before -> after."""
    rows = []
    for c in cats:
        norm = c.get("normalization") if isinstance(c.get("normalization"), dict) else {}
        if not (c.get("images") or norm):
            continue
        split = "/".join(
            str((c.get(k) or {}).get(s, "–")) for k in ("images",) for s in ("train", "val", "test")
        )
        pairs = "/".join(str((c.get("qa_pairs") or {}).get(s, "–")) for s in ("train", "val", "test"))
        warnings = c.get("data_warnings") or {}
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(warnings.items())) or "none"
        changed = norm.get("cells_changed") or {}
        before, after = norm.get("unique_answers_before") or [], norm.get("unique_answers_after") or []
        unique = f"{sum(before)} → {sum(after)}" if before and after else "–"
        rows.append(
            [c["category"], split, pairs, str(c.get("empty_answers_skipped", "–")), skipped,
             str(norm.get("level", "–")), ", ".join(f"{k} {v}" for k, v in changed.items()) or "none", unique]
        )  # fmt: skip
    return rows


DATA_HEAD = ["Category", "Images tr/val/test", "QA pairs tr/val/test", "Empty answers skipped",
             "Rows skipped (why)", "Normalisation", "Cells changed", "Unique answers before → after"]  # fmt: skip


def compare_rows(cmp: dict[str, Any]) -> list[list[str]]:
    """Per category and question: the adapter's exact match and main figure, this / other / change."""
    rows = []
    for r in cmp.get("questions") or []:
        cells = [str(r.get("category")), f"{r.get('question')} {r.get('question_name') or ''}".strip()]
        for key in ("adapter_exact_match", "adapter_metric"):
            c = r.get(key) or {}
            change = c.get("change")
            delta = "–" if change is None else ("+" if change >= 0 else "−") + f"{abs(change):.3f}"
            cells += [_num(c.get("this")), _num(c.get("other")), delta]
        cells.insert(5, FIGURE_LABELS.get(r.get("metric") or "", r.get("metric") or "–"))
        rows.append(cells)
    return rows


COMPARE_HEAD = [
    "Category",
    "Question",
    "EM this",
    "EM other",
    "EM change",
    "Own figure",
    "this",
    "other",
    "change",
]
