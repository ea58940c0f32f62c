"""Per-question scorers on hand-made answer pairs, unparseable answers included."""

from __future__ import annotations

import json

import pytest

from fada_batch.evaluation.clinical import clinical_scores
from fada_batch.evaluation.question_scores import (
    QUESTION_NAMES,
    SCORERS,
    load_scoring_tables,
    parse_structures,
    parse_weeks,
    question_block,
    score_gestational_age,
    score_items,
    score_normality,
    score_orientation,
    score_quality,
    score_structures,
)


@pytest.mark.parametrize(
    ("answer", "weeks"),
    [
        ("22 weeks", 22.0),
        ("22w3d", 22 + 3 / 7),
        ("22 weeks 3 days", 22 + 3 / 7),
        ("22+3", 22 + 3 / 7),
        ("20-22 weeks", 21.0),
        ("20 to 24 weeks", 22.0),
        ("Approximately 20 -25weeks", 22.5),
        ("38+ weeks", 38.0),
        ("GA about 31 wks.", 31.0),
        ("second trimester", None),  # a trimester is no age in weeks
        ("Cannot be estimated from this view", None),
        ("BPD 45 mm", None),  # a number without a week unit
        ("90 weeks", None),  # outside 4-45 weeks
        ("", None),
    ],
)
def test_parse_weeks(answer, weeks):
    got = parse_weeks(answer)
    assert got == pytest.approx(weeks) if weeks is not None else got is None


def test_gestational_age_error_and_windows():
    near = score_gestational_age("23 weeks", "20-24 weeks")  # 1 week from the midpoint 22
    assert near.values["ga_abs_error_weeks"] == (1.0, 1.0)
    assert near.values["ga_within_1w"] == (1.0, 1.0) and near.correct
    far = score_gestational_age("25w", "22 weeks")
    assert far.values["ga_within_2w"] == (0.0, 1.0) and not far.correct
    # an unparseable prediction is wrong (within: 0 of 1) and has no error to average
    lost = score_gestational_age("second trimester", "22 weeks")
    assert lost.values["ga_within_2w"] == (0.0, 1.0)
    assert lost.values["ga_abs_error_weeks"] == (0.0, 0.0) and lost.pred_label is None
    # an unparseable reference leaves the item out
    assert score_gestational_age("22 weeks", "not assessable").values["ga_within_2w"] == (0.0, 0.0)
    block = question_block(
        4, score_items(4, ["23 weeks", "25w", "unknown"], ["22 weeks", "22 weeks", "22 weeks"])
    )
    assert block["ga_within_2w"] == pytest.approx(1 / 3)
    assert block["ga_within_1w"] == pytest.approx(1 / 3)
    assert block["ga_abs_error_weeks"] == pytest.approx(2.0)  # (1 + 3) / 2 parsed predictions
    assert block["unparseable"] == 1 and block["ref_unparseable"] == 0


def test_structures_as_sets_with_synonyms():
    assert parse_structures("Stomach bubble and the fetal liver (well seen)") == {"stomach", "liver"}
    assert parse_structures("Skull, thalami; CSP") == {"skull", "thalamus", "cavum septum pellucidum"}
    assert parse_structures("Vertebral column / IVC") == {"spine", "inferior vena cava"}
    assert parse_structures("  .  ") == frozenset()
    same = score_structures("gastric bubble, liver", "Liver and stomach")
    assert same.correct and same.values["structure_f1"] == (1.0, 1.0)
    half = score_structures("stomach, heart, kidneys", "stomach and liver")  # 1 of 3 right, 1 of 2 found
    assert half.values["structure_precision"] == (pytest.approx(1 / 3), 1.0)
    assert half.values["structure_recall"] == (0.5, 1.0)
    assert half.values["structure_f1"] == (pytest.approx(0.4), 1.0)  # 2*1 / (3 + 2)
    empty = score_structures("", "stomach")
    assert empty.pred_label is None and empty.values["structure_f1"] == (0.0, 1.0)
    block = question_block(0, score_items(0, ["", "liver"], ["stomach", "liver"]))
    assert block["unparseable"] == 1 and block["structure_f1"] == 0.5


@pytest.mark.parametrize(
    ("pred", "ref", "pred_label", "right"),
    [
        ("Cephalic presentation", "cephalic", "cephalic", True),
        ("Vertex, head down", "Cephalic position", "cephalic", True),
        ("Breech", "cephalic", "breech", False),
        ("Fetus lies on the left side", "left side", "left", True),
        ("Fetus is not seen in the image", "fetus not seen", "not seen", True),
        ("I do not know", "cephalic", None, False),
    ],
)
def test_orientation_labels(pred, ref, pred_label, right):
    s = score_orientation(pred, ref)
    assert s.pred_label == pred_label and s.correct is right


@pytest.mark.parametrize(
    ("pred", "ref", "tier", "exact", "near"),
    [
        ("Good image quality", "good", "good", 1.0, 1.0),
        ("Moderate quality", "Good quality", "medium", 0.0, 1.0),  # adjacent tier
        ("Poor image quality, heavy noise", "Good image quality", "poor", 0.0, 0.0),
        ("Suboptimal", "poor", "poor", 1.0, 1.0),
        ("Blurry", "poor", None, 0.0, 0.0),  # no tier: wrong, also for "within one"
    ],
)
def test_quality_tiers(pred, ref, tier, exact, near):
    s = score_quality(pred, ref)
    assert s.pred_label == tier
    assert s.values["tier_accuracy"] == (exact, 1.0) and s.values["tier_within_one"] == (near, 1.0)


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        ("No abnormality seen", "normal"),
        ("No  abnormality\tseen", "normal"),  # raw model output: whitespace runs
        ("No visible\nabnormalities", "normal"),
        ("No visible abnormalities", "normal"),
        ("Normal", "normal"),
        ("Appears normal, unremarkable", "normal"),
        ("Abnormal: cystic mass in the abdomen", "abnormal"),
        ("Ventriculomegaly", "abnormal"),
        ("Not normal", "abnormal"),
        ("Cannot comment", None),
    ],
)
def test_normality_labels(answer, label):
    assert score_normality(answer, "normal").pred_label == label


def test_normality_sensitivity_specificity_and_confusion():
    """The FADA failure mode: every answer 'normal' is 90% accurate and 0.0 sensitive."""
    refs = ["Abnormal: cyst"] * 2 + ["No abnormality seen"] * 18
    always_normal = question_block(6, score_items(6, ["Normal"] * 20, refs))
    assert always_normal["normality_accuracy"] == pytest.approx(0.9)
    assert always_normal["sensitivity"] == 0.0 and always_normal["specificity"] == 1.0
    assert always_normal["confusion"]["abnormal"] == {"abnormal": 0, "normal": 2, "unparseable": 0}
    preds = ["abnormal", "cannot say"] + ["abnormal"] + ["normal"] * 16 + ["???"]
    block = question_block(6, score_items(6, preds, refs))
    assert block["sensitivity"] == 0.5  # TP 1, FN 0, one unparseable counted against it
    assert block["specificity"] == pytest.approx(16 / 18)
    assert block["unparseable"] == 2
    assert block["confusion"]["normal"] == {"abnormal": 1, "normal": 16, "unparseable": 1}
    # no abnormal reference: sensitivity is undefined, not 0 or 1
    assert question_block(6, score_items(6, ["normal"], ["normal"]))["sensitivity"] is None


def test_free_text_questions_use_token_f1_and_rouge_l():
    block = question_block(7, score_items(7, ["routine follow up in 4 weeks"], ["Routine follow up"]))
    assert block["token_f1"] == pytest.approx(2 * 3 / (6 + 3))
    assert block["rouge_l"] == pytest.approx(2 * 3 / (6 + 3))
    assert block["exact_match"] == 0.0 and "unparseable" not in block


def test_clinical_scores_names_every_question_and_model():
    questions = [0, 6, 6, 4]
    refs = ["liver", "Abnormal: cyst", "normal", "22 weeks"]
    images = ["a.png", "a.png", "b.png", "b.png"]
    preds = {"adapter": ["liver", "abnormal", "normal", "23 w"], "base": ["", "", "", ""]}
    out = clinical_scores(questions, images, refs, preds, n_boot=200)
    assert list(out) == ["Q1", "Q5", "Q7", "overall"]
    assert out["Q7"]["name"] == "Normality/Abnormality" and out["Q7"]["headline"] == [
        "sensitivity",
        "specificity",
    ]
    assert out["Q7"]["adapter"]["sensitivity"] == 1.0 and out["Q7"]["base"]["sensitivity"] == 0.0
    assert out["Q5"]["adapter"]["ga_within_1w"] == 1.0 and out["Q5"]["base"]["unparseable"] == 1
    json.dumps(out)  # metrics.json takes it as it is


def test_tables_and_names():
    assert len(QUESTION_NAMES) == len(SCORERS) == 8 and QUESTION_NAMES[4] == "Gestational Age"
    tables = load_scoring_tables()
    assert tables.structures["calvarium"] == "skull"
    assert [label for label, _ in tables.quality] == ["poor", "medium", "good"]


def test_broken_table_is_named(tmp_path):
    bad = tmp_path / "scoring.json"
    bad.write_text(
        '{"structures": {}, "orientation": [], "quality": [["great", []]], "quality_order": [], "normality": []}'
    )
    with pytest.raises(ValueError, match=r"scoring\.json.*great.*quality_order"):
        load_scoring_tables(bad)


def test_clinical_scores_intervals_and_tests():
    """Intervals bracket the figure, are seeded, and McNemar counts the discordant items."""
    n = 40
    questions = [6] * n
    images = [f"img{i}.png" for i in range(n)]
    refs = ["Abnormal: cyst" if i < 8 else "normal" for i in range(n)]
    adapter = ["abnormal" if i < 7 else "normal" for i in range(n)]  # misses one abnormal
    majority = ["normal"] * n
    out = clinical_scores(
        questions, images, refs, {"adapter": adapter, "majority": majority}, n_boot=500, seed=3
    )
    a = out["Q7"]["adapter"]
    assert a["sensitivity"] == pytest.approx(7 / 8)
    low, high = a["sensitivity_ci"]
    assert 0.4 <= low < 7 / 8 <= high <= 1.0  # 8 abnormal references: a wide interval
    assert out["Q7"]["majority"]["sensitivity_ci"] == [0.0, 0.0]
    again = clinical_scores(
        questions, images, refs, {"adapter": adapter, "majority": majority}, n_boot=500, seed=3
    )
    assert again == out  # seeded
    # adapter right where majority is wrong on 7 items, the reverse on none: p = 2 * 0.5**7
    test = out["Q7"]["tests"]["own"]["majority"]
    assert (test["b"], test["c"]) == (7, 0) and test["p"] == pytest.approx(2 * 0.5**7)
    assert out["overall"]["tests"]["exact_match"]["majority"]["b"] == 0  # "abnormal" != "Abnormal: cyst"
    assert out["overall"]["adapter"]["n"] == n
