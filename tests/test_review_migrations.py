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


def _migrations_up_to(tmp_path, last: str) -> Path:
    """A folder with the migrations up to and including ``last`` (an older release's schema)."""
    folder = tmp_path / f"up-to-{last}"
    folder.mkdir()
    for path in migration_files(MIGRATIONS):
        if path.name <= last:
            shutil.copy(path, folder)
    return folder


def _legacy_run(db: Database, batch: str, pairs: list[tuple[str, str, float]], status: str = "complete") -> dict:
    """A run and its pairs as an older release wrote them (0001's columns only); query_id -> pair id."""
    with db.engine.begin() as conn:
        conn.execute(text("INSERT INTO model_versions (version, backbone, dim, image_size, resize_mode, source) "
                          "VALUES ('m1', 'test', 4, 96, 'square', 'test') ON CONFLICT DO NOTHING"))
        conn.execute(text("INSERT INTO stats_versions (version, model_version, postprocess, in_dim, out_dim, "
                          "n_background) VALUES ('s1', 'm1', 'none', 4, 4, 1) ON CONFLICT DO NOTHING"))
        conn.execute(text("INSERT INTO index_versions (version, model_version, stats_version, count, dim, "
                          "factory) VALUES ('i1', 'm1', 's1', 1, 4, 'Flat') ON CONFLICT DO NOTHING"))
        run_id = conn.execute(text(
            "INSERT INTO match_runs (batch, status, model_version, stats_version, index_version, threshold, "
            "n_flagged, finished_at) VALUES (:b, :s, 'm1', 's1', 'i1', 0.0, :n, now()) RETURNING id"),
            {"b": batch, "s": status, "n": len(pairs)}).scalar_one()
        return {q: conn.execute(text(
            "INSERT INTO flagged_pairs (run_id, query_id, reference_id, raw_score, score, rank) "
            "VALUES (:run, :q, :r, :s + 0.5, :s, 1) RETURNING id"),
            {"run": run_id, "q": q, "r": r, "s": score}).scalar_one() for q, r, score in pairs}


def test_existing_database_upgrades_in_place(tmp_path):
    with fresh_pg_database(migrate=False) as url:
        db = Database(url)
        try:
            assert upgrade(db, _migrations_up_to(tmp_path, "0001_core.sql")) == ["0001_core.sql"]
            ids = _legacy_run(db, "2024-05-01", [("qa", "r1", 0.9), ("qb", "r2", 0.8), ("qc", "r3", 0.7),
                                                 ("qd", "r4", 0.6)])
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
            # Pairs written before 0006 take their run's versions as the ones that scored them.
            assert {(r["model_version"], r["stats_version"], r["index_version"]) for r in review.pair_states(db)} \
                == {("m1", "s1", "i1")}
            review.decide(db, ids["qa"], "cy", "rejected")
            assert review.pair_details(db, ids["qa"])["state"] == "rejected"
            with pytest.raises(DBAPIError, match="append-only"):
                with db.engine.begin() as conn:
                    conn.execute(text("DELETE FROM review_decisions"))
        finally:
            db.engine.dispose()


def test_a_rerun_stuck_before_the_upgrade_is_offered_again(tmp_path):
    """A batch whose rerun hung in 'running' under 0004 had all its pairs hidden; 0005 brings them back."""
    with fresh_pg_database(migrate=False) as url:
        db = Database(url)
        try:
            upgrade(db, _migrations_up_to(tmp_path, "0004_review_quality_hold.sql"))
            ids = _legacy_run(db, "2024-05-02", [(f"q{i}", f"r{i}", 0.9 - i / 100) for i in range(5)],
                              status="running")
            with db.engine.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM review_pending")).scalar() == 0
            upgrade(db)
            assert sorted(r["pair_id"] for r in review.pending(db)) == sorted(ids.values())
            assert db.run("2024-05-02").status == "running"  # the attempt's own state is left as it was
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
