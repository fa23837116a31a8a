"""Roles on the real Postgres: what a moderator, the pipeline and a service account may and may not do."""

from __future__ import annotations

import pytest
from review_support import fresh_pg_database, login_role, seed_run, seed_versions, url_for
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, ProgrammingError

from moderation import review
from moderation.db import Database, FlaggedPair, MatchRunRecord

VIEWS = ("review_pending", "review_pair_context", "review_run_summary", "review_daily_summary",
         "review_decision_log", "review_open_claims", "review_pair_state")


@pytest.fixture(scope="module")
def admin_db():
    with fresh_pg_database() as url:
        d = Database(url)
        seed_run(d, "day-1", [(f"q{i}", f"r{i}", 0.9 - i / 100) for i in range(6)])
        yield d
        d.engine.dispose()


def _as(admin_db: Database, user: str) -> Database:
    from sqlalchemy.engine import make_url

    return Database(url_for(make_url(admin_db.url).database, user=user))


def _refused(db: Database, sql: str, params=None) -> str:
    with pytest.raises((ProgrammingError, DBAPIError)) as info:
        with db.engine.begin() as conn:
            conn.execute(text(sql), params or {})
    return str(info.value.orig)


def test_moderator_reads_views_and_writes_only_through_functions(admin_db):
    with login_role("moderation_moderator") as user:
        mod = _as(admin_db, user)
        try:
            with mod.engine.connect() as conn:
                for view in VIEWS:
                    conn.execute(text(f"SELECT * FROM {view} LIMIT 5")).all()
            # Acting as itself: the name defaults to the login.
            [c] = review.claim(mod, None, 1)
            out = review.decide(mod, c["pair_id"], None, "confirmed", note="mine")
            assert out["moderator"] == user
            assert review.decide(mod, review.claim(mod, user, 1)[0]["pair_id"], user, "rejected")
            assert review.undo(mod, user)["state"] == "pending"
            assert review.release(mod, None) == {"released": 1}
            assert review.pair_details(mod, c["pair_id"])["decided_by"] == user
            pid = c["pair_id"]
            refused = [
                "SELECT * FROM flagged_pairs",
                "SELECT * FROM review_decisions",
                f"UPDATE flagged_pairs SET score = 1 WHERE id = {pid}",
                f"DELETE FROM flagged_pairs WHERE id = {pid}",
                "UPDATE match_runs SET status = 'failed'",
                "DELETE FROM match_runs",
                "INSERT INTO review_decisions (pair_id, moderator, decision) "
                f"VALUES ({pid}, 'x', 'confirmed')",
                "UPDATE review_decisions SET decision = 'rejected'",
                "DELETE FROM review_decisions",
                "TRUNCATE flagged_pairs CASCADE",
                f"INSERT INTO review_claims (pair_id, moderator, expires_at) VALUES ({pid}, 'x', now())",
                "UPDATE review_queue SET state = 'confirmed'",
                "SELECT review_actor('someone')",
                "UPDATE review_limits SET max_held_pairs = 1000, max_lease_seconds = 86400",
                "SELECT review_claim_room('someone')",
            ]
            for sql in refused:
                assert "permission denied" in _refused(mod, sql), sql
            # Naming another moderator needs the service role.
            with pytest.raises(review.ReviewPermissionError, match="may not act as"):
                review.claim(mod, "somebody-else", 1)
        finally:
            mod.engine.dispose()
    with admin_db.engine.connect() as conn:  # nothing it tried behind the functions' back happened
        assert conn.execute(text("SELECT count(*) FROM review_decisions WHERE moderator = 'x'")).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM flagged_pairs")).scalar() == 6


def test_service_account_acts_for_named_moderators(admin_db):
    with login_role("moderation_review_service") as user:
        svc = _as(admin_db, user)
        try:
            c = review.claim(svc, "alice@example.org", 1)[0]
            review.decide(svc, c["pair_id"], "alice@example.org", "unsure")
            assert review.pair_details(svc, c["pair_id"])["decided_by"] == "alice@example.org"
            assert "permission denied" in _refused(svc, "DELETE FROM review_decisions")
        finally:
            svc.engine.dispose()


def test_pipeline_writes_runs_and_pairs_but_never_decisions(admin_db):
    with login_role("moderation_pipeline") as user:
        pipe = _as(admin_db, user)
        try:
            seed_versions(pipe, "m2", "s2", "i2")
            run = MatchRunRecord(batch="day-9", model_version="m2", stats_version="s2", index_version="i2",
                                 threshold=0.1)
            pipe.start_run(run)
            pairs = [FlaggedPair(f"p{i}", "ref", 0.9, 0.5 + i / 10, 1) for i in range(3)]
            run_id = pipe.finish_run(run, pairs)
            # Someone claims one; the rerun no longer flags it: the pipeline may remove it.
            svc_claim = review.claim_pair(admin_db, "alice", max(p.id for p in pipe.pairs(run_id)))
            assert pipe.finish_run(run, pairs[:1]) == run_id
            assert [p.query_id for p in pipe.pairs(run_id)] == ["p0"]
            assert svc_claim["pair_id"] not in [c["pair_id"] for c in review.my_claims(admin_db, "alice")]
            with pipe.engine.connect() as conn:
                for view in VIEWS:
                    conn.execute(text(f"SELECT * FROM {view} LIMIT 1")).all()
            pid = pipe.pairs(run_id)[0].id
            for sql in (
                f"INSERT INTO review_decisions (pair_id, moderator, decision) VALUES ({pid}, 'p', 'confirmed')",
                "UPDATE review_decisions SET note = 'x'",
                "DELETE FROM review_decisions",
                "DELETE FROM match_runs",
                "TRUNCATE flagged_pairs CASCADE",
                "UPDATE review_queue SET state = 'rejected'",
                "UPDATE review_limits SET max_held_pairs = 1000",
                "SELECT * FROM review_claim(1, 'p')",
                f"SELECT review_decide({pid}, 'confirmed')",
            ):
                assert "permission denied" in _refused(pipe, sql), sql
        finally:
            pipe.engine.dispose()


def test_decided_pairs_are_immutable_for_every_role(admin_db):
    """A decision stands on the pair it was made on: nobody re-points or re-scores it afterwards."""
    run_id = seed_run(admin_db, "day-10", [("d1", "ref-a", 0.95), ("d2", "ref-b", 0.9)])
    decided, undecided = sorted(p.id for p in admin_db.pairs(run_id))
    with admin_db.engine.begin() as conn:
        conn.execute(text("UPDATE flagged_pairs SET evidence_key = 'runs/x/evidence/e.jpg', "
                          "heatmap_key = 'runs/x/evidence/e.heatmap.jpg' WHERE run_id = :r"), {"r": run_id})
    review.claim_pair(admin_db, "alice", decided)
    review.decide(admin_db, decided, "alice", "confirmed")
    changes = (
        f"UPDATE flagged_pairs SET reference_id = 'ref-other', score = 0.2 WHERE id = {decided}",
        f"UPDATE flagged_pairs SET score = 0.99 WHERE id = {decided}",
        f"UPDATE flagged_pairs SET model_version = 'm1', threshold = 0.9 WHERE id = {decided}",
        f"UPDATE flagged_pairs SET evidence_key = 'runs/y/evidence/other.jpg' WHERE id = {decided}",
        f"DELETE FROM flagged_pairs WHERE id = {decided}",
    )
    before = admin_db.pairs(run_id)
    with login_role("moderation_pipeline") as user:
        pipe = _as(admin_db, user)
        try:
            for db in (pipe, admin_db):  # the pipeline, and the superuser
                for sql in changes:
                    assert "has a moderator's decision" in _refused(db, sql), sql
            # Undecided pairs stay writable, and pruning may clear a decided pair's evidence keys.
            with pipe.engine.begin() as conn:
                conn.execute(text(f"UPDATE flagged_pairs SET score = 0.85 WHERE id = {undecided}"))
                conn.execute(text("UPDATE flagged_pairs SET evidence_key = NULL, heatmap_key = NULL "
                                  f"WHERE id = {decided}"))
        finally:
            pipe.engine.dispose()
    after = {p.id: p for p in admin_db.pairs(run_id)}
    old = {p.id: p for p in before}
    assert (after[decided].reference_id, after[decided].score) == ("ref-a", pytest.approx(0.95))
    assert (after[decided].evidence_key, after[decided].heatmap_key) == (None, None)
    assert after[undecided].score == pytest.approx(0.85)
    assert old[decided].score == after[decided].score
