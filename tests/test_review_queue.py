"""The review queue's semantics, on Postgres (SQL functions and views) and on SQLite (Python).

Every test runs on both backends against a fresh database: the CLI and the
embedded default must behave the same.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from review_support import fresh_pg_database, pair_ids, seed_run, seed_versions
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from moderation import review
from moderation.db import Database, upgrade
from moderation.errors import NotFoundError


@pytest.fixture(scope="module")
def pg_db():
    """One migrated database for the module; each test starts from empty tables (see ``db``)."""
    with fresh_pg_database() as url:
        d = Database(url)
        yield d
        d.engine.dispose()


_TABLES = ("review_queue, review_claims, review_decisions, flagged_pairs, match_runs, calibrations, "
           "index_versions, stats_versions, model_versions")


@pytest.fixture(params=["postgres", "sqlite"])
def db(request, tmp_path):
    if request.param == "sqlite":
        d = Database(f"sqlite:///{tmp_path / 'review.db'}")
        upgrade(d)
        yield d
        d.engine.dispose()
        return
    d = request.getfixturevalue("pg_db")
    with d.engine.begin() as conn:
        # Test-only reset: replica mode skips the append-only trigger (superuser only).
        conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
        conn.exec_driver_sql(f"TRUNCATE {_TABLES} RESTART IDENTITY CASCADE")
        if conn.exec_driver_sql("SELECT to_regclass('quality_holds')").scalar():
            conn.exec_driver_sql("TRUNCATE quality_holds")
    yield d


def _seed(db, n=10, batch="day-1"):
    run_id = seed_run(db, batch, [(f"q{i}", f"r{i % 4}", round(0.1 + i / 100, 4)) for i in range(n)])
    return run_id, sorted(pair_ids(db, run_id))


def _expire_claims(db, pair_id=None):
    """Move claims' expiry into the past (the clock moving on by more than the lease)."""
    past = review._now() - timedelta(seconds=5)
    where = "" if pair_id is None else " AND pair_id = :p"
    with db.engine.begin() as c:
        c.execute(text("UPDATE review_claims SET expires_at = :t WHERE ended_at IS NULL" + where)
                  .bindparams(review._ts("t")), {"t": past, "p": pair_id})
        if db.is_postgres:
            c.execute(text("UPDATE review_queue SET claim_expires_at = :t WHERE claim_id IS NOT NULL"
                           + where.replace("pair_id", "review_queue.pair_id")), {"t": past, "p": pair_id})


def _state(db, pair_id):
    return review.pair_details(db, pair_id)["state"]


# -- claiming -----------------------------------------------------------------------------------


def test_claim_takes_best_first_and_never_twice(db):
    _, ids = _seed(db)
    by_score = [p.id for p in db.pairs()]  # score desc
    a = review.claim(db, "alice", 3)
    b = review.claim(db, "bob", 3)
    assert [c["pair_id"] for c in a] == by_score[:3]
    assert [c["pair_id"] for c in b] == by_score[3:6]
    assert all(c["expires_at"] > review._now() for c in a + b)
    rest = review.claim(db, "carol", 100)
    assert [c["pair_id"] for c in rest] == by_score[6:]
    assert review.claim(db, "dave", 5) == []
    held = {c["pair_id"] for c in a + b + rest}
    assert held == set(ids) and len(a + b + rest) == len(ids)


def test_pending_view_orders_by_score_then_age_and_shows_holder(db):
    seed_run(db, "day-1", [("old", "r1", 0.5), ("x", "r2", 0.9)])
    seed_run(db, "day-2", [("new", "r1", 0.5)])
    rows = review.pending(db, limit=10)
    assert [r["query_id"] for r in rows] == ["x", "old", "new"]  # equal scores: older first
    assert all(r["claimed_by"] is None for r in rows)
    review.claim(db, "alice", 1)
    rows = review.pending(db, limit=10)
    assert rows[0]["claimed_by"] == "alice" and rows[0]["claim_expires_at"] is not None
    assert rows[0]["age_seconds"] >= 0
    assert review.pending(db, limit=1, offset=1)[0]["query_id"] == "old"


def test_lease_expiry_returns_abandoned_work(db):
    _, ids = _seed(db, n=3)
    first = review.claim(db, "alice", 1)[0]
    assert review.claim(db, "bob", 1)[0]["pair_id"] != first["pair_id"]
    _expire_claims(db, first["pair_id"])
    # Expired but not yet taken over: alice may still decide it ...
    assert review.pending(db, 10)[0]["claimed_by"] is None
    took = review.claim(db, "carol", 1)[0]
    assert took["pair_id"] == first["pair_id"]  # ... until carol takes it over
    with pytest.raises(review.ClaimError, match="carol"):
        review.decide(db, first["pair_id"], "alice", "confirmed")
    review.decide(db, first["pair_id"], "carol", "rejected")
    assert _state(db, first["pair_id"]) == "rejected"


def test_expired_claim_still_counts_until_taken_over(db):
    _seed(db, n=2)
    c = review.claim(db, "alice", 1)[0]
    _expire_claims(db)
    out = review.decide(db, c["pair_id"], "alice", "confirmed", note="late but fine")
    assert out["decision"] == "confirmed"


def test_release_returns_pairs_at_once(db):
    _seed(db, n=4)
    mine = review.claim(db, "alice", 3)
    assert review.release(db, "alice", mine[0]["pair_id"]) == {"released": 1}
    assert review.release(db, "bob", mine[1]["pair_id"]) == {"released": 0}  # not bob's
    again = review.claim(db, "bob", 1)[0]
    assert again["pair_id"] == mine[0]["pair_id"]
    assert review.release(db, "alice") == {"released": 2}
    assert review.my_claims(db, "alice") == []
    assert [c["pair_id"] for c in review.my_claims(db, "bob")] == [again["pair_id"]]


def test_one_moderator_cannot_hold_the_whole_queue(db):
    """At most 50 live claims and a one-hour lease per moderator (the defaults)."""
    _, ids = _seed(db, n=120)
    for n, lease in ((1000, 86400), (1, 3601), (1, 5)):  # the whole queue for a day, and near misses
        with pytest.raises(review.ReviewInputError, match="lease must be between 10 and 3600 seconds"):
            review.claim(db, "alice", n, lease_seconds=lease)
    assert review.my_claims(db, "alice") == []
    got = review.claim(db, "alice", 1000, lease_seconds=3600)  # the count is clamped to the room left
    assert len(got) == 50 and all(c["expires_at"] <= review._now() + timedelta(seconds=3600) for c in got)
    with pytest.raises(review.ClaimLimitError, match="'alice' already holds 50 pairs"):
        review.claim(db, "alice", 1)
    free = next(i for i in ids if i not in {c["pair_id"] for c in got})
    with pytest.raises(review.ClaimLimitError, match="already holds 50 pairs"):
        review.claim_pair(db, "alice", free)
    with pytest.raises(review.ReviewInputError, match="3600"):
        review.claim_pair(db, "bob", free, lease_seconds=7200)
    review.claim_pair(db, "alice", got[1]["pair_id"])  # renewing a claim one holds needs no room
    review.decide(db, got[0]["pair_id"], "alice", "confirmed")
    assert len(review.claim(db, "alice", 10)) == 1  # room for one again
    assert len(review.claim(db, "bob", 1000)) == 50  # the cap is per moderator
    _expire_claims(db)  # an expired claim is no longer held: anyone may take it over
    assert len(review.claim(db, "alice", 60)) == 50
    assert len(review.my_claims(db, "alice")) == 50
    review.decide(db, review.my_claims(db, "alice")[0]["pair_id"], "alice", "rejected")
    assert len(review.claim(db, "alice", 5)) == 1
    # An undo hands back the pair one just decided even at the cap; it counts from then on.
    assert review.undo(db, "alice")["state"] == "pending"
    with pytest.raises(review.ClaimLimitError, match="already holds 51 pairs"):
        review.claim(db, "alice", 1)


def test_claim_limits_are_the_database_owners_to_change(db):
    if not db.is_postgres:
        pytest.skip("the embedded default has fixed limits (review.MAX_HELD_PAIRS, review.MAX_LEASE_SECONDS)")
    _seed(db, n=10)
    try:
        with db.engine.begin() as conn:
            conn.execute(text("UPDATE review_limits SET max_held_pairs = 3, max_lease_seconds = 600"))
        assert len(review.claim(db, "alice", 10)) == 3
        with pytest.raises(review.ClaimLimitError, match="3 pairs"):
            review.claim(db, "alice", 1)
        with pytest.raises(review.ReviewInputError, match="between 10 and 600 seconds"):
            review.claim(db, "bob", 1, lease_seconds=601)
        # The default lease (900 s) is lowered to the cap; a session's own lease setting cannot lift it.
        with db.engine.begin() as conn:
            conn.execute(text("SET LOCAL moderation.claim_lease_seconds = 86400"))
            [c] = conn.execute(text("SELECT expires_at - now() AS lease FROM review_claim(1, 'bob')")).all()
        assert c.lease == timedelta(seconds=600)
        with pytest.raises(DBAPIError, match="max_held_pairs"):
            with db.engine.begin() as conn:
                conn.execute(text("UPDATE review_limits SET max_held_pairs = 0"))
    finally:
        with db.engine.begin() as conn:
            conn.execute(text("UPDATE review_limits SET max_held_pairs = 50, max_lease_seconds = 3600"))


def test_claim_pair_for_a_second_look(db):
    _, ids = _seed(db, n=2)
    c = review.claim(db, "alice", 1)[0]
    with pytest.raises(review.ClaimConflictError, match="alice"):
        review.claim_pair(db, "bob", c["pair_id"])
    renewed = review.claim_pair(db, "alice", c["pair_id"])
    assert renewed["claim_id"] == c["claim_id"]
    review.decide(db, c["pair_id"], "alice", "unsure", note="can't tell")
    second = review.claim_pair(db, "bob", c["pair_id"])  # decided pairs can be claimed by id
    review.decide(db, c["pair_id"], "bob", "confirmed")
    d = review.pair_details(db, c["pair_id"])
    assert d["state"] == "confirmed" and d["decided_by"] == "bob"
    assert [h["decision"] for h in d["history"]] == ["unsure", "confirmed"]
    assert d["history"][1]["claim_id"] == second["claim_id"]
    with pytest.raises(NotFoundError):
        review.claim_pair(db, "bob", 10**9)


# -- deciding and undoing ---------------------------------------------------------------------


def test_decide_needs_a_claim_and_ends_it(db):
    _, ids = _seed(db, n=3)
    with pytest.raises(review.ClaimError, match="holds no claim"):
        review.decide(db, ids[0], "alice", "confirmed")
    c = review.claim(db, "alice", 1)[0]
    out = review.decide(db, c["pair_id"], "alice", "confirmed", note="crop of the same photo")
    assert out["pair_id"] == c["pair_id"] and out["decision_id"] > 0
    assert review.my_claims(db, "alice") == []
    with pytest.raises(review.ClaimError):
        review.decide(db, c["pair_id"], "alice", "rejected")  # the claim ended with the decision
    assert c["pair_id"] not in [r["pair_id"] for r in review.pending(db, 10)]
    log = review.decision_log(db, pair_id=c["pair_id"])
    assert [(r["moderator"], r["decision"], r["claim_id"], r["note"]) for r in log] == [
        ("alice", "confirmed", c["claim_id"], "crop of the same photo")]


def test_decide_rejects_unknown_decisions(db):
    _seed(db, n=1)
    c = review.claim(db, "alice", 1)[0]
    for bad in ("copy", "", "CONFIRMED", None, "undo"):
        with pytest.raises(review.ReviewInputError):
            review.decide(db, c["pair_id"], "alice", bad)
    assert review.decision_log(db) == []


def test_undo_takes_back_own_latest_decision_and_reclaims(db):
    _seed(db, n=3)
    c1, c2 = review.claim(db, "alice", 2)
    review.decide(db, c1["pair_id"], "alice", "confirmed")
    d2 = review.decide(db, c2["pair_id"], "alice", "rejected")
    u = review.undo(db, "alice")
    assert u["undone_id"] == d2["decision_id"] and u["pair_id"] == c2["pair_id"]
    assert u["state"] == "pending"
    assert [c["pair_id"] for c in review.my_claims(db, "alice")] == [c2["pair_id"]]
    assert c2["pair_id"] in [r["pair_id"] for r in review.pending(db, 10)]
    review.decide(db, c2["pair_id"], "alice", "confirmed")  # decide again at once
    assert _state(db, c2["pair_id"]) == "confirmed"
    # Walk back further: the latest standing one is now the re-decision, then c1.
    assert review.undo(db, "alice")["pair_id"] == c2["pair_id"]
    review.release(db, "alice")
    assert review.undo(db, "alice")["pair_id"] == c1["pair_id"]
    assert _state(db, c1["pair_id"]) == "pending"
    history = [r["decision"] for r in review.decision_log(db, moderator="alice")][::-1]
    assert history == ["confirmed", "rejected", "undo", "confirmed", "undo", "undo"]


def test_undo_is_refused_when_someone_decided_since_or_holds_it(db):
    _seed(db, n=2)
    c = review.claim(db, "alice", 1)[0]
    review.decide(db, c["pair_id"], "alice", "unsure")
    review.claim_pair(db, "bob", c["pair_id"])
    with pytest.raises(review.ClaimConflictError, match="bob"):
        review.undo(db, "alice")
    review.decide(db, c["pair_id"], "bob", "confirmed")
    with pytest.raises(review.ClaimError, match="decided again"):
        review.undo(db, "alice")
    with pytest.raises(NotFoundError, match="no decision to undo"):
        review.undo(db, "carol")
    assert _state(db, c["pair_id"]) == "confirmed"


def test_decisions_are_append_only(db):
    _seed(db, n=1)
    c = review.claim(db, "alice", 1)[0]
    review.decide(db, c["pair_id"], "alice", "confirmed")
    # Not even the database owner can rewrite the audit trail.
    for stmt in ("UPDATE review_decisions SET decision = 'rejected'", "DELETE FROM review_decisions"):
        with pytest.raises(DBAPIError, match="append-only"):
            with db.engine.begin() as conn:
                conn.execute(text(stmt))
    if db.is_postgres:
        with pytest.raises(DBAPIError, match="append-only"):
            with db.engine.begin() as conn:
                conn.execute(text("TRUNCATE review_decisions CASCADE"))
    assert len(review.decision_log(db)) == 1


def test_decided_pairs_are_immutable(db):
    _seed(db, n=2)
    c = review.claim(db, "alice", 1)[0]
    review.decide(db, c["pair_id"], "alice", "confirmed")
    pid = c["pair_id"]
    for stmt in (f"UPDATE flagged_pairs SET reference_id = 'elsewhere' WHERE id = {pid}",
                 f"UPDATE flagged_pairs SET score = 0.01, raw_score = 0.01 WHERE id = {pid}",
                 f"UPDATE flagged_pairs SET threshold = 0.99 WHERE id = {pid}",
                 f"DELETE FROM flagged_pairs WHERE id = {pid}"):
        with pytest.raises(DBAPIError, match="has a moderator's decision"):
            with db.engine.begin() as conn:
                conn.execute(text(stmt))
    with db.engine.begin() as conn:  # clearing evidence keys (pruning) and undecided pairs stay allowed
        conn.execute(text(f"UPDATE flagged_pairs SET evidence_key = NULL WHERE id = {pid}"))
        conn.execute(text(f"UPDATE flagged_pairs SET score = 0.5 WHERE id <> {pid}"))
    d = review.pair_details(db, pid)
    assert (d["reference_id"], d["state"]) == ("r1", "confirmed")


def test_state_is_derived_from_the_log(db):
    """After a mixed sequence, the queue's state equals the one recomputed from the log alone."""
    _, ids = _seed(db, n=8)
    cs = review.claim(db, "alice", 4) + review.claim(db, "bob", 4)
    for i, c in enumerate(cs):
        who = "alice" if i < 4 else "bob"
        review.decide(db, c["pair_id"], who, ["confirmed", "rejected", "unsure"][i % 3])
    review.undo(db, "alice")
    review.undo(db, "bob")
    review.decide(db, review.my_claims(db, "bob")[0]["pair_id"], "bob", "rejected")
    states = {r["pair_id"]: r["state"] for r in review.pair_states(db)}
    if db.is_postgres:
        with db.engine.connect() as conn:
            derived = dict(conn.execute(text("SELECT pair_id, state FROM review_pair_state")).all())
            cached = dict(conn.execute(text("SELECT pair_id, state FROM review_queue")).all())
        assert derived == cached == states
    stacks: dict[int, list[tuple[int, str]]] = {}
    for r in sorted(review.decision_log(db, limit=1000), key=lambda r: r["decision_id"]):
        stack = stacks.setdefault(r["pair_id"], [])
        if r["decision"] == "undo":
            assert stack and stack[-1][0] == r["undoes"]  # an undo always takes back the top
            stack.pop()
        else:
            stack.append((r["decision_id"], r["decision"]))
    expected = {p: st[-1][1] for p, st in stacks.items() if st}
    assert {p: s for p, s in states.items() if s != "pending"} == expected


# -- reading ------------------------------------------------------------------------------------


def test_pair_details_carry_full_context(db):
    seed_run(db, "day-1", [("q-old", "shared-ref", 0.7)], threshold=0.2)
    run_id = seed_run(db, "day-2", [("q-new", "shared-ref", 0.6), ("q-other", "r9", 0.5)], threshold=0.3)
    old = next(p.id for p in db.pairs() if p.query_id == "q-old")
    c = review.claim(db, "alice", 1)[0]
    assert c["pair_id"] == old
    review.decide(db, old, "alice", "confirmed", note="meme of it")
    new = next(p.id for p in db.pairs(run_id) if p.query_id == "q-new")
    d = review.pair_details(db, new)
    assert d["query_id"] == "q-new" and d["reference_id"] == "shared-ref"
    assert d["query_key"] == "queries/q-new.jpg" and d["reference_key"] == "references/shared-ref.jpg"
    assert d["score"] == pytest.approx(0.6) and d["raw_score"] == pytest.approx(1.1)
    assert (d["model_version"], d["stats_version"], d["index_version"]) == ("m1", "s1", "i1")
    assert d["batch"] == "day-2" and d["run_id"] == run_id and d["threshold"] == pytest.approx(0.3)
    assert d["run_date"] == d["run_started_at"].date()
    assert d["state"] == "pending" and d["history"] == []
    assert "evidence_key" in d and "heatmap_key" in d
    [earlier] = d["reference_decisions"]
    assert (earlier["pair_id"], earlier["decision"], earlier["moderator"], earlier["note"]) == (
        old, "confirmed", "alice", "meme of it")
    with pytest.raises(NotFoundError):
        review.pair_details(db, 10**9)


def test_each_pair_records_the_versions_that_scored_it(db):
    """A rerun with other versions re-labels only the pairs it writes, never the pairs it keeps."""
    from moderation.db import FlaggedPair

    run_id = seed_run(db, "day-1", [("q1", "r1", 0.9), ("q2", "r2", 0.8)], threshold=0.3)
    [c] = review.claim(db, "alice", 1)
    review.decide(db, c["pair_id"], "alice", "confirmed")
    seed_versions(db, "m2", "s2", "i2")
    rerun = _rerun("day-1", "m2", "s2", "i2", threshold=0.4)
    rerun.calibration_version = "cal-2"
    db.start_run(rerun)
    db.finish_run(rerun, [FlaggedPair("q2", "r2", 1.2, 0.85, 1), FlaggedPair("q3", "r3", 1.1, 0.7, 1)])
    ids = {p.query_id: p.id for p in db.pairs(run_id)}
    scored_by = {q: (d["model_version"], d["stats_version"], d["index_version"], d["calibration_version"],
                     round(d["threshold"], 6))
                 for q, d in ((q, review.pair_details(db, i)) for q, i in ids.items())}
    assert scored_by == {"q1": ("m1", "s1", "i1", None, 0.3),  # decided under the first run: kept as scored
                         "q2": ("m2", "s2", "i2", "cal-2", 0.4), "q3": ("m2", "s2", "i2", "cal-2", 0.4)}
    assert [r["query_id"] for r in review.pair_states(db, model_version="m1")] == ["q1"]
    assert sorted(r["query_id"] for r in review.pair_states(db, model_version="m2", stats_version="s2")) \
        == ["q2", "q3"]
    assert review.pair_states(db, model_version="m1")[0]["threshold"] == pytest.approx(0.3)
    [summary] = review.run_summaries(db)  # the run itself describes its latest attempt
    assert (summary["model_version"], summary["threshold"]) == ("m2", pytest.approx(0.4))


def test_summaries_per_run_and_day(db):
    r1 = seed_run(db, "day-1", [(f"a{i}", "r", 0.9 - i / 100) for i in range(5)])
    r2 = seed_run(db, "day-2", [(f"b{i}", "r", 0.5 - i / 100) for i in range(3)])
    claims = review.claim(db, "alice", 5)  # all of day-1 (higher scores)
    for c, d in zip(claims, ["confirmed", "confirmed", "confirmed", "rejected", "unsure"]):
        review.decide(db, c["pair_id"], "alice", d)
    runs = {r["run_id"]: r for r in review.run_summaries(db)}
    assert {k: runs[r1][k] for k in ("flagged", "reviewed", "confirmed", "rejected", "unsure", "pending")} == {
        "flagged": 5, "reviewed": 5, "confirmed": 3, "rejected": 1, "unsure": 1, "pending": 0}
    assert runs[r1]["observed_precision"] == pytest.approx(0.75)
    assert runs[r2]["flagged"] == 3 and runs[r2]["pending"] == 3 and runs[r2]["observed_precision"] is None
    [today] = review.daily_summaries(db)
    assert (today["flagged"], today["confirmed"], today["rejected"]) == (8, 3, 1)
    assert today["observed_precision"] == pytest.approx(0.75)


def test_rerun_of_a_batch_keeps_decided_and_drops_stale_claimed_pairs(db):
    run_id = seed_run(db, "day-1", [("q1", "r1", 0.9), ("q2", "r2", 0.8), ("q3", "r3", 0.7)])
    c = review.claim(db, "alice", 3)
    review.decide(db, c[0]["pair_id"], "alice", "confirmed")
    # The rerun flags only q3 now: q1 (decided) stays, q2 (claimed, undecided) goes, q3 stays.
    assert seed_run(db, "day-1", [("q3", "r3", 0.75)]) == run_id
    left = {p.query_id: p.score for p in db.pairs(run_id)}
    assert left == {"q1": pytest.approx(0.9), "q3": pytest.approx(0.75)}
    assert {x["pair_id"] for x in review.my_claims(db, "alice")} == {c[2]["pair_id"]}
    assert _state(db, c[0]["pair_id"]) == "confirmed"
    if db.is_postgres:  # the queue follows the new score
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT score FROM review_queue WHERE pair_id = :p"),
                                {"p": c[2]["pair_id"]}).scalar_one() == pytest.approx(0.75)


def _rerun(batch: str, model: str = "m1", stats: str = "s1", index: str = "i1", threshold: float = 0.0):
    from moderation.db import MatchRunRecord

    return MatchRunRecord(batch=batch, model_version=model, stats_version=stats, index_version=index,
                          threshold=threshold)


def test_rerun_never_rescores_a_decided_pair(db):
    """The rerun flags a decided pair again with another score: the decided pair keeps its own."""
    from moderation.db import FlaggedPair

    run_id = seed_run(db, "day-1", [("q1", "r1", 0.9), ("q2", "r2", 0.8)], threshold=0.3)
    [c] = review.claim(db, "alice", 1)
    review.decide(db, c["pair_id"], "alice", "rejected")
    review.undo(db, "alice")  # an undone decision is still part of the pair's history
    review.decide(db, c["pair_id"], "alice", "confirmed")
    seed_versions(db, "m2", "s2", "i2")
    rerun = _rerun("day-1", "m2", "s2", "i2", threshold=0.4)
    for _ in range(2):  # and again: idempotent
        db.start_run(rerun)
        db.finish_run(rerun, [FlaggedPair("q1", "r1", 0.2, 0.45, 3), FlaggedPair("q2", "r2", 1.3, 0.85, 1)])
    pairs = {p.query_id: p for p in db.pairs(run_id)}
    assert set(pairs) == {"q1", "q2"} and pairs["q1"].id == c["pair_id"]
    q1 = pairs["q1"]
    assert (q1.score, q1.raw_score, q1.rank, q1.model_version, q1.threshold) == (
        pytest.approx(0.9), pytest.approx(1.4), 1, "m1", pytest.approx(0.3))
    assert (pairs["q2"].score, pairs["q2"].model_version) == (pytest.approx(0.85), "m2")
    assert _state(db, q1.id) == "confirmed"
    assert db.run("day-1").n_flagged == 2


def test_incomplete_and_held_runs_are_not_offered(db):
    from moderation.db import FlaggedPair

    seed_run(db, "day-1", [("q1", "r1", 0.9)])
    first = _rerun("day-0")
    db.start_run(first)  # a batch's first attempt, still running: nothing of it is offered
    assert [r["query_id"] for r in review.pending(db)] == ["q1"]
    db.fail_run("day-0", "crashed")
    assert [r["query_id"] for r in review.pending(db)] == ["q1"]
    db.finish_run(first, [FlaggedPair("q0", "r0", 0.6, 0.5, 1)])
    assert len(review.pending(db)) == 2
    quality = pytest.importorskip("moderation.quality")
    if not hasattr(quality, "place_hold"):
        pytest.skip("quality hold-back not available")
    seed_run(db, "day-2", [("q2", "r2", 0.95)])
    quality.place_hold(db, "day-2", "spike", status=quality.HOLD_HELD)
    assert [r["query_id"] for r in review.pending(db)] == ["q1", "q0"]
    assert [c["query_id"] for c in review.claim(db, "alice", 5)] == ["q1", "q0"]


def test_crashed_rerun_keeps_the_last_complete_pairs_in_review(db):
    """A rerun publishes its pairs only when it completes; until then the last complete ones stay."""
    from moderation.db import FlaggedPair

    run_id = seed_run(db, "day-1", [("q1", "r1", 0.9), ("q2", "r2", 0.8), ("q3", "r3", 0.7)])
    rerun = _rerun("day-1")
    assert db.start_run(rerun) == run_id  # the rerun starts, then its process dies: never finished
    assert db.run("day-1").status == "running"
    assert [r["query_id"] for r in review.pending(db)] == ["q1", "q2", "q3"]
    [c] = review.claim(db, "alice", 1)
    review.decide(db, c["pair_id"], "alice", "confirmed")
    db.fail_run("day-1", "killed")  # a later attempt that fails is no different
    assert db.run("day-1").status == "failed"
    assert [r["query_id"] for r in review.pending(db)] == ["q2", "q3"]
    assert [c["query_id"] for c in review.claim(db, "bob", 5)] == ["q2", "q3"]
    review.release(db, "bob")
    # The next complete attempt swaps its pairs in, all at once.
    db.start_run(rerun)
    db.finish_run(rerun, [FlaggedPair("q3", "r3", 0.9, 0.75, 1), FlaggedPair("q4", "r4", 0.8, 0.6, 1)])
    assert db.run("day-1").status == "complete"
    assert [r["query_id"] for r in review.pending(db)] == ["q3", "q4"]
    assert _state(db, c["pair_id"]) == "confirmed"


# -- input checks -------------------------------------------------------------------------------


def test_bad_moderator_names_are_refused(db):
    _seed(db, n=1)
    for name in ("", "   ", "a" * 201, "tab\there", "nul\x00", "bad\udcff", "line\nbreak", 42):
        with pytest.raises(review.ReviewInputError):
            review.claim(db, name, 1)
    assert review.pending(db)[0]["claimed_by"] is None


def test_hostile_text_is_stored_verbatim(db):
    hostile = "O'Brien\"; DROP TABLE review_decisions; --"
    seed_run(db, "day-1", [("q'; DELETE FROM flagged_pairs; --", "../../etc/passwd", 0.9)])
    c = review.claim(db, hostile, 1)[0]
    assert c["query_id"] == "q'; DELETE FROM flagged_pairs; --"
    note = "looks like %s %(x)s :name $1 \\x00 ünïcødé 🙂 " + "x" * 3000
    review.decide(db, c["pair_id"], hostile, "confirmed", note=note)
    d = review.pair_details(db, c["pair_id"])
    assert d["decided_by"] == hostile and d["decision_note"] == note
    assert d["reference_id"] == "../../etc/passwd"
    with pytest.raises(review.ReviewInputError):
        review.decide(db, c["pair_id"], hostile, "confirmed", note="x" * 4001)
    with pytest.raises(review.ReviewInputError):
        review.claim(db, "alice", 0)
    with pytest.raises(review.ReviewInputError):
        review.claim(db, "alice", 1, lease_seconds=5)
    with pytest.raises(review.ReviewInputError):
        review.decide(db, -1, "alice", "confirmed")
