"""The review database on real Postgres (migrations) and on SQLite (create_all)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, inspect, select, text

from moderation.db import (Base, Database, FlaggedPair, FlaggedPairRow, MatchRunRecord, MatchRunRow, ReviewDecisionRow,
                           connect, migration_files, upgrade)
from moderation.errors import ConfigError
from moderation.registry import IndexVersion, ModelVersion, StatsVersion


@pytest.fixture(scope="module")
def pg_db(pg_url):
    db = Database(pg_url)
    yield db
    db.engine.dispose()


@pytest.fixture(params=["postgres", "sqlite"])
def db(request, tmp_path):
    if request.param == "postgres":
        database = request.getfixturevalue("pg_db")
        upgrade(database)
        yield database
        return
    database = connect(f"sqlite:///{tmp_path / 'review.db'}")
    yield database
    database.engine.dispose()


# -- migrations ---------------------------------------------------------------------------------


def test_upgrade_applies_migrations_once(pg_db):
    names = [p.name for p in migration_files()]
    assert names and names == sorted(names) and names[0].startswith("0001")
    insp = inspect(pg_db.engine)
    already = set()
    if insp.has_table("schema_migrations"):  # another test of this module migrated first
        with pg_db.engine.connect() as conn:
            already = {r[0] for r in conn.execute(text("select name from schema_migrations"))}
    first = upgrade(pg_db)
    assert first == [n for n in names if n not in already]
    assert upgrade(pg_db) == []  # idempotent
    with pg_db.engine.connect() as conn:
        recorded = [r[0] for r in conn.execute(text("select name from schema_migrations order by name"))]
    assert recorded == names
    tables = set(inspect(pg_db.engine).get_table_names())
    assert set(Base.metadata.tables) <= tables


# Known drift, tracked by test_review_decision_model_has_undoes_column below.


def _schema_problems(pg_db) -> list[str]:
    upgrade(pg_db)
    insp = inspect(pg_db.engine)
    db_tables = set(insp.get_table_names())
    problems = []
    for name, table in Base.metadata.tables.items():
        if name not in db_tables:
            problems.append(f"table {name} missing from the migrations")
            continue
        cols = {c["name"]: c for c in insp.get_columns(name)}
        model_cols = {c.name: c for c in table.columns}
        if set(cols) != set(model_cols):
            problems.append(f"{name}: migrations {sorted(cols)} vs models {sorted(model_cols)}")
        for cname, col in model_cols.items():
            if cname not in cols:
                continue
            if bool(cols[cname]["nullable"]) != bool(col.nullable):
                problems.append(f"{name}.{cname}: nullable {cols[cname]['nullable']} in SQL, {col.nullable} in model")
        pk = set(insp.get_pk_constraint(name)["constrained_columns"])
        if pk != {c.name for c in table.primary_key.columns}:
            problems.append(f"{name}: primary key {pk}")
    uniques = {tuple(u["column_names"]) for u in insp.get_unique_constraints("flagged_pairs")}
    if ("run_id", "query_id", "reference_id") not in uniques:
        problems.append("flagged_pairs lacks its (run_id, query_id, reference_id) unique constraint")
    return problems


def test_models_agree_with_migrated_postgres_schema(pg_db):
    """Same tables, columns, nullability and primary keys in the models and the migrations."""
    assert _schema_problems(pg_db) == []


def test_review_decision_model_has_undoes_column(pg_db):
    assert _schema_problems(pg_db) == []


def test_quality_holds_table_matches_its_migration(pg_db):
    from moderation.quality import HOLDS

    upgrade(pg_db)
    cols = {c["name"] for c in inspect(pg_db.engine).get_columns("quality_holds")}
    assert cols == {c.name for c in HOLDS.columns}


def test_unreachable_database_names_the_variable():
    db = Database("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(ConfigError, match="MODERATION_DATABASE_URL"):
        db.check()
    with pytest.raises(ConfigError, match="MODERATION_DATABASE_URL"):
        connect("")


def test_sqlite_create_all(tmp_path):
    db = connect(f"sqlite:///{tmp_path / 'x.db'}")
    assert upgrade(db) == []
    assert set(Base.metadata.tables) <= set(inspect(db.engine).get_table_names())
    db.engine.dispose()


# -- runs and flagged pairs ----------------------------------------------------------------------


_counter = iter(range(10_000))


def _versions(db) -> tuple[str, str, str]:
    n = next(_counter)
    m, s, i = f"m{n}", f"s{n}", f"i{n}"
    db.record_model(ModelVersion(m, "mobilenet_v2", 64, 128, "square", "trained", metrics={"uap": 0.5}))
    db.record_model(ModelVersion(m, "mobilenet_v2", 64, 128, "square", "trained"))  # idempotent
    db.record_stats(StatsVersion(s, m, "whiten", 64, 64, 100))
    db.record_index(IndexVersion(i, m, s, 10, 64, "Flat"))
    return m, s, i


def _run(db, batch, n_candidates=10):
    m, s, i = _versions(db)
    return MatchRunRecord(batch=batch, model_version=m, stats_version=s, index_version=i, threshold=0.3,
                          n_queries=5, n_candidates=n_candidates, failures={"truncated": 1})


def _pair(q, r, score, rank=1):
    return FlaggedPair(q, r, raw_score=score + 0.2, score=score, rank=rank, query_key=f"queries/{q}.jpg",
                       reference_key=f"references/{r}.jpg")


def _pairs_of(db, run_id):
    return {(p.query_id, p.reference_id): p for p in db.pairs(run_id)}


def test_record_versions_is_idempotent(db):
    m, _, _ = _versions(db)
    rows = [r for r in db.model_versions() if r.version == m]
    assert len(rows) == 1 and rows[0].metrics == {"uap": 0.5}
    db.update_model_metrics(m, {"uap": 0.7}, 0.33)
    row = [r for r in db.model_versions() if r.version == m][0]
    assert row.metrics == {"uap": 0.7} and row.threshold == 0.33


def test_finish_run_twice_gives_no_duplicates_and_updates_scores(db):
    run = _run(db, "2024-05-01")
    run_id = db.start_run(run)
    assert db.run("2024-05-01").status == "running"
    first = [_pair("q1", "r1", 0.9), _pair("q2", "r2", 0.5), _pair("q3", "r3", 0.4)]
    assert db.finish_run(run, first) == run_id
    row = db.run("2024-05-01")
    assert row.status == "complete" and row.n_flagged == 3 and row.finished_at is not None
    assert row.failures == {"truncated": 1}
    again = [_pair("q1", "r1", 0.95, rank=2), _pair("q2", "r2", 0.55), _pair("q3", "r3", 0.45)]
    assert db.finish_run(run, again) == run_id
    pairs = _pairs_of(db, run_id)
    assert len(db.pairs(run_id)) == 3
    assert pairs[("q1", "r1")].score == pytest.approx(0.95)
    assert pairs[("q1", "r1")].raw_score == pytest.approx(1.15)
    assert pairs[("q1", "r1")].rank == 2
    assert pairs[("q2", "r2")].score == pytest.approx(0.55)
    assert db.run("2024-05-01").n_flagged == 3
    # a rerun of the batch restarts the same run row
    assert db.start_run(run) == run_id and db.run("2024-05-01").status == "running"
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(MatchRunRow).where(MatchRunRow.batch == "2024-05-01")) == 1


def test_stale_undecided_pairs_removed_decided_kept(db):
    run = _run(db, "2024-05-02")
    run_id = db.finish_run(run, [_pair("q1", "r1", 0.9), _pair("q2", "r2", 0.8), _pair("q3", "r3", 0.7)])
    decided_id = _pairs_of(db, run_id)[("q2", "r2")].id
    with db.session() as s, s.begin():
        s.add(ReviewDecisionRow(pair_id=decided_id, moderator="alice", decision="confirmed"))
    # the rerun flags only q1 and a new q4: q3 (undecided) goes, q2 (decided) stays
    db.finish_run(run, [_pair("q1", "r1", 0.9), _pair("q4", "r4", 0.6)])
    pairs = _pairs_of(db, run_id)
    assert set(pairs) == {("q1", "r1"), ("q2", "r2"), ("q4", "r4")}
    assert pairs[("q2", "r2")].id == decided_id
    assert db.run("2024-05-02").n_flagged == 3
    # an empty rerun keeps only the decided pair
    db.finish_run(run, [])
    assert set(_pairs_of(db, run_id)) == {("q2", "r2")}
    assert db.run("2024-05-02").n_flagged == 1


def test_runs_are_separate_and_chunked_writes(db):
    a = _run(db, "batch-a")
    b = _run(db, "batch-b")
    many = [_pair(f"q{i}", f"r{i % 7}", 0.5 + i / 1000) for i in range(23)]
    ra = db.finish_run(a, many, chunk=5)
    rb = db.finish_run(b, many[:4], chunk=5)
    assert ra != rb
    assert len(db.pairs(ra)) == 23 and len(db.pairs(rb)) == 4
    assert db.finish_run(a, many[:10], chunk=3) == ra
    assert len(db.pairs(ra)) == 10 and db.run("batch-a").n_flagged == 10
    scores = [p.score for p in db.pairs(ra)]
    assert scores == sorted(scores, reverse=True)
    counts = dict(db.flagged_counts_by_day())
    assert counts["batch-a"] == 10 and counts["batch-b"] == 4


def test_fail_run(db):
    run = _run(db, "2024-05-03")
    db.start_run(run)
    db.fail_run("2024-05-03", "S3 unreachable " + "x" * 5000)
    row = db.run("2024-05-03")
    assert row.status == "failed" and row.failures["error"].startswith("S3 unreachable")
    assert len(row.failures["error"]) == 2000 and row.failures["truncated"] == 1
    db.finish_run(run, [_pair("q1", "r1", 0.9)])
    db.fail_run("2024-05-03", "late failure")  # a complete run is not overwritten
    assert db.run("2024-05-03").status == "complete"


def test_flagged_pair_unique_constraint_is_enforced(db):
    run = _run(db, "2024-05-04")
    run_id = db.finish_run(run, [_pair("q1", "r1", 0.9)])
    from sqlalchemy.exc import IntegrityError as SAIntegrityError

    with pytest.raises(SAIntegrityError, match="(?i)unique"):
        with db.session() as s, s.begin():
            s.add(FlaggedPairRow(run_id=run_id, query_id="q1", reference_id="r1", raw_score=1.0, score=1.0, rank=1,
                                 model_version=run.model_version, stats_version=run.stats_version,
                                 index_version=run.index_version, threshold=run.threshold))


def test_pairs_record_their_scoring_versions_and_need_them(db):
    run = _run(db, "2024-05-05")
    run.calibration_version = "cal-1"
    run_id = db.finish_run(run, [_pair("q1", "r1", 0.9)])
    [pair] = db.pairs(run_id)
    assert (pair.model_version, pair.stats_version, pair.index_version, pair.calibration_version,
            pair.threshold) == (run.model_version, run.stats_version, run.index_version, "cal-1", 0.3)
    from sqlalchemy.exc import IntegrityError as SAIntegrityError

    with pytest.raises(SAIntegrityError):  # a pair without the versions that scored it is refused
        with db.session() as s, s.begin():
            s.add(FlaggedPairRow(run_id=run_id, query_id="q2", reference_id="r2", raw_score=1.0, score=1.0, rank=1))


def test_old_sqlite_file_gains_the_new_columns(tmp_path):
    """An embedded database written by an older release: upgrade adds and backfills the columns."""
    import sqlite3

    path = tmp_path / "old.db"
    db = connect(f"sqlite:///{path}")
    run = _run(db, "2024-05-06")
    run_id = db.finish_run(run, [_pair("q1", "r1", 0.9)])
    db.engine.dispose()
    old_columns = ("id, run_id, query_id, reference_id, query_key, reference_key, raw_score, score, rank, "
                   "evidence_key, heatmap_key, created_at")
    with sqlite3.connect(path) as conn:  # back to the older release's tables
        conn.executescript(f"""
            CREATE TABLE old_pairs (id INTEGER NOT NULL PRIMARY KEY, run_id INTEGER NOT NULL REFERENCES match_runs(id),
                query_id VARCHAR(300) NOT NULL, reference_id VARCHAR(300) NOT NULL, query_key TEXT,
                reference_key TEXT, raw_score FLOAT NOT NULL, score FLOAT NOT NULL, rank INTEGER NOT NULL,
                evidence_key TEXT, heatmap_key TEXT, created_at DATETIME NOT NULL,
                CONSTRAINT flagged_pairs_run_query_reference_key UNIQUE (run_id, query_id, reference_id));
            INSERT INTO old_pairs SELECT {old_columns} FROM flagged_pairs;
            DROP TABLE flagged_pairs;
            ALTER TABLE old_pairs RENAME TO flagged_pairs;
            ALTER TABLE match_runs DROP COLUMN last_complete_at;
        """)
    db = connect(f"sqlite:///{path}")
    try:
        [pair] = db.pairs(run_id)
        assert (pair.model_version, pair.threshold) == (run.model_version, 0.3)
        assert db.run("2024-05-06").last_complete_at is not None
        assert db.finish_run(run, [_pair("q1", "r1", 0.95)]) == run_id
    finally:
        db.engine.dispose()
