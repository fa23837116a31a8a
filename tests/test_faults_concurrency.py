"""Several moderators working one queue at once, on the real Postgres.

Threads and separate processes claim from the same queue with
``FOR UPDATE SKIP LOCKED``. Whatever the interleaving: no pair is held by
two moderators, every pair ends up decided exactly once, and every
decision a moderator was told about is in the log exactly once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from fault_ledger import record
from review_support import fresh_pg_database, moderator_loop, pair_ids, python_env, seed_run
from sqlalchemy import text

from moderation import review
from moderation.db import Database

SUPPORT = Path(__file__).resolve().parent / "review_support.py"


@pytest.fixture
def queue_db():
    with fresh_pg_database() as url:
        db = Database(url)
        # Many equal scores: the claim order ties, the worst case for overlapping picks.
        seed_run(db, "day-1", [(f"q{i}", f"r{i % 7}", round(0.5 + (i % 5) / 10, 2)) for i in range(240)])
        yield db
        db.engine.dispose()


def _check_log(db: Database, reported: list[list[int]]) -> None:
    with db.engine.connect() as conn:
        rows = conn.execute(text("SELECT id, pair_id, moderator, claim_id FROM review_decisions "
                                 "WHERE decision <> 'undo'")).all()
        claims = dict(conn.execute(text("SELECT id, moderator FROM review_claims")).all())
        open_claims = conn.execute(text("SELECT count(*) FROM review_claims WHERE ended_at IS NULL")).scalar()
        states = Counter(s for (s,) in conn.execute(text("SELECT state FROM review_queue")))
        derived = dict(conn.execute(text("SELECT pair_id, state FROM review_pair_state")).all())
        cached = dict(conn.execute(text("SELECT pair_id, state FROM review_queue")).all())
    per_pair = Counter(r.pair_id for r in rows)
    assert set(per_pair) == set(pair_ids(db)) and set(per_pair.values()) == {1}  # each decided once
    assert sorted(d for _, d in reported) == sorted(r.id for r in rows)  # each reported decision, once
    assert all(claims[r.claim_id] == r.moderator for r in rows)  # decided from one's own claim
    assert open_claims == 0 and states["pending"] == 0
    assert derived == cached


def test_a_second_moderator_never_waits_for_a_claim_in_progress(queue_db):
    """SKIP LOCKED: rows another session is claiming are passed over, never waited for.

    The first moderator's claim stays inside an open transaction (its rows
    locked, nothing committed); the second claims under a short lock
    timeout and must get the next pairs at once. A claim that waited on
    the locked rows would hit the lock timeout instead.
    """
    first, second = queue_db.engine.connect(), queue_db.engine.connect()
    try:
        open_claim = first.begin()
        held = first.execute(text("SELECT pair_id FROM review_claim(5, 'slow')")).scalars().all()
        assert len(held) == 5
        with second.begin():
            second.exec_driver_sql("SET LOCAL lock_timeout = '200ms'")
            second.exec_driver_sql("SET LOCAL statement_timeout = '5s'")
            started = time.monotonic()
            got = second.execute(text("SELECT pair_id FROM review_claim(5, 'quick')")).scalars().all()
            waited = time.monotonic() - started
        record("concurrent review", "a claim while another moderator's claim is still in its transaction",
               tried=1, survived=int(len(got) == 5 and not set(got) & set(held) and waited < 1.0),
               duplicated=len(set(got) & set(held)))
        assert len(got) == 5 and not set(got) & set(held)
        assert waited < 1.0, f"the second claim waited {waited:.2f}s"
        open_claim.rollback()  # the slow moderator gives up: its pairs were never claimed
        with second.begin():
            next_up = second.execute(text("SELECT pair_id FROM review_claim(5, 'late')")).scalars().all()
        assert next_up == held  # best first again, now that the rows are free
    finally:
        first.close()
        second.close()


def test_threads_never_share_a_pair(queue_db):
    results: dict[str, dict] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(name: str, seed: int) -> None:
        db = Database(queue_db.url)
        try:
            barrier.wait()
            results[name] = moderator_loop(db, name, n=3, seed=seed)
        except BaseException as exc:  # surfaced below: a thread's failure must fail the test
            errors.append(exc)
        finally:
            db.engine.dispose()

    threads = [threading.Thread(target=work, args=(f"mod{i}", i)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    claimed = [p for r in results.values() for p in r["claimed"]]
    lost, dup = 240 - len(set(claimed)), len(claimed) - len(set(claimed))
    record("concurrent review", "8 moderator threads claim and decide 240 pairs at once", tried=240,
           survived=len(set(claimed)) - dup, lost=lost, duplicated=dup)
    assert len(claimed) == len(set(claimed)) == 240  # claimed at most once, and all of them
    assert sum(1 for r in results.values() if r["claimed"]) >= 2  # they really did work side by side
    _check_log(queue_db, [d for r in results.values() for d in r["decided"]])


def test_processes_with_releases_and_expired_leases(queue_db):
    # Leave some claims abandoned (expired) by a moderator who walked away.
    gone = review.claim(queue_db, "walked-away", 20)
    with queue_db.engine.begin() as conn:
        conn.execute(text("UPDATE review_claims SET expires_at = now() - interval '1 second' "
                          "WHERE moderator = 'walked-away'"))
        conn.execute(text("UPDATE review_queue SET claim_expires_at = now() - interval '1 second' "
                          "WHERE claimed_by = 'walked-away'"))
    procs = [subprocess.Popen([sys.executable, str(SUPPORT), "moderator", queue_db.url, f"proc{i}", "4",
                               "5", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=python_env({}))
             for i in range(4)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        outs.append(json.loads(out))
    released = Counter(p for o in outs for p in o["released"])
    claimed = Counter(p for o in outs for p in o["claimed"])
    # A pair is claimed again only after whoever held it released it.
    doubled = sum(1 for p in claimed if claimed[p] > 1 + released[p])
    stranded = len({c["pair_id"] for c in gone} - set(claimed))
    record("concurrent review", "4 moderator processes, releases, 20 abandoned claims expiring",
           tried=4 + len(gone), survived=4 + len(gone) - stranded - doubled, lost=stranded, duplicated=doubled)
    assert all(claimed[p] <= 1 + released[p] for p in claimed)
    assert {c["pair_id"] for c in gone} <= set(claimed)  # abandoned work came back
    with queue_db.engine.connect() as conn:
        reasons = Counter(r for (r,) in conn.execute(text(
            "SELECT end_reason FROM review_claims WHERE moderator = 'walked-away'")))
    assert reasons == {"expired": 20}
    _check_log(queue_db, [d for o in outs for d in o["decided"]])


def test_sqlite_embedded_default_serialises_claims(tmp_path):
    """No SKIP LOCKED in SQLite: BEGIN IMMEDIATE makes claims take turns, with the same guarantee."""
    from moderation.db import upgrade

    url = f"sqlite:///{tmp_path / 'review.db'}"
    db = Database(url)
    upgrade(db)
    seed_run(db, "day-1", [(f"q{i}", "r", 0.5) for i in range(60)])
    results, errors = {}, []

    def work(name: str) -> None:
        own = Database(url)
        try:
            results[name] = moderator_loop(own, name, n=2, seed=len(name))
        except BaseException as exc:
            errors.append(exc)
        finally:
            own.engine.dispose()

    threads = [threading.Thread(target=work, args=(f"m{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    claimed = [p for r in results.values() for p in r["claimed"]]
    assert len(claimed) == len(set(claimed)) == 60
    log = review.decision_log(db, limit=1000)
    assert sorted(r["pair_id"] for r in log) == sorted(claimed)
    assert sorted(r["decision_id"] for r in log) == sorted(d for r in results.values() for _, d in r["decided"])
    db.engine.dispose()
