"""Decisions feed back: band precision, the proposed threshold, stored calibrations, exported labels."""

from __future__ import annotations

import csv
import random

import pytest
from review_support import (fresh_pg_database, local_pipeline, seed_run, settings_from,
                            torch_single_thread)  # noqa: F401 (autouse)

from moderation import feedback, review
from moderation.feedback import estimate_at, propose_threshold, score_bands, wilson


def test_wilson_interval():
    lo, hi = wilson(8, 10)
    assert (lo, hi) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    lo, hi = wilson(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == pytest.approx(1.0)
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(0, 50)[0] == 0.0 and wilson(0, 50)[1] < 0.08


def _rows(spec, seed=0):
    """spec: [(n_pairs, score_lo, score_hi, p_confirmed, share_decided)] -> rows with score and state."""
    rng = random.Random(seed)
    rows = []
    for n, lo, hi, p, decided in spec:
        for _ in range(n):
            s = rng.uniform(lo, hi)
            state = ("confirmed" if rng.random() < p else "rejected") if rng.random() < decided else "pending"
            rows.append({"score": s, "state": state})
    return rows


def test_bands_partition_the_decisions():
    rows = _rows([(500, 0.3, 1.0, 0.8, 0.6)]) + [{"score": 0.9, "state": "unsure"}]
    bands = score_bands(rows, min_per_band=25)
    decided = sum(r["state"] in ("confirmed", "rejected") for r in rows)
    assert sum(b.decided for b in bands) == decided
    assert sum(b.unsure for b in bands) == 1
    assert all(b.decided > 0 and b.ci_low <= b.precision <= b.ci_high for b in bands)
    assert [b.lo for b in bands] == sorted((b.lo for b in bands), reverse=True)
    assert all(a.lo == b.hi for a, b in zip(bands, bands[1:]))  # contiguous, best first
    assert len(bands) == min(20, decided // 25)


def test_too_few_decisions_are_refused():
    rows = _rows([(60, 0.3, 1.0, 0.5, 1.0)])
    p = propose_threshold(rows, 0.3, min_decisions=100)
    assert p.action == "refuse" and p.proposed_threshold == 0.3 and not p.moved
    assert "at least 100" in p.reason


def test_low_precision_raises_the_threshold_to_where_it_reaches_target():
    # Precision rises with the score: ~0.55 near 0.3, ~0.98 near 1.0.
    rng = random.Random(3)
    rows = []
    for _ in range(1500):
        s = rng.uniform(0.3, 1.0)
        rows.append({"score": s, "state": "confirmed" if rng.random() < 0.35 + 0.63 * s else "rejected"})
    p = propose_threshold(rows, 0.3)
    assert p.action == "raise" and p.moved
    assert p.at_current.ci_high < 0.9
    assert p.proposed_threshold > 0.3 and p.at_proposed.precision >= 0.9
    assert p.at_proposed.ci_low < p.at_proposed.precision < p.at_proposed.ci_high
    # The true precision above the proposed cut is at or above target, up to sampling noise.
    t = p.proposed_threshold
    true = (0.35 + 0.63 * (1 + t) / 2)
    assert true > 0.87


def test_precision_consistent_with_target_keeps_the_threshold():
    rows = _rows([(300, 0.5, 1.0, 0.91, 1.0)], seed=5)
    p = propose_threshold(rows, 0.5)
    assert p.action == "keep" and p.proposed_threshold == 0.5
    assert p.at_current.ci_low <= 0.9 <= p.at_current.ci_high or p.at_current.ci_low > 0.9


def test_lowering_needs_decisions_below_and_a_confident_lower_bound():
    # An earlier run flagged down to 0.3 and its low pairs were almost all copies.
    rows = _rows([(400, 0.5, 1.0, 0.99, 1.0), (300, 0.3, 0.5, 0.985, 1.0)], seed=2)
    p = propose_threshold(rows, 0.5)
    assert p.action == "lower" and p.proposed_threshold < 0.5 and p.at_proposed.ci_low >= 0.9
    # Without decisions below 0.5 nothing supports lowering.
    p = propose_threshold([r for r in rows if r["score"] >= 0.5], 0.5)
    assert p.action == "keep"


def test_estimate_weights_bands_by_flagged_pairs_not_by_decisions():
    """Moderators review the top first: pooling decisions would hide a poor, barely-reviewed tail."""
    top = [{"score": 0.9 + i / 1000, "state": "confirmed"} for i in range(100)]
    tail = ([{"score": 0.5 + i / 1000, "state": "confirmed" if i < 10 else "rejected"} for i in range(20)]
            + [{"score": 0.5 + i / 10000, "state": "pending"} for i in range(980)])
    rows = top + tail
    pooled = 110 / 120
    assert pooled > 0.9
    est = estimate_at(score_bands(rows, min_per_band=20), 0.5)
    assert est.precision == pytest.approx((100 * 1.0 + 1000 * 0.5) / 1100, abs=0.02)
    p = propose_threshold(rows, 0.5, min_decisions=100)
    assert p.action == "raise" and p.proposed_threshold >= 0.9


# -- on a real review database and registry ----------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from moderation.jobs import Pipeline, pin

    with fresh_pg_database() as url:
        env, _ = local_pipeline(tmp_path_factory.mktemp("feedback") / "home", url)
        p = Pipeline.open(settings_from(env))
        pinned = pin(p)
        p.db.record_stats(pinned.stats)
        p.db.record_index(pinned.index)
        yield p, pinned
        p.db.engine.dispose()


def _decide_all(db, rule, moderator="mod"):
    while True:
        claims = review.claim(db, moderator, 200)
        if not claims:
            return
        for c in claims:
            review.decide(db, c["pair_id"], moderator, rule(c))


def test_calibrate_from_decisions_proposes_then_stores(pipeline):
    from moderation.jobs import flag_threshold, pin
    from moderation.registry import Calibration, Kind, new_version_id
    from moderation.two_stage import TwoStageConfig

    p, pinned = pipeline
    # Decisions move a threshold, they do not set the first one: none in force, nothing proposed.
    none_yet = feedback.calibrate_from_decisions(p)
    assert none_yet["action"] == "refuse" and none_yet["current_threshold"] is None
    assert none_yet["threshold_source"].startswith("no threshold") and "moderation calibrate" in none_yet["reason"]
    first = p.registry.publish(Kind.CALIBRATION, Calibration(
        new_version_id(), pinned.model.version, pinned.stats.version, 0.25, 0.9,
        matching=TwoStageConfig.from_settings(p.settings).as_dict()), {})
    pinned = pin(p)
    versions = dict(model=pinned.model.version, stats=pinned.stats.version, index=pinned.index.version)
    rng = random.Random(11)
    pairs = [(f"q{i}", f"r{i}", round(rng.uniform(0.25, 1.0), 4)) for i in range(400)]
    seed_run(p.db, "fb-day-1", pairs, threshold=0.25, **versions)
    # Another model's run: a different score scale, must not count.
    seed_run(p.db, "other-model", [(f"x{i}", "r", 0.99) for i in range(50)], model="other", stats="os",
             index="oi")
    truth = {q: rng.random() < 0.25 + 0.75 * s for q, _, s in pairs}
    _decide_all(p.db, lambda c: "confirmed" if truth.get(c["query_id"], False) else "rejected")

    proposal = feedback.calibrate_from_decisions(p)
    assert proposal["action"] == "raise" and not proposal["stored"]
    assert proposal["n_decisions"] == 400  # the other model's 50 decisions are not in it
    assert proposal["current_threshold"] == 0.25 and proposal["threshold_source"] == f"calibration {first.version}"
    new = proposal["proposed_threshold"]
    assert new > 0.25 and proposal["at_proposed"]["precision"] >= 0.9
    assert p.current_calibration(pinned.model, pinned.stats).version == first.version  # proposing stores nothing

    stored = feedback.calibrate_from_decisions(p, store=True)
    assert stored["stored"] and stored["proposed_threshold"] == new
    cal = p.registry.current(Kind.CALIBRATION, model_version=pinned.model.version,
                             stats_version=pinned.stats.version)
    assert (cal.version, cal.threshold, cal.source) == (stored["calibration_version"], new, "decisions")
    assert flag_threshold(p, pin(p)).value == new  # the next matching run uses it
    with p.db.engine.connect() as conn:
        from sqlalchemy import text

        row = conn.execute(text("SELECT threshold, source FROM calibrations WHERE version = :v"),
                           {"v": cal.version}).one()
    assert tuple(row) == (new, "decisions")
    again = feedback.calibrate_from_decisions(p, store=True)  # at the new threshold: precision is fine
    assert again["action"] == "keep" and not again["stored"] and "nothing stored" in again["note"]


def test_export_labels(tmp_path):
    from moderation.db import Database
    from moderation.metrics import read_ground_truth

    db = Database(f"sqlite:///{tmp_path / 'labels.db'}")
    from moderation.db import upgrade

    upgrade(db)
    seed_run(db, "day-1", [("q1", "r1", 0.9), ("q1", "r2", 0.8), ('q,"2"\nx', "r3", 0.7), ("q3", "r4", 0.6),
                           ("q4", "r5", 0.5), ("q5", "r6", 0.4)])
    decisions = {"r1": "confirmed", "r2": "rejected", "r3": "rejected", "r4": "unsure", "r5": "confirmed",
                 "r6": "rejected"}
    _decide_all(db, lambda c: decisions[c["reference_id"]])
    review.claim_pair(db, "mod", next(x.id for x in db.pairs() if x.reference_id == "r6"))
    review.undo(db, "mod")  # r6's rejection taken back: not a label any more (undo walks the latest)
    out = feedback.export_labels(db, tmp_path / "labels")
    assert (out["positives"], out["hard_negatives"]) == (2, 2)
    pos = list(csv.DictReader(open(tmp_path / "labels" / "positives.csv", newline="")))
    neg = list(csv.DictReader(open(tmp_path / "labels" / "hard_negatives.csv", newline="")))
    assert {(r["query_id"], r["reference_id"]) for r in pos} == {("q1", "r1"), ("q4", "r5")}
    assert {(r["query_id"], r["reference_id"]) for r in neg} == {("q1", "r2"), ('q,"2"\nx', "r3")}
    assert all(r["decided_by"] == "mod" and r["score"] for r in pos + neg)
    # The DISC21 ground-truth format the evaluation reads, ids verbatim even with commas and newlines.
    gt = read_ground_truth(tmp_path / "labels" / "ground_truth.csv")
    assert gt == {"q1": "r1", "q4": "r5", 'q,"2"\nx': None}
    from moderation.store import LocalStore

    store = LocalStore(tmp_path / "store")
    out = feedback.export_labels(db, store=store, prefix="labels/test")
    assert out["prefix"] == "labels/test" and store.exists("labels/test/positives.csv")
    db.engine.dispose()
