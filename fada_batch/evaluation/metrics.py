"""Answer-level text metrics for the VQA evaluation, and their aggregation per question.

Every metric first brings both texts to the comparison form used for the training targets,
`text.normalize_for_match` (whitespace collapsed, one trailing period dropped, case-folded),
so a prediction is never penalised for differences that training itself erased.

Token-level metrics work on `tokenize`: the normalised text split on whitespace, with
punctuation stripped from each token's edges. All scores lie in [0, 1]:

- `exact_match`: 1.0 when the normalised strings are equal, else 0.0.
- `token_f1`: SQuAD bag-of-tokens F1 (Rajpurkar et al., 2016, official evaluation script).
- `bleu1`: BLEU with unigrams only and one reference (Papineni et al., 2002).
- `rouge_l`: ROUGE-L longest-common-subsequence F-measure (Lin, 2004), beta = 1.

`majority_answers` gives the per-question majority baseline from the training answers and
`aggregate` turns scored rows into the JSON block written to the evaluation summary.
"""

from __future__ import annotations

import math
import operator
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from fada_batch.data.categories import NUM_QUESTIONS
from fada_batch.text import clean_answer, normalize_for_match, plural

# The keys of `score_pair`, in the order the summary lists them.
METRIC_NAMES: tuple[str, ...] = ("exact_match", "token_f1", "bleu1", "rouge_l")


def _is_punctuation(char: str) -> bool:
    """True for Unicode punctuation: general categories Pc, Pd, Ps, Pe, Pi, Pf and Po."""
    return unicodedata.category(char).startswith("P")


def _strip_edge_punctuation(token: str) -> str:
    start, end = 0, len(token)
    while start < end and _is_punctuation(token[start]):
        start += 1
    while end > start and _is_punctuation(token[end - 1]):
        end -= 1
    return token[start:end]


def tokenize(text: str) -> list[str]:
    """Split an answer into the word tokens the token-level metrics compare.

    Exactly: take `normalize_for_match(text)`, split it on runs of whitespace (`str.split()`),
    strip every leading and trailing character whose Unicode general category is punctuation
    (P*: connector, dash, open, close, initial quote, final quote, other; this covers
    ``. , ; : ! ? ' " ( ) [ ] { } - _ / % # & * @`` and typographic quotes and dashes),
    and drop tokens that end up empty. Punctuation inside a token is kept, so measurements
    and compounds survive: ``4.5``, ``12-14``, ``well-defined``, ``fetus's``. Symbols that
    are not punctuation (``+ < = > °``) are kept everywhere.

    >>> tokenize("BPD (biparietal diameter): 4.5 cm, well-defined.")
    ['bpd', 'biparietal', 'diameter', '4.5', 'cm', 'well-defined']
    """
    tokens = (_strip_edge_punctuation(raw) for raw in normalize_for_match(text).split())
    return [token for token in tokens if token]


def exact_match(pred: str, ref: str) -> float:
    """1.0 if ``normalize_for_match(pred) == normalize_for_match(ref)``, else 0.0.

    Compares whole normalised strings, not tokens: case, runs of whitespace and one trailing
    period do not matter, but other punctuation does (``"left, side"`` != ``"left side"``).

    >>> exact_match("Cephalic presentation.", "cephalic  presentation")
    1.0
    """
    return 1.0 if normalize_for_match(pred) == normalize_for_match(ref) else 0.0


def _f_beta1(overlap: int, pred_len: int, ref_len: int) -> float:
    """Harmonic mean of precision o/c and recall o/r, written as 2o / (c + r).

    2PR / (P + R) with P = o/c and R = o/r simplifies to 2o / (c + r); the integer form is
    exact and symmetric in (c, r), so swapping prediction and reference gives the same float.
    """
    if overlap == 0:
        return 0.0
    return 2 * overlap / (pred_len + ref_len)


def token_f1(pred: str, ref: str) -> float:
    """SQuAD-style bag-of-tokens F1 between prediction and reference.

    With token multisets P (prediction) and R (reference), overlap o = |P ∩ R| counts each
    token min(count in P, count in R) times. precision = o / |P|, recall = o / |R|,
    F1 = 2 * precision * recall / (precision + recall) = 2o / (|P| + |R|); 0.0 when o = 0.
    Both empty (after `tokenize`) -> 1.0; exactly one empty -> 0.0.

    >>> token_f1("the fetus lies left", "fetus lies on the left side")  # 2*4 / (4 + 6)
    0.8
    """
    pred_tokens, ref_tokens = tokenize(pred), tokenize(ref)
    if not pred_tokens or not ref_tokens:
        return 1.0 if pred_tokens == ref_tokens else 0.0
    overlap = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    return _f_beta1(overlap, len(pred_tokens), len(ref_tokens))


def bleu1(pred: str, ref: str) -> float:
    """Sentence BLEU-1 against a single reference: clipped unigram precision times brevity penalty.

    With candidate length c and reference length r (in `tokenize` tokens):
    p1 = sum over candidate tokens w of min(count_pred(w), count_ref(w)) / c, and
    BP = 1 if c >= r else exp(1 - r / c). BLEU-1 = BP * p1. No smoothing is applied.
    An empty prediction (c = 0) scores 0.0, whatever the reference; a non-empty prediction
    against an empty reference has no clipped matches and also scores 0.0.

    >>> bleu1("the the the", "the cat")  # "the" clipped to 1 match: 1/3, BP = 1 as c >= r
    0.3333333333333333
    """
    pred_tokens, ref_tokens = tokenize(pred), tokenize(ref)
    c, r = len(pred_tokens), len(ref_tokens)
    if c == 0:
        return 0.0
    clipped = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    precision = clipped / c
    brevity_penalty = 1.0 if c >= r else math.exp(1.0 - r / c)
    return brevity_penalty * precision


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists, O(len(a) * len(b))."""
    if len(b) > len(a):
        a, b = b, a  # keep the rolling row as short as the shorter sequence
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0] * (len(b) + 1)
        for j, token_b in enumerate(b, start=1):
            if token_a == token_b:
                current[j] = previous[j - 1] + 1
            else:
                current[j] = max(previous[j], current[j - 1])
        previous = current
    return previous[-1]


def rouge_l(pred: str, ref: str, *, beta: float = 1.0) -> float:
    """ROUGE-L: F-measure of the longest common subsequence (LCS) of the token lists.

    With l = LCS length, c = prediction length and r = reference length (tokens need not be
    contiguous, only in order): P = l / c, R = l / r and
    F = (1 + beta^2) * P * R / (R + beta^2 * P) = (1 + beta^2) * l / (c + beta^2 * r).
    The default beta = 1 is the plain harmonic mean 2l / (c + r), symmetric in prediction
    and reference; note that coco-caption's ROUGE-L uses beta = 1.2 (recall-weighted), so
    its numbers are not directly comparable. Both empty -> 1.0; exactly one empty -> 0.0.

    >>> rouge_l("the fetus is on the left", "fetus lies on left side")  # l=3: 2*3 / (6 + 5)
    0.5454545454545454
    """
    if beta <= 0:
        raise ValueError(f"rouge_l beta must be positive, got {beta!r}; beta = 1 weighs P and R equally.")
    pred_tokens, ref_tokens = tokenize(pred), tokenize(ref)
    if not pred_tokens or not ref_tokens:
        return 1.0 if pred_tokens == ref_tokens else 0.0
    lcs = _lcs_length(pred_tokens, ref_tokens)
    if beta == 1.0:
        return _f_beta1(lcs, len(pred_tokens), len(ref_tokens))
    if lcs == 0:
        return 0.0
    b2 = beta * beta
    return (1 + b2) * lcs / (len(pred_tokens) + b2 * len(ref_tokens))


def score_pair(pred: str, ref: str) -> dict[str, float]:
    """All metrics for one prediction/reference pair, keyed by `METRIC_NAMES`."""
    return {
        "exact_match": exact_match(pred, ref),
        "token_f1": token_f1(pred, ref),
        "bleu1": bleu1(pred, ref),
        "rouge_l": rouge_l(pred, ref),
    }


def question_label(question: int) -> str:
    """The summary key for a 0-based question index: 0 -> "Q1", ..., 7 -> "Q8"."""
    return f"Q{question + 1}"


def _question_index(value: object) -> int:
    """Validate a 0-based question index; accepts any integer type (including numpy's)."""
    try:
        index = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        index = None
    if index is None or isinstance(value, bool) or not 0 <= index < NUM_QUESTIONS:
        raise ValueError(
            f"question index {value!r} is not valid: expected an integer 0..{NUM_QUESTIONS - 1} "
            f"(0-based, so Q1 is 0 and Q{NUM_QUESTIONS} is {NUM_QUESTIONS - 1})."
        )
    return index


def majority_answers(train_pairs: Iterable[tuple[int, str]]) -> dict[int, str]:
    """The most frequent training answer for each question: the majority-class baseline.

    Answers are grouped by `normalize_for_match`, so "Cephalic." and "cephalic" count as one.
    The winning group has the highest count; ties go to the lexicographically smallest
    normalised form. The returned text is the group's most common `clean_answer` spelling
    (ties again to the lexicographically smallest, by code point, so "Left" before "left").
    The result does not depend on the order of `train_pairs`. Answers that are empty after
    cleaning are skipped, since an empty prediction is no baseline; a question with no
    non-empty answer is absent from the result.

    Args:
        train_pairs: (question index 0..7, answer text) for every training answer.

    Returns:
        {question index: answer}, sorted by question index.

    Raises:
        ValueError: on a question index outside 0..7.
    """
    spellings: dict[int, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    for question, answer in train_pairs:
        index = _question_index(question)
        cleaned = clean_answer(answer)
        if cleaned:
            spellings[index][normalize_for_match(answer)][cleaned] += 1

    majority: dict[int, str] = {}
    for index in sorted(spellings):
        groups = spellings[index]
        # max count first, then the smallest key: sort by (-count, key) and take the first.
        best_key = min(groups, key=lambda key: (-sum(groups[key].values()), key))
        counts = groups[best_key]
        majority[index] = min(counts, key=lambda spelling: (-counts[spelling], spelling))
    return majority


class EvalRow(Protocol):
    """One evaluated answer; `aggregate` also accepts a mapping with these keys."""

    question: int  # 0-based question index, 0..7
    reference: str
    prediction: str


_ROW_FIELDS = ("question", "reference", "prediction")


_MISSING = object()


def _row_field(row: Mapping[str, object] | EvalRow, name: str) -> object:
    if isinstance(row, Mapping):
        return row.get(name, _MISSING)
    return getattr(row, name, _MISSING)


def _mean_block(scores: list[dict[str, float]]) -> dict[str, float | int]:
    block: dict[str, float | int] = {"n": len(scores)}
    for name in METRIC_NAMES:
        block[name] = math.fsum(s[name] for s in scores) / len(scores)
    return block


def aggregate(rows: Iterable[Mapping[str, object] | EvalRow]) -> dict[str, dict[str, float | int]]:
    """Mean of every metric per question and over all rows.

    Each row is scored with `score_pair(prediction, reference)`. Per question q the block is
    {"n": rows of q, metric: mean over those rows}; "overall" is the micro-average, i.e. the
    mean over all rows (questions weigh by their row counts, not equally).

    Args:
        rows: dicts or objects with `question` (0-based index 0..7), `reference` and
            `prediction` (strings).

    Returns:
        {"Q1": {...}, ..., "overall": {...}}, plain dicts of str -> int/float, ready for
        `json.dump`. Only questions that have rows appear, in question order; "overall" is last.

    Raises:
        ValueError: if there are no rows, or listing every row with a missing field, a question
            index outside 0..7, or a non-string reference/prediction.
    """
    per_question: dict[int, list[dict[str, float]]] = defaultdict(list)
    problems: list[str] = []
    n_rows = 0
    for i, row in enumerate(rows):
        n_rows += 1
        question, reference, prediction = (_row_field(row, name) for name in _ROW_FIELDS)
        missing = [
            name
            for name, value in zip(_ROW_FIELDS, (question, reference, prediction), strict=True)
            if value is _MISSING
        ]
        if missing:
            problems.append(f"row {i}: missing {', '.join(missing)}; each row needs {', '.join(_ROW_FIELDS)}")
            continue
        try:
            index = _question_index(question)
        except ValueError as err:
            problems.append(f"row {i}: {err}")
            continue
        bad = [
            f"{name} is {type(value).__name__}, not str"
            for name, value in (("reference", reference), ("prediction", prediction))
            if not isinstance(value, str)
        ]
        if bad:
            problems.append(f"row {i}: " + "; ".join(bad))
            continue
        per_question[index].append(score_pair(prediction, reference))  # type: ignore[arg-type]

    if problems:
        raise ValueError(
            f"cannot aggregate {len(problems)} of {plural(n_rows, 'row')}:\n  " + "\n  ".join(problems)
        )
    if n_rows == 0:
        raise ValueError("cannot aggregate an empty set of rows: there is nothing to average.")

    result = {question_label(q): _mean_block(per_question[q]) for q in sorted(per_question)}
    result["overall"] = _mean_block([s for q in sorted(per_question) for s in per_question[q]])
    return result
