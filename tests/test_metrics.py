"""DISC21 metrics: μAP (pessimistic ties), RP90 and its threshold, recall@1 (ties are misses).

Expected values are worked out by hand in the comments, and a small
independent implementation of the written definitions cross-checks the
library on random data with many tied scores.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from moderation.errors import ModerationError
from moderation.metrics import (Prediction, evaluate, micro_ap, precision_at, precision_recall,
                                read_ground_truth, recall_at_1, recall_at_precision)

P = Prediction


# gt: q1->r1, q2->r2, q3->r3 (N = 3), q4 has no match.
GT = {"q1": "r1", "q2": "r2", "q3": "r3", "q4": None}
# Ranked: C(.9) I(.8) C(.7) I(.6) I(.5)
#   tp     1     1     2     2     2
#   p      1    1/2   2/3   1/2   2/5
#   r     1/3   1/3   2/3   2/3   2/3
PREDS = [P("q1", "r1", 0.9), P("q4", "r9", 0.8), P("q2", "r2", 0.7), P("q2", "r5", 0.6), P("q3", "r7", 0.5)]


def test_precision_recall_curve_by_hand():
    precision, recall, scores = precision_recall(PREDS, GT)
    np.testing.assert_allclose(precision, [1, 1 / 2, 2 / 3, 1 / 2, 2 / 5])
    np.testing.assert_allclose(recall, [1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(scores, [0.9, 0.8, 0.7, 0.6, 0.5])


def test_micro_ap_by_hand():
    # Σ (r_i - r_{i-1}) p_i = 1/3 * 1 + 1/3 * 2/3 = 5/9
    assert micro_ap(PREDS, GT) == pytest.approx(5 / 9)
    # input order does not matter
    assert micro_ap(list(reversed(PREDS)), GT) == pytest.approx(5 / 9)


def test_micro_ap_perfect_and_empty():
    gt = {"a": "ra", "b": "rb"}
    assert micro_ap([P("a", "ra", 0.5), P("b", "rb", 0.4)], gt) == pytest.approx(1.0)
    # one positive query never predicted: recall stops at 1/2
    assert micro_ap([P("a", "ra", 0.5)], gt) == pytest.approx(0.5)
    assert micro_ap([], gt) == 0.0


def test_ties_are_pessimistic():
    gt = {"q1": "r1", "q2": "r2"}
    preds = [P("q1", "r1", 0.5), P("q2", "rx", 0.5)]
    # pessimistic order: I then C -> p = [0, 1/2], r = [0, 1/2]; μAP = 1/2 * 1/2
    assert micro_ap(preds, gt) == pytest.approx(0.25)
    assert micro_ap(list(reversed(preds)), gt) == pytest.approx(0.25)
    precision, recall, _ = precision_recall(preds, gt)
    np.testing.assert_allclose(precision, [0.0, 0.5])
    np.testing.assert_allclose(recall, [0.0, 0.5])


def test_predictions_for_unmatched_queries_lower_precision():
    gt = {"q1": "r1", "q2": None}
    clean = [P("q1", "r1", 0.5)]
    noisy = clean + [P("q2", "r1", 0.9)]  # confident prediction for a query without a match
    assert micro_ap(clean, gt) == pytest.approx(1.0)
    assert micro_ap(noisy, gt) == pytest.approx(0.5)


def test_rp90_and_threshold_by_hand():
    assert recall_at_precision(PREDS, GT, 0.9) == (pytest.approx(1 / 3), pytest.approx(0.9))
    # target 0.6: ranks with p >= .6 are 1 and 3; best recall 2/3 at score .7
    assert recall_at_precision(PREDS, GT, 0.6) == (pytest.approx(2 / 3), pytest.approx(0.7))


def test_rp90_unreached():
    gt = {"q1": "r1", "q2": "r2"}
    preds = [P("q1", "rx", 0.9), P("q1", "r1", 0.8), P("q2", "r2", 0.7)]  # p = 0, 1/2, 2/3
    assert recall_at_precision(preds, gt, 0.9) == (0.0, None)
    m = evaluate(preds, gt)
    assert m.rp90 == 0.0 and m.rp90_threshold is None


def test_rp90_threshold_is_lowest_score_keeping_precision():
    # ten correct at .99 ... .90, then one incorrect at .5:
    # rank 11 has p = 10/11 >= .9 and the same recall (1.0) -> the threshold is .5
    gt = {f"q{i}": f"r{i}" for i in range(10)}
    gt["qx"] = None
    preds = [P(f"q{i}", f"r{i}", 0.99 - i / 100) for i in range(10)] + [P("qx", "r0", 0.5)]
    rp, thr = recall_at_precision(preds, gt, 0.9)
    assert rp == pytest.approx(1.0)
    assert thr == pytest.approx(0.5)
    assert precision_at(preds, gt, thr) >= 0.9


def test_rp90_threshold_respects_ties_below_it():
    # as above, but two incorrect predictions tie at .5: flagging score >= .5 takes both
    # (precision 10/12 < .9), so the operating point must stay at the last correct (.90).
    gt = {f"q{i}": f"r{i}" for i in range(10)}
    gt["qx"] = None
    gt["qy"] = None
    preds = [P(f"q{i}", f"r{i}", 0.99 - i / 100) for i in range(10)]
    preds += [P("qx", "r0", 0.5), P("qy", "r0", 0.5)]
    rp, thr = recall_at_precision(preds, gt, 0.9)
    assert rp == pytest.approx(1.0)
    assert thr == pytest.approx(0.90)
    assert precision_at(preds, gt, thr) >= 0.9


def test_recall_at_1_by_hand_and_ties_are_misses():
    # q1 hit; q2 hit (r2 .7 > r5 .6); q3 miss (only r7) -> 2/3
    assert recall_at_1(PREDS, GT) == pytest.approx(2 / 3)
    gt = {"q1": "r1", "q2": "r2"}
    preds = [P("q1", "r1", 0.8), P("q1", "r9", 0.8),  # tie with a wrong reference: miss
             P("q2", "r2", 0.3), P("q2", "r8", 0.2)]  # hit
    assert recall_at_1(preds, gt) == pytest.approx(0.5)
    # a query with no prediction at all is a miss; no positives -> 0
    assert recall_at_1([P("q1", "r1", 0.1)], gt) == pytest.approx(0.5)
    assert recall_at_1(preds, {"q1": None}) == 0.0


def test_evaluate_bundles_everything():
    m = evaluate(PREDS, GT)
    assert m.uap == pytest.approx(5 / 9)
    assert m.rp90 == pytest.approx(1 / 3)
    assert m.rp90_threshold == pytest.approx(0.9)
    assert m.recall_at_1 == pytest.approx(2 / 3)
    assert m.n_predictions == 5 and m.n_positives == 3
    assert m.as_dict()["uap"] == pytest.approx(5 / 9)


def test_precision_at_threshold():
    assert precision_at(PREDS, GT, 0.7) == pytest.approx(2 / 3)
    assert precision_at(PREDS, GT, 0.85) == pytest.approx(1.0)
    assert math.isnan(precision_at(PREDS, GT, 2.0))


def test_duplicate_prediction_rejected():
    with pytest.raises(ModerationError, match="duplicate prediction"):
        micro_ap([P("q1", "r1", 0.9), P("q1", "r1", 0.8)], GT)


def test_read_ground_truth(tmp_path):
    f = tmp_path / "gt.csv"
    f.write_text("query_id,reference_id\nQ1,R1\nQ2,\n\nQ3 , R3 \n")
    assert read_ground_truth(f) == {"Q1": "R1", "Q2": None, "Q3": "R3"}
    g = tmp_path / "noheader.csv"
    g.write_text("Q1,R1\nQ2\n")
    assert read_ground_truth(g) == {"Q1": "R1", "Q2": None}
    bom = tmp_path / "excel.csv"  # saved by a spreadsheet: UTF-8 with a byte-order mark
    bom.write_bytes("query_id,reference_id\r\nQ1,R1\r\nQ2,\r\n".encode("utf-8-sig"))
    assert read_ground_truth(bom) == {"Q1": "R1", "Q2": None}
    dup = tmp_path / "dup.csv"
    dup.write_text("Q1,R1\nQ1,R2\n")
    with pytest.raises(ModerationError, match="Q1 appears twice"):
        read_ground_truth(dup)
    bad = tmp_path / "bad.csv"
    bad.write_text("Q1,R1,extra\n")
    with pytest.raises(ModerationError, match="bad.csv:1"):
        read_ground_truth(bad)


# -- cross-check against a direct reading of the definitions ----------------------------------


def _reference(preds, gt):
    """Straight from the README: pooled, pessimistic ties, no interpolation."""
    n = sum(1 for r in gt.values() if r is not None)
    ranked = sorted(preds, key=lambda p: (-p.score, gt.get(p.query_id) == p.reference_id))
    tp, uap, prev_r, best = 0, 0.0, 0.0, (0.0, None)
    for i, p in enumerate(ranked, 1):
        tp += gt.get(p.query_id) == p.reference_id
        prec, rec = tp / i, tp / n
        uap += (rec - prev_r) * prec
        prev_r = rec
        if prec >= 0.9 and rec > best[0]:
            best = (rec, p.score)
    hits = 0
    for q, r in gt.items():
        if r is None:
            continue
        mine = [p for p in preds if p.query_id == q]
        if mine:
            top = max(p.score for p in mine)
            winners = {p.reference_id for p in mine if p.score == top}
            hits += winners == {r}
    return uap, best[0], hits / n


@pytest.mark.parametrize("seed", range(12))
def test_matches_reference_implementation_with_ties(seed):
    rng = random.Random(seed)
    refs = [f"r{i}" for i in range(8)]
    gt = {f"q{i}": (rng.choice(refs) if rng.random() < 0.7 else None) for i in range(15)}
    if not any(gt.values()):
        gt["q0"] = "r0"
    preds = []
    for q in gt:
        for r in rng.sample(refs, rng.randint(0, 4)):
            preds.append(P(q, r, rng.choice([0.1, 0.2, 0.3, 0.5, 0.8, 0.9])))  # many ties
        if gt[q] and rng.random() < 0.6 and all(p.reference_id != gt[q] or p.query_id != q for p in preds):
            preds.append(P(q, gt[q], rng.choice([0.3, 0.8, 0.95, 1.0])))
    uap, rp, r1 = _reference(preds, gt)
    m = evaluate(preds, gt)
    assert m.uap == pytest.approx(uap, abs=1e-12)
    assert m.rp90 == pytest.approx(rp, abs=1e-12)
    assert m.recall_at_1 == pytest.approx(r1, abs=1e-12)
    if m.rp90_threshold is not None:
        # the operating threshold, applied as "flag score >= T", keeps the target precision
        assert precision_at(preds, gt, m.rp90_threshold) >= 0.9 - 1e-12
        # and finds at least the RP90 recall
        n = sum(1 for r in gt.values() if r)
        found = sum(1 for p in preds if p.score >= m.rp90_threshold and gt.get(p.query_id) == p.reference_id)
        assert found / n == pytest.approx(m.rp90)
