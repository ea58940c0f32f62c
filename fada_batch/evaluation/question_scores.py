"""Each question scored on its own terms, beside exact match: what a clinician would count.

| question | parsed to | figures (per model, over the held-out answers) |
|---|---|---|
| Q1 Anatomical Structures | a set of canonical structures (synonyms in `scoring.json`) | structure precision, recall, F1 |
| Q2 Fetal Orientation | one orientation label (cephalic, breech, left, ...) | orientation accuracy |
| Q3, Q4 | free text | token F1 |
| Q5 Gestational Age | weeks (a range gives its midpoint) | within ±1 / ±2 weeks, mean absolute error |
| Q6 Image Quality | a tier: poor < medium < good | tier accuracy, within one tier |
| Q7 Normality | normal / abnormal | sensitivity and specificity for "abnormal", accuracy, confusion matrix |
| Q8 Clinical Recommendations | free text | token F1, ROUGE-L |

Every figure is a ratio of sums over items, ``sum(numerator) / sum(denominator)``: a mean
has denominator 1 per item, sensitivity has the abnormal references as its denominator. So a
bootstrap over images (`intervals`) resamples the same two numbers per item for any figure.

An answer the scorer cannot parse (no known structure, no weeks, no tier, neither normal nor
abnormal) is counted: a reference that cannot be parsed leaves its item out of the
question's own figures (`ref_unparseable`); a prediction that cannot be parsed scores as
wrong (`unparseable`), never as missing.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from fada_batch.data.categories import NUM_QUESTIONS, STANDARD_QUESTIONS
from fada_batch.evaluation.metrics import exact_match, rouge_l, token_f1

TABLE_FILE = Path(__file__).with_name("scoring.json")
# "Anatomical Structures", ..., the titles of the standard questions (before their colon)
QUESTION_NAMES: tuple[str, ...] = tuple(q.split(":")[0].strip() for q in STANDARD_QUESTIONS)
UNPARSEABLE = "unparseable"
NORMALITY_LABELS = ("abnormal", "normal")  # the positive class first
_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class ScoringTables:
    """`scoring.json` as loaded."""

    structures: dict[str, str]  # any spelling (lower case) -> canonical structure
    orientation: list[tuple[str, list[re.Pattern[str]]]]
    quality: list[tuple[str, list[re.Pattern[str]]]]
    quality_order: list[str]
    normality: list[tuple[str, list[re.Pattern[str]]]]


@lru_cache(maxsize=4)
def load_scoring_tables(path: Path = TABLE_FILE) -> ScoringTables:
    """Read the scorers' tables.

    Raises:
        ValueError: the file is not valid JSON or not of the documented shape, naming it.
    """
    try:
        raw = json.loads(Path(path).read_text("utf-8"))
        structures: dict[str, str] = {}
        for canonical, synonyms in raw["structures"].items():
            for name in [canonical, *synonyms]:
                structures[_key(name)] = canonical

        def labels(key: str) -> list[tuple[str, list[re.Pattern[str]]]]:
            return [(str(label), [re.compile(rx, re.I) for rx in rxs]) for label, rxs in raw[key]]

        tables = ScoringTables(
            structures,
            labels("orientation"),
            labels("quality"),
            list(raw["quality_order"]),
            labels("normality"),
        )
        unknown = {label for label, _ in tables.quality} - set(tables.quality_order)
        if unknown:
            raise ValueError(f"quality labels {sorted(unknown)} are missing from quality_order")
    except (OSError, ValueError, KeyError, TypeError, re.error) as exc:
        raise ValueError(
            f"The scoring tables in {path} cannot be read ({type(exc).__name__}: {exc}). Fix the file: "
            "{'structures': {canonical: [synonyms]}, 'orientation' | 'quality' | 'normality': "
            "[[label, [regex, ...]], ...], 'quality_order': [worst, ..., best]}."
        ) from exc
    return tables


def _key(text: str) -> str:
    return _WS.sub(" ", text).strip().casefold()


def first_label(text: str, table: list[tuple[str, list[re.Pattern[str]]]]) -> str | None:
    """The label of the first (label, patterns) pair with a pattern found in `text`, else None.

    Whitespace runs count as one space (raw generated text has them; the patterns do not)."""
    text = _WS.sub(" ", text)
    for label, patterns in table:
        if any(p.search(text) for p in patterns):
            return label
    return None


# ------------------------------------------------------------------------------- parsers

_PARENS = re.compile(r"\([^)]*\)|\[[^\]]*\]")
_SPLIT = re.compile(r"[,;/\n+&]|\band\b|\bwith\b|\bas well as\b", re.I)
_LEADING = re.compile(r"^(?:the|a|an|fetal|foetal|visible|normal|both)\s+", re.I)
_EDGE = re.compile(r"^[\s.:;\-]+|[\s.:;\-]+$")


def parse_structures(text: str, tables: ScoringTables | None = None) -> frozenset[str]:
    """Q1: the answer's structures, each as its canonical name (`scoring.json` "structures").

    Parenthesised remarks are dropped; the rest splits on commas, semicolons, slashes, "+",
    "&", "and", "with"; leading articles and "fetal" go. A term not in the table stays as
    written (lower case), so unknown structures still count, only without synonyms.

    >>> sorted(parse_structures("Stomach bubble and the fetal liver (well seen)"))
    ['liver', 'stomach']
    """
    tables = tables or load_scoring_tables()
    found: set[str] = set()
    for raw in _SPLIT.split(_PARENS.sub(" ", text)):
        term = _key(_EDGE.sub("", raw))
        while (stripped := _LEADING.sub("", term)) != term:
            term = stripped
        if not term:
            continue
        found.add(tables.structures.get(term) or tables.structures.get(term.rstrip("s")) or term)
    return frozenset(found)


_UNIT = r"(?:weeks?|wks?|w)\b"
_NUM = r"(\d{1,2}(?:\.\d+)?)"
_GA_PATTERNS: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], float]], ...] = (
    # 22w3d, 22 weeks 3 days, 22 weeks and 3 days
    (
        re.compile(r"(\d{1,2})\s*w(?:eeks?|ks?)?\s*(?:and\s*)?(\d)\s*d(?:ays?)?\b", re.I),
        lambda m: int(m[1]) + int(m[2]) / 7,
    ),
    (re.compile(r"(\d{1,2})\s*\+\s*(\d)\b", re.I), lambda m: int(m[1]) + int(m[2]) / 7),  # 22+3
    # 20-22 weeks, 20 to 22 weeks: the midpoint
    (
        re.compile(_NUM + r"\s*(?:-|–|—|to)\s*" + _NUM + r"\s*" + _UNIT, re.I),
        lambda m: (float(m[1]) + float(m[2])) / 2,
    ),
    (re.compile(r"(\d{1,2})\s*\+\s*" + _UNIT, re.I), lambda m: float(m[1])),  # 38+ weeks: its bound
    (re.compile(_NUM + r"\s*" + _UNIT, re.I), lambda m: float(m[1])),  # 22 weeks
)
GA_RANGE = (4.0, 45.0)  # weeks a fetus can be: a number outside is no gestational age


def parse_weeks(text: str) -> float | None:
    """Q5: the gestational age an answer gives, in weeks; None when it gives none.

    "22 weeks" -> 22; "22w3d", "22+3", "22 weeks 3 days" -> 22 3/7; "20-22 weeks",
    "20 to 22 weeks" -> 21 (a range counts as its midpoint); "38+ weeks" -> 38. A number
    needs a week unit (or the "+days" form), so "45 mm" is no age; trimesters ("second
    trimester") and refusals ("cannot be estimated") are unparseable, as is a value outside
    4-45 weeks.

    >>> parse_weeks("Approximately 20 -25weeks")
    22.5
    """
    for pattern, value in _GA_PATTERNS:
        m = pattern.search(text)
        if m:
            weeks = value(m)
            return weeks if GA_RANGE[0] <= weeks <= GA_RANGE[1] else None
    return None


# ------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Scored:
    """One answer scored on its question's terms."""

    values: dict[str, tuple[float, float]]  # figure -> (numerator, denominator) for this item
    correct: bool  # right on the question's terms (the item-level outcome the paired test uses)
    ref_label: str | None = None  # the parsed reference (None: unparseable)
    pred_label: str | None = None  # the parsed prediction (None: unparseable)


def _mean(value: float, counts: bool = True) -> tuple[float, float]:
    return (value, 1.0) if counts else (0.0, 0.0)


def score_structures(pred: str, ref: str) -> Scored:
    """Q1: precision, recall and F1 of the predicted structure set against the reference's."""
    p, r = parse_structures(pred), parse_structures(ref)
    hit = len(p & r)
    precision = hit / len(p) if p else 0.0
    recall = hit / len(r) if r else 0.0
    f1 = 2 * hit / (len(p) + len(r)) if hit else 0.0
    ok = bool(r)
    values = {
        "structure_precision": _mean(precision, ok),
        "structure_recall": _mean(recall, ok),
        "structure_f1": _mean(f1, ok),
    }
    return Scored(values, ok and p == r, ", ".join(sorted(r)) or None, ", ".join(sorted(p)) or None)


def _label_scorer(table: str, figure: str) -> Callable[[str, str], Scored]:
    def score(pred: str, ref: str) -> Scored:
        tables = load_scoring_tables()
        p, r = first_label(pred, getattr(tables, table)), first_label(ref, getattr(tables, table))
        ok = r is not None
        return Scored({figure: _mean(float(p == r), ok)}, ok and p == r, r, p)

    score.__doc__ = f"Q: the `{table}` label of both answers; {figure} = share of equal labels."
    return score


score_orientation = _label_scorer("orientation", "orientation_accuracy")


def score_gestational_age(pred: str, ref: str) -> Scored:
    """Q5: absolute error in weeks, and whether it is within 1 and within 2 weeks."""
    p, r = parse_weeks(pred), parse_weeks(ref)
    ok = r is not None
    err = abs(p - r) if p is not None and r is not None else math.inf
    values = {
        "ga_within_1w": _mean(float(err <= 1.0), ok),
        "ga_within_2w": _mean(float(err <= 2.0), ok),
        "ga_abs_error_weeks": _mean(err, ok and p is not None),
    }
    fmt = "{:g}".format
    return Scored(
        values,
        ok and err <= 2.0,
        fmt(round(r, 2)) if ok else None,
        fmt(round(p, 2)) if p is not None else None,
    )


def score_quality(pred: str, ref: str) -> Scored:
    """Q6: the quality tier of both answers; exact tier and within one tier (adjacent)."""
    tables = load_scoring_tables()
    p, r = first_label(pred, tables.quality), first_label(ref, tables.quality)
    ok = r is not None
    rank = tables.quality_order.index
    near = p is not None and r is not None and abs(rank(p) - rank(r)) <= 1
    values = {"tier_accuracy": _mean(float(p == r), ok), "tier_within_one": _mean(float(near), ok)}
    return Scored(values, ok and p == r, r, p)


def score_normality(pred: str, ref: str) -> Scored:
    """Q7: normal/abnormal; sensitivity and specificity for "abnormal" as numerator/denominator.

    Sensitivity: of the abnormal references, those predicted abnormal. Specificity: of the
    normal references, those predicted normal. An unparseable prediction counts against both.
    """
    tables = load_scoring_tables()
    p, r = first_label(pred, tables.normality), first_label(ref, tables.normality)
    values = {
        "normality_accuracy": _mean(float(p == r), r is not None),
        "sensitivity": (float(p == "abnormal"), 1.0) if r == "abnormal" else (0.0, 0.0),
        "specificity": (float(p == "normal"), 1.0) if r == "normal" else (0.0, 0.0),
    }
    return Scored(values, r is not None and p == r, r, p)


def score_free_text(pred: str, ref: str) -> Scored:
    """Q3, Q4, Q8: token F1 and ROUGE-L (`metrics`); right when exactly equal."""
    values = {"token_f1": _mean(token_f1(pred, ref)), "rouge_l": _mean(rouge_l(pred, ref))}
    return Scored(values, exact_match(pred, ref) == 1.0, ref, pred)


@dataclass(frozen=True)
class QuestionScorer:
    """How one question is scored: the function, and the figures its report headlines."""

    score: Callable[[str, str], Scored]
    headline: tuple[str, ...]  # the question's own figures, first = its main score
    parsed: bool = True  # False: free text (nothing to parse, no unparseable count)
    extra: tuple[str, ...] = field(default=())


SCORERS: dict[int, QuestionScorer] = {
    0: QuestionScorer(score_structures, ("structure_f1",), extra=("structure_precision", "structure_recall")),
    1: QuestionScorer(score_orientation, ("orientation_accuracy",)),
    2: QuestionScorer(score_free_text, ("token_f1",), parsed=False),
    3: QuestionScorer(score_free_text, ("token_f1",), parsed=False),
    4: QuestionScorer(score_gestational_age, ("ga_within_2w", "ga_abs_error_weeks"), extra=("ga_within_1w",)),
    5: QuestionScorer(score_quality, ("tier_accuracy",), extra=("tier_within_one",)),
    6: QuestionScorer(score_normality, ("sensitivity", "specificity"), extra=("normality_accuracy",)),
    7: QuestionScorer(score_free_text, ("rouge_l",), extra=("token_f1",), parsed=False),
}
assert sorted(SCORERS) == list(range(NUM_QUESTIONS))


def score_items(question: int, preds: Sequence[str], refs: Sequence[str]) -> list[Scored]:
    """Every (prediction, reference) pair of one question, scored on its terms, plus exact match."""
    scorer = SCORERS[question].score
    out = []
    for pred, ref in zip(preds, refs, strict=True):
        s = scorer(pred, ref)
        out.append(
            Scored(
                {"exact_match": _mean(exact_match(pred, ref)), **s.values},
                s.correct,
                s.ref_label,
                s.pred_label,
            )
        )
    return out


def ratio(items: Sequence[Scored], figure: str) -> float | None:
    """sum(numerator) / sum(denominator) of one figure; None when no item counts (0 / 0)."""
    num = math.fsum(s.values[figure][0] for s in items)
    den = math.fsum(s.values[figure][1] for s in items)
    return num / den if den else None


def confusion(items: Sequence[Scored], labels: Sequence[str] = NORMALITY_LABELS) -> dict[str, dict[str, int]]:
    """{reference label: {predicted label: count}}, with "unparseable" for answers of no label."""
    counts = Counter((s.ref_label or UNPARSEABLE, s.pred_label or UNPARSEABLE) for s in items)
    names = [*labels, UNPARSEABLE]
    return {r: {p: counts[(r, p)] for p in names} for r in names}


def question_block(question: int, items: Sequence[Scored]) -> dict[str, Any]:
    """The figures of one model on one question: n, exact match, the question's own figures,
    the unparseable counts and (Q7) the confusion matrix."""
    spec = SCORERS[question]
    block: dict[str, Any] = {"n": len(items), "exact_match": ratio(items, "exact_match")}
    for figure in (*spec.headline, *spec.extra):
        block[figure] = ratio(items, figure)
    if spec.parsed:
        block["unparseable"] = sum(1 for s in items if s.ref_label is not None and s.pred_label is None)
        block["ref_unparseable"] = sum(1 for s in items if s.ref_label is None)
    if question == 6:
        block["confusion"] = confusion(items)
    return block
