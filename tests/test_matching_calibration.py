"""Matching (search + score normalisation + threshold) and threshold calibration."""

from __future__ import annotations

import numpy as np
import pytest

from moderation.calibration import calibrate
from moderation.config import Postprocess
from moderation.errors import ModerationError
from moderation.index import build_index
from moderation.matching import Candidate, MatchParams, candidates_csv, flagged, search
from moderation.statistics import BackgroundIndex, fit_postprocessor, l2n


def _n(*v):
    a = np.asarray(v, np.float32)
    return a / np.linalg.norm(a)


# d = 3. The background crowds around e1, so a query near e1 is a "hub": every
# image looks like it. SN (beta=1, neighbours 1..3) pulls its score down.
BACKGROUND = np.stack([_n(1, 0.1, 0), _n(1, -0.1, 0), _n(1, 0, 0.1), _n(1, 0, -0.1)])
REFS = np.stack([_n(1, 0, 0), _n(0, 1, 0), _n(0, 0, 1)])
REF_IDS = ["R-hub", "R-y", "R-z"]
QUERIES = np.stack([_n(1, 0.05, 0), _n(0, 1, 0.3)])
QUERY_IDS = ["q-hub", "q-y"]


def _search(use_sn=True, beta=1.0, k=3):
    index = build_index(REFS, REF_IDS)
    return search(QUERIES, QUERY_IDS, index, None, BackgroundIndex(BACKGROUND),
                  MatchParams(k=k, beta=beta, sn_neighbors=3, use_sn=use_sn))


def test_sn_scores_by_hand():
    cands = _search()
    assert len(cands) == 6
    for c in cands:
        q = QUERIES[QUERY_IDS.index(c.query_id)]
        raw = float(q @ REFS[REF_IDS.index(c.reference_id)])
        bias = np.sort(BACKGROUND @ q)[::-1][:3].mean()
        assert c.raw_score == pytest.approx(raw, abs=1e-5)
        assert c.score == pytest.approx(raw - bias, abs=1e-5)
    half = _search(beta=0.5)
    for c, h in zip(cands, half):
        assert h.raw_score == c.raw_score
        assert h.score == pytest.approx(c.raw_score - 0.5 * (c.raw_score - c.score), abs=1e-6)


def test_sn_changes_scores_but_not_per_query_ranking():
    raw = _search(use_sn=False)
    sn = _search(use_sn=True)
    assert all(c.score == c.raw_score for c in raw)
    assert any(abs(c.score - c.raw_score) > 0.1 for c in sn)
    for qid in QUERY_IDS:
        order_raw = [(c.reference_id, c.rank) for c in raw if c.query_id == qid]
        order_sn = [(c.reference_id, c.rank) for c in sn if c.query_id == qid]
        assert order_raw == order_sn
        assert [c.rank for c in sn if c.query_id == qid] == [1, 2, 3]
    # ...but the pooled order across queries does change: the hub query loses first place
    top_raw = max(raw, key=lambda c: c.score)
    top_sn = max(sn, key=lambda c: c.score)
    assert (top_raw.query_id, top_raw.reference_id) == ("q-hub", "R-hub")
    assert (top_sn.query_id, top_sn.reference_id) == ("q-y", "R-y")


def test_no_background_means_raw_scores():
    index = build_index(REFS, REF_IDS)
    cands = search(QUERIES, QUERY_IDS, index, None, None, MatchParams(k=2))
    assert len(cands) == 4 and all(c.score == c.raw_score for c in cands)


def test_search_applies_the_postprocessor_and_chunks():
    rng = np.random.default_rng(0)
    bg_raw = rng.normal(size=(40, 6)).astype(np.float32) + 2
    refs_raw = rng.normal(size=(10, 6)).astype(np.float32) + 2
    q_raw = refs_raw[[2, 5, 7]] + 0.01 * rng.normal(size=(3, 6)).astype(np.float32)
    pp = fit_postprocessor(bg_raw, Postprocess.CENTER)
    index = build_index(pp.apply(refs_raw), [f"R{i}" for i in range(10)])
    bg = BackgroundIndex(pp.apply(bg_raw))
    qids = ["a", "b", "c"]
    whole = search(q_raw, qids, index, pp, bg, MatchParams(k=2))
    chunked = search(q_raw, qids, index, pp, bg, MatchParams(k=2), chunk=1)
    assert whole == chunked
    assert [c.reference_id for c in whole if c.rank == 1] == ["R2", "R5", "R7"]
    assert all(c.raw_score == pytest.approx(1.0, abs=1e-3) for c in whole if c.rank == 1)


def test_flagged_and_csv():
    cands = [Candidate("q1", "r1", 0.9, 0.5, 1), Candidate("q1", "r2", 0.8, 0.1, 2),
             Candidate("q2", "r3", 0.7, 0.6, 1), Candidate("q3", "r4", 0.6, 0.3, 1)]
    out = flagged(cands, 0.3)
    assert [(c.query_id, c.reference_id) for c in out] == [("q2", "r3"), ("q1", "r1"), ("q3", "r4")]
    assert flagged(cands, 0.61) == []
    assert cands[0].prediction().score == 0.5  # the normalised score
    assert candidates_csv(cands[:2]) == "query_id,reference_id,score\nq1,r1,0.500000\nq1,r2,0.100000\n"


# -- calibration --------------------------------------------------------------------------------


def _cal_case():
    """Ten positive queries, three without a match.

    Normalised-score ranking: C .99 ... C .91 (9 correct), I .905, C .80, I .70, I .60
      rank 10: p = 9/10 = .9,  r = .9
      rank 11: p = 10/11 = .909, r = 1.0   <- highest recall at p >= .9: threshold .80
      rank 12: p = 10/12 = .833
    Raw scores put the three incorrect predictions on top instead.
    """
    gt = {f"q{i}": f"r{i}" for i in range(10)}
    gt.update({"x1": None, "x2": None, "x3": None})
    cands = [Candidate(f"q{i}", f"r{i}", 0.5 - i / 100, 0.99 - i / 100, 1) for i in range(9)]
    cands.append(Candidate("x1", "r0", 0.95, 0.905, 1))
    cands.append(Candidate("q9", "r9", 0.3, 0.80, 1))
    cands.append(Candidate("x2", "r1", 0.94, 0.70, 1))
    cands.append(Candidate("x3", "r2", 0.93, 0.60, 1))
    return cands, gt


def test_calibration_threshold_is_lowest_score_reaching_090():
    cands, gt = _cal_case()
    res = calibrate(cands, gt)
    assert res.reached is True
    assert res.target_precision == 0.9
    assert res.threshold == pytest.approx(0.80)
    chosen = flagged(cands, res.threshold)
    correct = sum(gt.get(c.query_id) == c.reference_id for c in chosen)
    assert len(chosen) == 11 and correct == 10  # precision 10/11 >= .9, recall 1.0
    # one notch lower takes in an incorrect one and drops below .9
    lower = flagged(cands, 0.70)
    assert sum(gt.get(c.query_id) == c.reference_id for c in lower) / len(lower) < 0.9
    m = res.metrics
    assert m["rp90_sn"] == pytest.approx(1.0)
    # μAP (SN): ranks 1..9 p=1, rank 11 p=10/11 -> (9 + 10/11) / 10
    assert m["uap_sn"] == pytest.approx((9 + 10 / 11) / 10)
    # μAP (raw): three incorrect first, then the ten correct at ranks 4..13
    assert m["uap"] == pytest.approx(sum(k / (k + 3) for k in range(1, 11)) / 10)
    assert m["rp90"] == 0.0 and m["rp90_threshold_raw"] is None
    assert m["recall_at_1"] == pytest.approx(1.0)
    assert (m["n_queries"], m["n_positives"], m["n_predictions"]) == (13, 10, 13)


def test_calibration_with_a_stricter_target():
    cands, gt = _cal_case()
    res = calibrate(cands, gt, target_precision=0.95)
    # p >= .95 only for ranks 1..9 -> threshold .91
    assert res.reached and res.threshold == pytest.approx(0.91)
    assert res.metrics["rp90_sn"] == pytest.approx(0.9)


def test_calibration_unreached_target_flags_nothing():
    gt = {"q1": "r1", "q2": "r2", "x": None}
    cands = [Candidate("x", "r1", 0.9, 0.9, 1), Candidate("q1", "r1", 0.8, 0.8, 1),
             Candidate("q2", "r2", 0.7, 0.7, 1)]  # p = 0, 1/2, 2/3
    res = calibrate(cands, gt)
    assert res.reached is False
    assert res.threshold > 0.9
    assert res.threshold == pytest.approx(0.9, abs=1e-5)
    assert flagged(cands, res.threshold) == []
    assert res.metrics["rp90_sn"] == 0.0


def test_calibration_input_errors():
    cands, gt = _cal_case()
    with pytest.raises(ModerationError, match="no query with a reference"):
        calibrate(cands, {"q0": None})
    gt_missing = {k: v for k, v in gt.items() if k != "x3"}
    with pytest.raises(ModerationError, match="missing from the ground truth"):
        calibrate(cands, gt_missing)


def test_end_to_end_search_then_calibrate():
    rng = np.random.default_rng(3)
    refs = l2n(rng.normal(size=(30, 16)))
    bg = BackgroundIndex(l2n(rng.normal(size=(20, 16))))
    index = build_index(refs, [f"R{i}" for i in range(30)])
    copies = l2n(refs[:10] + 0.2 * rng.normal(size=(10, 16)))
    others = l2n(rng.normal(size=(5, 16)))
    q = np.vstack([copies, others]).astype(np.float32)
    qids = [f"Q{i}" for i in range(15)]
    gt = {f"Q{i}": (f"R{i}" if i < 10 else None) for i in range(15)}
    cands = search(q, qids, index, None, bg, MatchParams(k=5))
    res = calibrate(cands, gt)
    assert res.reached
    assert res.metrics["uap_sn"] > 0.9 and res.metrics["recall_at_1"] == pytest.approx(1.0)
    chosen = flagged(cands, res.threshold)
    assert sum(gt.get(c.query_id) == c.reference_id for c in chosen) / len(chosen) >= 0.9
