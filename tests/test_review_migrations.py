"""Schema changes as migrations: an existing review database upgrades in place, losing nothing.

Also runs each documented moderator statement in ``sql/queries/`` through
``psql`` against a migrated database, as a moderator would.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from review_support import fresh_pg_database, seed_run
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from moderation import review
from moderation.db import Database, migration_files, upgrade

REPO = Path(__file__).resolve().parent.parent
MIGRATIONS = REPO / "sql" / "migrations"
QUERIES = REPO / "sql" / "queries"


def test_review_migrations_are_plain_ordered_sql():
    names = [p.name for p in migration_files(MIGRATIONS)]
    assert "0002_review.sql" in names and names == sorted(names)
    for name in ("0002_review.sql", "0004_review_quality_hold.sql"):
        sql = (MIGRATIONS / name).read_text()
        # The runner sends files through a driver that reads '%' as a placeholder.
        assert "%" not in sql, name


def test_existing_database_upgrades_in_place(tmp_path):
    only_core = tmp_path / "core"
    only_core.mkdir()
    shutil.copy(MIGRATIONS / "0001_core.sql", only_core)
    with fresh_pg_database(migrate=False) as url:
        db = Database(url)
        try:
            assert upgrade(db, only_core) == ["0001_core.sql"]
            run = seed_run(db, "2024-05-01", [("qa", "r1", 0.9), ("qb", "r2", 0.8), ("qc", "r3", 0.7),
                                              ("qd", "r4", 0.6)])
            ids = {p.query_id: p.id for p in db.pairs(run)}
            with db.engine.begin() as conn:  # decisions written by an older version of the system
                for pair, moderator, decision, claim in (
                        ("qa", "ann", "confirmed", 17), ("qa", "ann", "undo", None),
                        ("qb", "bo", "rejected", 18),
                        ("qc", "ann", "confirmed", 19), ("qc", "bo", "rejected", 20), ("qc", "bo", "undo", None)):
                    conn.execute(text("INSERT INTO review_decisions (pair_id, moderator, decision, claim_id) "
                                      "VALUES (:p, :m, :d, :c)"),
                                 {"p": ids[pair], "m": moderator, "d": decision, "c": claim})
                before = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar()
                          for t in ("match_runs", "flagged_pairs", "review_decisions", "model_versions")}
            applied = upgrade(db)
            assert applied[0] == "0002_review.sql" and "0001_core.sql" not in applied
            assert upgrade(db) == []  # idempotent
            with db.engine.connect() as conn:
                after = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in before}
                assert after == before
                queue = dict(conn.execute(text("SELECT pair_id, state FROM review_queue")).all())
                derived = dict(conn.execute(text("SELECT pair_id, state FROM review_pair_state")).all())
            # Legacy undo rows take back the latest standing decision on their pair.
            assert queue == derived == {ids["qa"]: "pending", ids["qb"]: "rejected",
                                        ids["qc"]: "confirmed", ids["qd"]: "pending"}
            claimed = [c["query_id"] for c in review.claim(db, "cy", 5)]
            assert claimed == ["qa", "qd"]
            review.decide(db, ids["qa"], "cy", "rejected")
            assert review.pair_details(db, ids["qa"])["state"] == "rejected"
            with pytest.raises(DBAPIError, match="append-only"):
                with db.engine.begin() as conn:
                    conn.execute(text("DELETE FROM review_decisions"))
        finally:
            db.engine.dispose()


def _psql(url: str, file: Path, **variables: str) -> str:
    cmd = [shutil.which("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", url]
    for k, v in variables.items():
        cmd += ["-v", f"{k}={v}"]
    cmd += ["-f", str(file)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"{file.name}: {res.stderr}"
    return res.stdout


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql (the moderators' client) is not installed")
def test_documented_statements_run_in_psql():
    with fresh_pg_database() as url:
        db = Database(url)
        try:
            seed_run(db, "day-1", [("q1", "r1", 0.9), ("q2", "r1", 0.8), ("q3", "r2", 0.7)])
        finally:
            db.engine.dispose()
        libpq = url.replace("postgresql+psycopg://", "postgresql://")
        first = _psql(libpq, QUERIES / "pending.sql", limit="10").splitlines()
        assert len(first) == 3 and first[0].split("|")[3] == "q1"
        claimed = _psql(libpq, QUERIES / "claim.sql", n="2", moderator="alice").splitlines()
        assert len(claimed) == 2
        pair = claimed[0].split("|")[1]
        assert _psql(libpq, QUERIES / "my_claims.sql", moderator="alice").count("\n") == 2
        decision = _psql(libpq, QUERIES / "decide.sql", pair_id=pair, decision="confirmed",
                         note="same picture", moderator="alice").strip()
        assert decision.isdigit()
        details = _psql(libpq, QUERIES / "pair_details.sql", pair_id=pair)
        assert "confirmed" in details and "same picture" in details
        assert _psql(libpq, QUERIES / "undo.sql", moderator="alice").split("|")[1] == decision
        assert _psql(libpq, QUERIES / "release.sql", moderator="alice").strip() == "2"
        other = _psql(libpq, QUERIES / "claim_pair.sql", pair_id=pair, moderator="bob")
        assert other.split("|")[1] == pair
        _psql(libpq, QUERIES / "decide.sql", pair_id=pair, decision="rejected", note="", moderator="bob")
        log = _psql(libpq, QUERIES / "decision_log.sql", pair_id=pair).splitlines()
        assert [line.split("|")[3] for line in log] == ["rejected", "undo", "confirmed"]
        summaries = _psql(libpq, QUERIES / "summaries.sql", days="7")
        assert "day-1" in summaries
        assert len(list(QUERIES.glob("*.sql"))) == 10
