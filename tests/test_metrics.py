"""Metrics against values worked out by hand, plus a few properties checked with hypothesis.

Every expected number below is derived in the comment above it from token counts; none is
computed with the function under test.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fada_batch.evaluation.metrics import (
    METRIC_NAMES,
    aggregate,
    bleu1,
    exact_match,
    majority_answers,
    rouge_l,
    score_pair,
    token_f1,
    tokenize,
)

# --- tokenize -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("Fetus lies on the LEFT side.", ["fetus", "lies", "on", "the", "left", "side"]),
        # edge punctuation goes, inner punctuation (decimal point, hyphen) stays
        (
            "BPD (biparietal diameter): 4.5 cm, normal.",
            ["bpd", "biparietal", "diameter", "4.5", "cm", "normal"],
        ),
        ("  well-defined\n\n12-14  weeks ", ["well-defined", "12-14", "weeks"]),
        # a token made only of punctuation disappears; typographic quotes are punctuation
        ("“cephalic” -- breech", ["cephalic", "breech"]),
        # symbols that are not punctuation are kept
        ("HC > 5th centile", ["hc", ">", "5th", "centile"]),
        ("", []),
        ("...", []),
        (".", []),
    ],
)
def test_tokenize(text: str, tokens: list[str]) -> None:
    assert tokenize(text) == tokens


# --- exact match ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        # case, runs of whitespace and one trailing period are normalised away
        ("Fetus lies on the left side.", "fetus lies  on the LEFT side", 1.0),
        ("  Cephalic\n", "cephalic.", 1.0),
        ("CEPHALIC", "cephalic", 1.0),
        ("", "", 1.0),
        ("cephalic", "breech", 0.0),
        # exact match compares whole strings: inner punctuation still counts
        ("left, side", "left side", 0.0),
        ("left side", "left side side", 0.0),
    ],
)
def test_exact_match(pred: str, ref: str, expected: float) -> None:
    assert exact_match(pred, ref) == expected


# --- token F1 -------------------------------------------------------------------------------


def test_token_f1_partial_overlap() -> None:
    # pred: the fetus lies left (4); ref: fetus lies on the left side (6)
    # overlap {the, fetus, lies, left} = 4; P = 4/4 = 1, R = 4/6 = 2/3
    # F1 = 2 * 1 * 2/3 / (1 + 2/3) = (4/3) / (5/3) = 4/5
    assert token_f1("the fetus lies left", "fetus lies on the left side") == pytest.approx(4 / 5)


def test_token_f1_repeated_tokens() -> None:
    # pred: left x2, side x1 (3 tokens); ref: left x1, side x3 (4 tokens)
    # overlap = min(2, 1) + min(1, 3) = 2; P = 2/3, R = 2/4 = 1/2
    # F1 = 2 * (2/3)(1/2) / (2/3 + 1/2) = (2/3) / (7/6) = 4/7
    assert token_f1("left left side", "left side side side") == pytest.approx(4 / 7)


def test_token_f1_ignores_order_and_normalisation() -> None:
    # same bag {left, side, fetus} after case-folding and edge punctuation: P = R = 1
    assert token_f1("Left side, fetus.", "fetus left side") == 1.0


def test_token_f1_no_overlap_and_empties() -> None:
    assert token_f1("cephalic", "breech") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1(".", "  ") == 1.0  # both have no tokens
    assert token_f1("", "cephalic") == 0.0
    assert token_f1("cephalic", "") == 0.0


# --- BLEU-1 ---------------------------------------------------------------------------------


def test_bleu1_clips_repeated_unigrams() -> None:
    # pred: the the the (c = 3); ref: the cat (r = 2)
    # "the" appears 3 times but only once in ref -> 1 clipped match; p1 = 1/3
    # c >= r, so BP = 1; BLEU-1 = 1/3
    assert bleu1("the the the", "the cat") == pytest.approx(1 / 3)


def test_bleu1_brevity_penalty() -> None:
    # pred: fetus lies (c = 2); ref: the fetus lies on the left (r = 6)
    # both pred tokens match: p1 = 2/2 = 1; BP = exp(1 - 6/2) = exp(-2)
    assert bleu1("fetus lies", "the fetus lies on the left") == pytest.approx(math.exp(-2))


def test_bleu1_clipping_and_brevity_together() -> None:
    # pred: left left (c = 2); ref: the fetus lies on the left side (r = 7)
    # "left" clipped to 1 match: p1 = 1/2; BP = exp(1 - 7/2) = exp(-5/2)
    expected = (1 / 2) * math.exp(-5 / 2)
    assert bleu1("left left", "the fetus lies on the left side") == pytest.approx(expected)


def test_bleu1_no_penalty_at_equal_length() -> None:
    # pred: fetus lies right; ref: fetus lies left; c = r = 3, BP = 1; matches 2 -> 2/3
    assert bleu1("fetus lies right", "fetus lies left") == pytest.approx(2 / 3)


def test_bleu1_empties() -> None:
    assert bleu1("", "cephalic") == 0.0
    assert bleu1("", "") == 0.0  # empty prediction scores 0 whatever the reference
    assert bleu1("cephalic", "") == 0.0  # no clipped matches against an empty reference


# --- ROUGE-L --------------------------------------------------------------------------------


def test_rouge_l_non_contiguous_lcs() -> None:
    # pred: the fetus is on the left (c = 6); ref: fetus lies on left side (r = 5)
    # LCS = fetus . on . left = 3 (gaps in both); "lies"/"side" are not in pred, so 3 is max
    # P = 3/6 = 1/2, R = 3/5; F = 2 * (1/2)(3/5) / (1/2 + 3/5) = (3/5) / (11/10) = 6/11
    assert rouge_l("the fetus is on the left", "fetus lies on left side") == pytest.approx(6 / 11)


def test_rouge_l_depends_on_order_where_token_f1_does_not() -> None:
    # pred: left side fetus; ref: fetus left side; LCS = "left side" = 2
    # P = R = 2/3, F = 2/3; token F1 sees the same bag and gives 1
    assert rouge_l("left side fetus", "fetus left side") == pytest.approx(2 / 3)
    assert token_f1("left side fetus", "fetus left side") == 1.0


def test_rouge_l_beta_weighs_recall() -> None:
    # same pair as the non-contiguous case: l = 3, c = 6, r = 5, P = 1/2, R = 3/5
    # beta = 2: F = (1 + 4) * P * R / (R + 4P) = 5 * (3/10) / (3/5 + 2) = (3/2) / (13/5) = 15/26
    pred, ref = "the fetus is on the left", "fetus lies on left side"
    assert rouge_l(pred, ref, beta=2.0) == pytest.approx(15 / 26)
    with pytest.raises(ValueError, match="beta must be positive"):
        rouge_l(pred, ref, beta=0.0)


def test_rouge_l_empties() -> None:
    assert rouge_l("", "") == 1.0
    assert rouge_l("", "cephalic") == 0.0
    assert rouge_l("cephalic", "") == 0.0
    assert rouge_l("cephalic", "breech") == 0.0


# --- score_pair -----------------------------------------------------------------------------


def test_score_pair_keys_and_values() -> None:
    # pred: the fetus lies left (c = 4); ref: fetus lies on the left side (r = 6)
    # exact 0; token F1 4/5 (see above)
    # BLEU-1: all 4 pred tokens occur once in ref -> p1 = 4/4; BP = exp(1 - 6/4) = exp(-1/2)
    # ROUGE-L: LCS = fetus . lies . left = 3 (in ref "the" comes after "fetus lies", so
    # "the" can only pair with "left": 2), P = 3/4, R = 3/6 = 1/2,
    # F = 2 * (3/4)(1/2) / (3/4 + 1/2) = (3/4) / (5/4) = 3/5
    scores = score_pair("the fetus lies left", "fetus lies on the left side")
    assert list(scores) == list(METRIC_NAMES)
    assert scores == pytest.approx(
        {"exact_match": 0.0, "token_f1": 4 / 5, "bleu1": math.exp(-1 / 2), "rouge_l": 3 / 5}
    )


# --- majority baseline ----------------------------------------------------------------------

TRAIN_PAIRS = [
    # Q index 0: cephalic x3 (two spelled "cephalic", one "Cephalic.") beats breech x1
    (0, "Cephalic."),
    (0, "cephalic"),
    (0, "Breech"),
    (0, "cephalic"),
    # Q index 1: normal x2 vs abnormal x2 -> tie, "abnormal" < "normal"
    (1, "Normal"),
    (1, "abnormal"),
    (1, "abnormal."),
    (1, "Normal"),
    # Q index 2: one group, spellings "Left" x1 and "left" x1 tie -> "Left" < "left"
    (2, "left"),
    (2, "Left"),
    # Q index 3: blanks are skipped, so the single real answer wins
    (3, ""),
    (3, "  "),
    (3, "."),
    (3, "On  the\nright side."),
    # Q index 4: only blanks -> absent
    (4, " "),
]


def test_majority_answers() -> None:
    assert majority_answers(TRAIN_PAIRS) == {
        0: "cephalic",
        1: "abnormal",
        2: "Left",
        3: "On the right side",
    }


def test_majority_answers_is_independent_of_order() -> None:
    expected = majority_answers(TRAIN_PAIRS)
    assert majority_answers(reversed(TRAIN_PAIRS)) == expected
    assert majority_answers(sorted(TRAIN_PAIRS, key=lambda p: p[1])) == expected


def test_majority_answers_rejects_bad_question_index() -> None:
    with pytest.raises(ValueError, match=r"question index 8 .*0\.\.7"):
        majority_answers([(0, "a"), (8, "b")])


# --- aggregate ------------------------------------------------------------------------------

ROWS = [
    # row A, Q1: equal after normalisation -> every metric 1
    {"question": 0, "reference": "cephalic", "prediction": "Cephalic."},
    # row B, Q1: scores from test_score_pair_keys_and_values:
    # em 0, f1 4/5, bleu1 exp(-1/2), rouge_l 3/5
    {
        "question": 0,
        "reference": "fetus lies on the left side",
        "prediction": "the fetus lies left",
    },
    # row C, Q2: pred the the the (3), ref the cat (2)
    # em 0; f1: overlap 1, P = 1/3, R = 1/2 -> 2 * (1/6) / (5/6) = 2/5
    # bleu1: 1/3 (clipping, BP 1); rouge_l: LCS 1, P = 1/3, R = 1/2 -> 2/5
    {"question": 1, "reference": "the cat", "prediction": "the the the"},
]


def test_aggregate_per_question_and_overall() -> None:
    result = aggregate(ROWS)
    assert list(result) == ["Q1", "Q2", "overall"]  # only questions with rows
    # Q1 = mean of rows A and B
    assert result["Q1"]["n"] == 2
    assert result["Q1"] == pytest.approx(
        {
            "n": 2,
            "exact_match": (1 + 0) / 2,  # 1/2
            "token_f1": (1 + 4 / 5) / 2,  # 9/10
            "bleu1": (1 + math.exp(-1 / 2)) / 2,
            "rouge_l": (1 + 3 / 5) / 2,  # 4/5
        }
    )
    # Q2 = row C alone
    assert result["Q2"] == pytest.approx(
        {"n": 1, "exact_match": 0.0, "token_f1": 2 / 5, "bleu1": 1 / 3, "rouge_l": 2 / 5}
    )
    # overall = micro-average over the three rows (not the mean of Q1 and Q2)
    assert result["overall"] == pytest.approx(
        {
            "n": 3,
            "exact_match": 1 / 3,
            "token_f1": (1 + 4 / 5 + 2 / 5) / 3,  # 11/15
            "bleu1": (1 + math.exp(-1 / 2) + 1 / 3) / 3,
            "rouge_l": (1 + 3 / 5 + 2 / 5) / 3,  # 2/3
        }
    )
    assert json.loads(json.dumps(result)) == result


def test_aggregate_accepts_objects() -> None:
    objects = [SimpleNamespace(**row) for row in ROWS]
    assert aggregate(objects) == aggregate(ROWS)


def test_aggregate_reports_every_bad_row() -> None:
    rows = [
        {"question": 0, "reference": "a", "prediction": "a"},
        {"question": 8, "reference": "a", "prediction": "a"},
        {"question": 1, "reference": "a"},
        {"question": 2, "reference": None, "prediction": "a"},
    ]
    with pytest.raises(ValueError, match="3 of 4 rows") as excinfo:
        aggregate(rows)
    message = str(excinfo.value)
    assert "row 1: question index 8" in message
    assert "row 2: missing prediction;" in message
    assert "row 3: reference is NoneType, not str" in message


def test_aggregate_names_missing_attributes() -> None:
    with pytest.raises(ValueError, match="row 0: missing reference, prediction;"):
        aggregate([SimpleNamespace(question=0)])


def test_aggregate_rejects_no_rows() -> None:
    with pytest.raises(ValueError, match="empty"):
        aggregate([])


# --- properties -----------------------------------------------------------------------------

# A small alphabet so that generated pairs share tokens often; includes case, punctuation
# and whitespace so normalisation is exercised.
answers = st.text(alphabet="abAB .,-\n", max_size=30)


@given(answers, answers)
def test_scores_are_in_unit_interval(pred: str, ref: str) -> None:
    for name, value in score_pair(pred, ref).items():
        assert 0.0 <= value <= 1.0, (name, value)


@given(answers)
def test_identical_strings_score_one(text: str) -> None:
    scores = score_pair(text, text)
    if tokenize(text):
        assert scores == {name: 1.0 for name in METRIC_NAMES}
    else:  # no tokens: F1 and ROUGE-L treat both-empty as a match, BLEU-1 has nothing to score
        assert scores == {"exact_match": 1.0, "token_f1": 1.0, "bleu1": 0.0, "rouge_l": 1.0}


@given(answers, answers)
def test_token_f1_and_rouge_l_are_symmetric(a: str, b: str) -> None:
    assert token_f1(a, b) == token_f1(b, a)
    assert rouge_l(a, b) == rouge_l(b, a)


@given(answers, answers)
def test_rouge_l_never_exceeds_token_f1(pred: str, ref: str) -> None:
    # an LCS is a sub-multiset of the common tokens, so l <= overlap and 2l/(c+r) <= 2o/(c+r)
    assert rouge_l(pred, ref) <= token_f1(pred, ref)
