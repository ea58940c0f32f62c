"""One row per category and question: the figures of eval/metrics.json's "questions" block,
flat, for results.csv, collected.json's "per_question" and the comparison of two runs.

Per row: exact match of adapter, base and majority answer with their 95% intervals; the
question's own main figure ("metric": structure_f1, ga_within_2w, sensitivity, ...) and its
second one ("metric_2": specificity, mean error in weeks) likewise; unparseable answers; the
McNemar p of the adapter against base and majority (on exact match and on the question's own
per-item correctness); and the generation settings the answers were made with.
"""

from __future__ import annotations

from typing import Any

MODELS = ("adapter", "base", "majority")
GENERATION = ("num_beams", "no_repeat_ngram_size", "repetition_penalty", "max_new_tokens")


def _figure_columns(prefix: str) -> list[str]:
    return [f"{m}_{prefix}{end}" for m in MODELS for end in ("", "_low", "_high")]


QUESTION_COLUMNS: tuple[str, ...] = (
    "category", "question", "question_name", "n",
    *_figure_columns("exact_match"),
    "metric", *_figure_columns("metric"),
    "metric_2", *_figure_columns("metric_2"),
    "adapter_unparseable", "base_unparseable", "ref_unparseable",
    "p_exact_vs_base", "p_exact_vs_majority", "p_own_vs_base", "p_own_vs_majority",
    *GENERATION,
)  # fmt: skip


def _ci(block: dict[str, Any], figure: str) -> tuple[Any, Any]:
    ci = block.get(f"{figure}_ci")
    return (ci[0], ci[1]) if isinstance(ci, list) and len(ci) == 2 else (None, None)


def _put(row: dict[str, Any], entry: dict[str, Any], figure: str | None, column: str) -> None:
    for m in MODELS:
        block = entry.get(m) if isinstance(entry.get(m), dict) else {}
        value = block.get(figure) if figure else None
        row[f"{m}_{column}"] = value if isinstance(value, (int, float)) else None
        low, high = _ci(block, figure) if figure else (None, None)
        row[f"{m}_{column}_low"], row[f"{m}_{column}_high"] = low, high


def _p(entry: dict[str, Any], kind: str, other: str) -> Any:
    test = ((entry.get("tests") or {}).get(kind) or {}).get(other)
    return test.get("p") if isinstance(test, dict) else None


def category_question_rows(c: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of one collected category (none when it has no per-question block)."""
    block = c.get("questions")
    if not isinstance(block, dict):
        return []
    rows = []
    for q, entry in block.items():
        if not isinstance(entry, dict):
            continue
        headline = [h for h in entry.get("headline") or [] if isinstance(h, str)]
        adapter = entry.get("adapter") if isinstance(entry.get("adapter"), dict) else {}
        row: dict[str, Any] = {
            "category": c.get("category"),
            "question": q,
            "question_name": entry.get("name"),
        }
        row["n"] = adapter.get("n")
        _put(row, entry, "exact_match", "exact_match")
        for i, column in enumerate(("metric", "metric_2")):
            figure = headline[i] if i < len(headline) else None
            row[column] = figure
            _put(row, entry, figure, column)
        for m in ("adapter", "base"):
            block_m = entry.get(m) if isinstance(entry.get(m), dict) else {}
            row[f"{m}_unparseable"] = block_m.get("unparseable")
        row["ref_unparseable"] = adapter.get("ref_unparseable")
        for kind in ("exact", "own"):
            for other in ("base", "majority"):
                row[f"p_{kind}_vs_{other}"] = _p(entry, "exact_match" if kind == "exact" else "own", other)
        gen = c.get("generation") if isinstance(c.get("generation"), dict) else {}
        row.update({k: gen.get(k) for k in GENERATION})
        rows.append(row)
    return rows


def question_rows(categories: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every category's rows, in category order, Q1..Q8 then "overall"."""
    return [row for c in categories for row in category_question_rows(c)]


def compare_questions(this: list[dict[str, Any]], other: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (category, question) in either run: the adapter's exact match and main figure in
    this run and the other, and the change (this - other; None where one run lacks it)."""
    theirs = {(r["category"], r["question"]): r for r in other}
    mine = {(r["category"], r["question"]): r for r in this}
    keys = list(mine) + [k for k in theirs if k not in mine]
    out = []
    for key in keys:
        a, b = mine.get(key, {}), theirs.get(key, {})
        row: dict[str, Any] = {
            "category": key[0],
            "question": key[1],
            "question_name": a.get("question_name") or b.get("question_name"),
            "metric": a.get("metric") or b.get("metric"),
        }
        for column in ("adapter_exact_match", "adapter_metric"):
            new, old = a.get(column), b.get(column)
            change = round(new - old, 6) if new is not None and old is not None else None
            row[column] = {"this": new, "other": old, "change": change}
        out.append(row)
    return out
