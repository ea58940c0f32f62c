"""The per-question clinical block of metrics.json: each model scored on each question's own
terms (`question_scores`), with 95% bootstrap intervals over images and McNemar tests
(`intervals`).

    block = clinical_scores(questions, images, refs, {"adapter": [...], "base": [...], ...})
    block["Q7"]["adapter"]["sensitivity"], block["Q7"]["adapter"]["sensitivity_ci"]
    block["Q7"]["tests"]["base"]["exact_match"]["p"]

Per question "Qn": its name, its headline figures, one block per model (n, exact match, the
question's own figures, each with a `_ci` interval, unparseable counts, Q7's confusion
matrix), and "tests": the first model (the adapter) against each other model, McNemar on
per-item exact match and on per-item correctness in the question's own terms. "overall":
exact match over all answers per model, with its interval and tests.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from fada_batch.evaluation.intervals import N_BOOT, ImageBootstrap, mcnemar_exact
from fada_batch.evaluation.metrics import question_label
from fada_batch.evaluation.question_scores import QUESTION_NAMES, SCORERS, Scored, question_block, score_items


def score_by_question(
    questions: Sequence[int], refs: Sequence[str], preds: Sequence[str]
) -> dict[int, tuple[list[int], list[Scored]]]:
    """{question: (row positions, scored items)} of one model's predictions."""
    rows: dict[int, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        rows[q].append(i)
    return {
        q: (idx, score_items(q, [preds[i] for i in idx], [refs[i] for i in idx]))
        for q, idx in sorted(rows.items())
    }


def _with_intervals(
    block: dict[str, Any], items: list[Scored], images: list[str], boot: ImageBootstrap
) -> dict[str, Any]:
    """`block` with a `{figure}_ci` [low, high] beside every figure it holds (None: undefined)."""
    out: dict[str, Any] = {}
    for key, value in block.items():
        out[key] = value
        if items and key in items[0].values:
            num = [s.values[key][0] for s in items]
            den = [s.values[key][1] for s in items]
            out[f"{key}_ci"] = boot.interval(images, num, den) if value is not None else None
    return out


def _tests(outcomes: Mapping[str, Sequence[bool]], first: str) -> dict[str, Any]:
    """McNemar of model `first` against each other model on the same items."""
    return {other: mcnemar_exact(outcomes[first], o) for other, o in outcomes.items() if other != first}


def clinical_scores(
    questions: Sequence[int],
    images: Sequence[str],
    refs: Sequence[str],
    preds: Mapping[str, Sequence[str]],
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, Any]:
    """Per question: name, headline figures, each model's figures with intervals, and tests.

    Args:
        questions: 0-based question index of each held-out answer.
        images: the image each answer is about (the unit the bootstrap resamples).
        refs: the reference answers, in the same order.
        preds: model name -> its (normalised) predictions, in the same order; the first model
            is tested against each of the others.
        n_boot, seed: bootstrap resamples and their seed.
    """
    boot = ImageBootstrap(images, n_boot=n_boot, seed=seed)
    scored = {model: score_by_question(questions, refs, p) for model, p in preds.items()}
    first = next(iter(preds))
    out: dict[str, Any] = {}
    for q in sorted(set(questions)):
        entry: dict[str, Any] = {"name": QUESTION_NAMES[q], "headline": list(SCORERS[q].headline)}
        for model, by_q in scored.items():
            idx, items = by_q[q]
            entry[model] = _with_intervals(question_block(q, items), items, [images[i] for i in idx], boot)
        entry["tests"] = {
            "exact_match": _tests(
                {m: [s.values["exact_match"][0] == 1.0 for s in by_q[q][1]] for m, by_q in scored.items()},
                first,
            ),
            "own": _tests({m: [s.correct for s in by_q[q][1]] for m, by_q in scored.items()}, first),
        }
        out[question_label(q)] = entry
    out["overall"] = _overall(scored, images, boot, first)
    return out


def _overall(
    scored: Mapping[str, dict[int, tuple[list[int], list[Scored]]]],
    images: Sequence[str],
    boot: ImageBootstrap,
    first: str,
) -> dict[str, Any]:
    """Exact match over every answer, per model, with its interval; McNemar over all answers."""
    out: dict[str, Any] = {"name": "All questions", "headline": []}
    right: dict[str, list[bool]] = {}
    for model, by_q in scored.items():
        pairs = [(i, s) for idx, items in by_q.values() for i, s in zip(idx, items, strict=True)]
        right[model] = [s.values["exact_match"][0] == 1.0 for _, s in pairs]
        em = sum(right[model]) / len(pairs) if pairs else None
        ci = boot.interval(
            [images[i] for i, _ in pairs], [float(r) for r in right[model]], [1.0] * len(pairs)
        )
        out[model] = {"n": len(pairs), "exact_match": em, "exact_match_ci": ci}
    out["tests"] = {"exact_match": _tests(right, first)}
    return out
