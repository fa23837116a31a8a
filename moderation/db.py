"""The review database: SQLAlchemy models and the writes the pipeline makes.

Postgres is the production database; its schema is the ordered SQL files in
``sql/migrations/`` (applied by :func:`upgrade`, recorded in
``schema_migrations``). The embedded default (SQLite) gets the same tables
from these models with ``create_all``. ``tests/test_db_schema.py`` checks
that the two agree.

The database records what the object store holds; it is never the source
of an artifact's bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (JSON, BigInteger, DateTime, Float, ForeignKey, Integer, String, Text,
                        UniqueConstraint, create_engine, delete, event, func, select, text)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from moderation.errors import ConfigError, DatabaseUnavailableError, ModerationError

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "sql" / "migrations"
_PACKAGED_MIGRATIONS = Path(__file__).resolve().parent / "sql_migrations"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class ModelVersionRow(Base):
    __tablename__ = "model_versions"
    version: Mapped[str] = mapped_column(String(200), primary_key=True)
    backbone: Mapped[str] = mapped_column(String(100))
    dim: Mapped[int] = mapped_column(Integer)
    image_size: Mapped[int] = mapped_column(Integer)
    resize_mode: Mapped[str] = mapped_column(String(20))
    source: Mapped[str] = mapped_column(String(50))
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class StatsVersionRow(Base):
    __tablename__ = "stats_versions"
    version: Mapped[str] = mapped_column(String(200), primary_key=True)
    model_version: Mapped[str] = mapped_column(ForeignKey("model_versions.version"))
    postprocess: Mapped[str] = mapped_column(String(20))
    in_dim: Mapped[int] = mapped_column(Integer)
    out_dim: Mapped[int] = mapped_column(Integer)
    n_background: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class IndexVersionRow(Base):
    __tablename__ = "index_versions"
    version: Mapped[str] = mapped_column(String(200), primary_key=True)
    model_version: Mapped[str] = mapped_column(ForeignKey("model_versions.version"))
    stats_version: Mapped[str] = mapped_column(ForeignKey("stats_versions.version"))
    count: Mapped[int] = mapped_column(Integer)
    dim: Mapped[int] = mapped_column(Integer)
    factory: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CalibrationRow(Base):
    __tablename__ = "calibrations"
    version: Mapped[str] = mapped_column(String(200), primary_key=True)
    model_version: Mapped[str] = mapped_column(ForeignKey("model_versions.version"))
    stats_version: Mapped[str] = mapped_column(ForeignKey("stats_versions.version"))
    threshold: Mapped[float] = mapped_column(Float)
    target_precision: Mapped[float] = mapped_column(Float)
    source: Mapped[str] = mapped_column(String(50))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class MatchRunRow(Base):
    """One matching run per batch (a day, a folder). A rerun of a batch updates its row.

    ``status`` is the state of the batch's latest attempt (running | complete
    | failed). ``last_complete_at`` is when an attempt last completed and
    published its pairs (None until one has): the review queue offers a
    batch's pairs from then on, whatever later attempts do, so a rerun that
    is running, failed or died never takes the published pairs out of review.
    """

    __tablename__ = "match_runs"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    batch: Mapped[str] = mapped_column(String(300), unique=True)
    status: Mapped[str] = mapped_column(String(20))  # running | complete | failed
    model_version: Mapped[str] = mapped_column(ForeignKey("model_versions.version"))
    stats_version: Mapped[str] = mapped_column(ForeignKey("stats_versions.version"))
    index_version: Mapped[str] = mapped_column(ForeignKey("index_versions.version"))
    calibration_version: Mapped[str | None] = mapped_column(String(200), nullable=True)
    threshold: Mapped[float] = mapped_column(Float)
    n_queries: Mapped[int] = mapped_column(Integer, default=0)
    n_failed: Mapped[int] = mapped_column(Integer, default=0)
    n_candidates: Mapped[int] = mapped_column(Integer, default=0)
    n_flagged: Mapped[int] = mapped_column(Integer, default=0)
    failures: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    candidates_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_complete_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Set on a retroactive run (moderation.retroactive): the batch whose queries its pairs came from.
    retro_of: Mapped[str | None] = mapped_column(String(300), nullable=True)


class FlaggedPairRow(Base):
    """A (query, reference) pair a run flagged, with the versions and threshold that scored it.

    The run row describes the batch's latest attempt; a pair kept across
    reruns (a decided one) keeps the versions of the attempt that wrote it.
    """

    __tablename__ = "flagged_pairs"
    __table_args__ = (UniqueConstraint("run_id", "query_id", "reference_id",
                                       name="flagged_pairs_run_query_reference_key"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("match_runs.id"))
    query_id: Mapped[str] = mapped_column(String(300))
    reference_id: Mapped[str] = mapped_column(String(300))
    query_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    reference_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    raw_score: Mapped[float] = mapped_column(Float)
    score: Mapped[float] = mapped_column(Float)
    rank: Mapped[int] = mapped_column(Integer)
    evidence_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    heatmap_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    model_version: Mapped[str] = mapped_column(ForeignKey("model_versions.version"))
    stats_version: Mapped[str] = mapped_column(ForeignKey("stats_versions.version"))
    index_version: Mapped[str] = mapped_column(ForeignKey("index_versions.version"))
    calibration_version: Mapped[str | None] = mapped_column(String(200), nullable=True)
    threshold: Mapped[float] = mapped_column(Float)
    # Migration 0009: null on pairs flagged before banks existed.
    bank: Mapped[str | None] = mapped_column(String(100), nullable=True)
    query_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Which signal flagged the pair (migration 0012): 'sscd' (descriptor), 'pdq' (PDQ hash), 'both'.
    match_source: Mapped[str] = mapped_column(String(8), default="sscd", server_default="sscd")
    pdq_distance: Mapped[int | None] = mapped_column(Integer, nullable=True)


class ReferenceBankRow(Base):
    """A bank the latest index build saw (migration 0009); controls may name only these."""

    __tablename__ = "reference_banks"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    n_references: Mapped[int] = mapped_column(Integer, default=0)
    index_version: Mapped[str | None] = mapped_column(String(200), nullable=True)
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ReferenceControlRow(Base):
    """Append-only log of operators' changes to banks and references (migrations 0009, 0010)."""

    __tablename__ = "reference_control_log"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    target_kind: Mapped[str] = mapped_column(String(20))  # bank | reference
    target: Mapped[str] = mapped_column(String(300))
    action: Mapped[str] = mapped_column(String(20))  # disable | enable | normal | strict | suppress
    min_inliers: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reason: Mapped[str] = mapped_column(Text)
    changed_by: Mapped[str] = mapped_column(String(200))
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ReviewDecisionRow(Base):
    """Append-only: a pair's current state is its latest decision that is not undone."""

    __tablename__ = "review_decisions"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("flagged_pairs.id"))
    moderator: Mapped[str] = mapped_column(String(200))
    decision: Mapped[str] = mapped_column(String(20))  # confirmed | rejected | unsure | undo
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    claim_id: Mapped[int | None] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), nullable=True)
    undoes: Mapped[int | None] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                               ForeignKey("review_decisions.id"), nullable=True)
    decided_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


DECISIONS = ("confirmed", "rejected", "unsure")


@dataclass(frozen=True)
class FlaggedPair:
    query_id: str
    reference_id: str
    raw_score: float
    score: float
    rank: int
    query_key: str | None = None
    reference_key: str | None = None
    evidence_key: str | None = None
    heatmap_key: str | None = None
    bank: str | None = None
    query_sha256: str | None = None
    match_source: str = "sscd"  # 'sscd', 'pdq' or 'both' (see moderation.pdq_matching)
    pdq_distance: int | None = None


@dataclass
class MatchRunRecord:
    batch: str
    model_version: str
    stats_version: str
    index_version: str
    threshold: float
    calibration_version: str | None = None
    n_queries: int = 0
    n_failed: int = 0
    n_candidates: int = 0
    failures: dict[str, Any] = field(default_factory=dict)
    candidates_key: str | None = None


class Database:
    """A connection pool to the review database and the pipeline's writes."""

    def __init__(self, url: str, *, echo: bool = False):
        self.url = url
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
            kwargs["connect_args"] = {"connect_timeout": 10}
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        event.listen(self.engine, "handle_error", self._translate_connection_errors)

    def _translate_connection_errors(self, context) -> None:
        """Turn a lost or refused connection into one clear, retryable error for the operator.

        Other database errors (constraint violations, permission denied,
        lock timeouts) pass through unchanged.
        """
        orig = context.original_exception
        refused = isinstance(context.sqlalchemy_exception, OperationalError) and context.connection is None
        if context.is_disconnect or refused:
            raise DatabaseUnavailableError(
                f"the review database ({_redact(self.url)}) is unavailable: {str(orig).strip()[:300]}. "
                "Check that it is running and MODERATION_DATABASE_URL is right, then rerun the job: "
                "reruns are idempotent.") from context.sqlalchemy_exception

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def check(self) -> None:
        """Raise ConfigError (naming MODERATION_DATABASE_URL) if the database is unreachable."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("select 1"))
        except (OperationalError, DatabaseUnavailableError) as exc:
            detail = exc.orig if isinstance(exc, OperationalError) else exc.__cause__
            raise ConfigError(
                f"cannot connect to the review database ({_redact(self.url)}): {detail}. "
                "Check that it is running and MODERATION_DATABASE_URL is right.") from None

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # -- versions -------------------------------------------------------------------------

    def record_version(self, row: Base) -> None:
        """Insert a version row unless one with its primary key exists (idempotent)."""
        with self.session() as s, s.begin():
            if s.get(type(row), row.version) is None:  # type: ignore[attr-defined]
                s.add(row)

    def record_model(self, rec) -> None:
        self.record_version(ModelVersionRow(
            version=rec.version, backbone=rec.backbone, dim=rec.dim, image_size=rec.image_size,
            resize_mode=rec.resize_mode, source=rec.source, threshold=rec.threshold,
            metrics=_jsonable(rec.metrics), created_at=_parse_ts(rec.created_at)))

    def update_model_metrics(self, version: str, metrics: dict, threshold: float | None) -> None:
        with self.session() as s, s.begin():
            row = s.get(ModelVersionRow, version)
            if row is not None:
                row.metrics = _jsonable(metrics)
                row.threshold = threshold

    def record_stats(self, rec) -> None:
        self.record_version(StatsVersionRow(
            version=rec.version, model_version=rec.model_version, postprocess=rec.postprocess,
            in_dim=rec.in_dim, out_dim=rec.out_dim, n_background=rec.n_background,
            created_at=_parse_ts(rec.created_at)))

    def record_index(self, rec) -> None:
        self.record_version(IndexVersionRow(
            version=rec.version, model_version=rec.model_version, stats_version=rec.stats_version,
            count=rec.count, dim=rec.dim, factory=rec.factory, created_at=_parse_ts(rec.created_at)))

    def record_calibration(self, rec) -> None:
        self.record_version(CalibrationRow(
            version=rec.version, model_version=rec.model_version, stats_version=rec.stats_version,
            threshold=rec.threshold, target_precision=rec.target_precision, source=rec.source,
            metrics=_jsonable(rec.metrics), created_at=_parse_ts(rec.created_at)))

    def model_versions(self) -> list[ModelVersionRow]:
        with self.session() as s:
            return list(s.scalars(select(ModelVersionRow).order_by(ModelVersionRow.created_at)))

    # -- match runs -----------------------------------------------------------------------

    def start_run(self, run: MatchRunRecord) -> int:
        """Create (or reset to ``running``) the run row of ``run.batch``; returns its id.

        Only the latest attempt's state changes: the pairs an earlier complete
        attempt published stay in review until :meth:`finish_run` replaces
        them (a rerun that never finishes leaves them as they are).
        """
        with self.session() as s, s.begin():
            row = s.scalar(select(MatchRunRow).where(MatchRunRow.batch == run.batch).with_for_update())
            if row is None:
                row = MatchRunRow(batch=run.batch, status="running")
                s.add(row)
            _fill_run(row, run)
            row.status = "running"
            row.started_at = utcnow()
            row.finished_at = None
            s.flush()
            return row.id

    def finish_run(self, run: MatchRunRecord, pairs: Sequence[FlaggedPair], chunk: int = 5000, *,
                   hold: str | None = None) -> int:
        """Write a run's flagged pairs and mark it complete, in one transaction.

        The swap is atomic: readers see the batch's previous pairs until the
        commit and the new ones from then on (``last_complete_at`` is set in
        the same transaction). Idempotent: a pair already present for the
        run (same query and reference) is updated, never duplicated; pairs
        of an earlier attempt of this batch that are no longer flagged are
        removed unless a moderator has already decided on them. A pair with
        any decision (even an undone one) is left exactly as it is, also when
        this attempt flags it again with another score: the decision stays
        with the score and versions it was made on (the database refuses to
        change it anyway). With ``hold`` (a reason), a
        ``pending`` quality hold is placed on the batch in the same
        transaction, so the new pairs are never offered before the quality
        gate has seen them, and the old ones stay offered until then.
        Returns the run id.
        """
        if hold is not None:
            from moderation import quality

            quality.ensure_holds_table(self)
        with self.session() as s, s.begin():
            row = s.scalar(select(MatchRunRow).where(MatchRunRow.batch == run.batch).with_for_update())
            if row is None:
                row = MatchRunRow(batch=run.batch, status="running")
                s.add(row)
            _fill_run(row, run)
            s.flush()
            run_id = row.id
            scored_by = _scored_by(run)
            if self.is_postgres:
                self._copy_pairs(s, run_id, pairs, scored_by)
            else:
                self._upsert_pairs(s, run_id, pairs, chunk, scored_by)
                self._delete_stale(s, run_id, pairs, chunk)
            row.n_flagged = s.scalar(select(func.count()).select_from(FlaggedPairRow)
                                     .where(FlaggedPairRow.run_id == run_id))
            if hold is not None:
                quality.write_hold(s.connection(), run.batch, hold)
            row.status = "complete"
            row.finished_at = row.last_complete_at = utcnow()
            return run_id

    _PAIR_COLUMNS = ("query_id", "reference_id", "query_key", "reference_key", "raw_score", "score",
                     "rank", "evidence_key", "heatmap_key", "bank", "query_sha256", "match_source",
                     "pdq_distance")

    def _copy_pairs(self, s: Session, run_id: int, pairs: Sequence[FlaggedPair],
                    scored_by: dict[str, Any]) -> None:
        """Postgres: COPY the pairs into a staging table, then one upsert and one stale-delete.

        About ten times faster than batched INSERTs for a large day, because
        nothing is compiled or bound per row on the client.
        """
        cols = self._PAIR_COLUMNS
        driver = s.connection().connection.driver_connection  # psycopg, in this transaction
        with driver.cursor() as cur:
            cur.execute("create temp table if not exists pairs_stage (query_id text, reference_id text, "
                        "query_key text, reference_key text, raw_score float8, score float8, rank int, "
                        "evidence_key text, heatmap_key text, bank text, query_sha256 text, match_source text, "
                        "pdq_distance int) on commit drop")
            cur.execute("truncate pairs_stage")
            with cur.copy(f"copy pairs_stage ({', '.join(cols)}) from stdin") as copy:
                for p in pairs:
                    copy.write_row(tuple(getattr(p, c) for c in cols))
            versions = tuple(scored_by)
            updates = ", ".join(f"{c} = excluded.{c}" for c in cols[2:] + versions)
            cur.execute(
                f"insert into flagged_pairs (run_id, {', '.join(cols + versions)}, created_at) "
                f"select %s, {', '.join(cols)}, {', '.join(['%s'] * len(versions))}, now() from pairs_stage "
                f"on conflict (run_id, query_id, reference_id) do update set {updates} "
                "where not exists (select 1 from review_decisions d where d.pair_id = flagged_pairs.id)",
                (run_id, *scored_by.values()))
            cur.execute(
                "delete from flagged_pairs f where f.run_id = %s "
                "and not exists (select 1 from pairs_stage n where n.query_id = f.query_id "
                "                and n.reference_id = f.reference_id) "
                "and not exists (select 1 from review_decisions d where d.pair_id = f.id)", (run_id,))

    def _delete_stale(self, s: Session, run_id: int, pairs: Sequence[FlaggedPair], chunk: int) -> None:
        keep = {(p.query_id, p.reference_id) for p in pairs}
        decided = select(ReviewDecisionRow.pair_id)
        stale = [pid for pid, q, r in s.execute(
            select(FlaggedPairRow.id, FlaggedPairRow.query_id, FlaggedPairRow.reference_id)
            .where(FlaggedPairRow.run_id == run_id, FlaggedPairRow.id.not_in(decided)))
            if (q, r) not in keep]
        for i in range(0, len(stale), chunk):
            s.execute(delete(FlaggedPairRow).where(FlaggedPairRow.id.in_(stale[i:i + chunk])))

    def _upsert_pairs(self, s: Session, run_id: int, pairs: Sequence[FlaggedPair], chunk: int,
                      scored_by: dict[str, Any]) -> None:
        if not pairs:
            return
        from sqlalchemy.dialects.sqlite import insert
        now = utcnow()
        table = FlaggedPairRow.__table__
        # Written out: SQLAlchemy does not correlate a subquery with the upsert's target row.
        undecided = text("NOT EXISTS (SELECT 1 FROM review_decisions d WHERE d.pair_id = flagged_pairs.id)")
        for i in range(0, len(pairs), chunk):
            rows = [{**asdict(p), **scored_by, "run_id": run_id, "created_at": now} for p in pairs[i:i + chunk]]
            stmt = insert(table).values(rows)
            stmt = stmt.on_conflict_do_update(
                index_elements=["run_id", "query_id", "reference_id"],
                set_={c: getattr(stmt.excluded, c) for c in
                      ("raw_score", "score", "rank", "query_key", "reference_key",
                       "evidence_key", "heatmap_key", "bank", "query_sha256", "match_source", "pdq_distance",
                       *scored_by)},
                where=undecided)
            s.execute(stmt)

    def add_retro_pairs(self, source_batch: str, run: MatchRunRecord, pairs: Sequence[FlaggedPair]) -> tuple[int, int]:
        """Add pairs found retroactively for ``source_batch`` to its retro run ``run.batch``; (run id, pairs added).

        Creates the retro run row (complete, ``retro_of`` = ``source_batch``) on
        first use. Add-only, in one transaction: a pair already in the row
        (same query and reference) is left exactly as it is, so a rerun adds
        nothing and a decision is never touched; earlier pairs stay. The row's
        versions and threshold become ``run``'s (the index searched last);
        ``n_flagged`` counts every pair of the row, the other counts are the
        last search's.
        """
        with self.session() as s, s.begin():
            row = s.scalar(select(MatchRunRow).where(MatchRunRow.batch == run.batch).with_for_update())
            if row is None:
                row = MatchRunRow(batch=run.batch, status="complete", retro_of=source_batch)
                s.add(row)
            elif row.retro_of != source_batch:
                raise ModerationError(f"run {run.batch!r} exists and is not the retroactive run of {source_batch!r}")
            _fill_run(row, run)
            s.flush()
            added = 0
            if pairs:
                insert = _dialect_insert(self.engine.dialect.name)
                rows = [{**asdict(p), **_scored_by(run), "run_id": row.id, "created_at": utcnow()} for p in pairs]
                for i in range(0, len(rows), 5000):
                    stmt = insert(FlaggedPairRow.__table__).values(rows[i:i + 5000]).on_conflict_do_nothing(
                        index_elements=["run_id", "query_id", "reference_id"]).returning(FlaggedPairRow.id)
                    added += len(s.execute(stmt).all())
            row.n_flagged = s.scalar(select(func.count()).select_from(FlaggedPairRow)
                                     .where(FlaggedPairRow.run_id == row.id))
            row.status = "complete"
            row.finished_at = row.last_complete_at = utcnow()
            return row.id, added

    def retro_runs(self) -> dict[str, MatchRunRow]:
        """Source batch -> its retroactive run row."""
        with self.session() as s:
            return {r.retro_of: r for r in s.scalars(select(MatchRunRow).where(MatchRunRow.retro_of.is_not(None)))}

    def complete_batches(self) -> list[MatchRunRow]:
        """The daily (not retroactive) runs that published pairs at least once, oldest batch first."""
        with self.session() as s:
            return list(s.scalars(select(MatchRunRow).where(MatchRunRow.retro_of.is_(None),
                                                            MatchRunRow.last_complete_at.is_not(None))
                                  .order_by(MatchRunRow.batch)))

    def fail_run(self, batch: str, message: str, failures: dict[str, Any] | None = None) -> None:
        """Mark the batch's latest attempt failed with ``message``, keeping the per-image ``failures``.

        A complete attempt is never overwritten; pairs published by an earlier
        complete attempt stay in review.
        """
        with self.session() as s, s.begin():
            row = s.scalar(select(MatchRunRow).where(MatchRunRow.batch == batch))
            if row is not None and row.status != "complete":
                row.status = "failed"
                row.failures = {**(row.failures or {}), **_jsonable(failures or {}), "error": message[:2000]}
                row.finished_at = utcnow()

    def run(self, batch: str) -> MatchRunRow | None:
        with self.session() as s:
            return s.scalar(select(MatchRunRow).where(MatchRunRow.batch == batch))

    def pairs(self, run_id: int | None = None) -> list[FlaggedPairRow]:
        with self.session() as s:
            q = select(FlaggedPairRow).order_by(FlaggedPairRow.score.desc(), FlaggedPairRow.id)
            if run_id is not None:
                q = q.where(FlaggedPairRow.run_id == run_id)
            return list(s.scalars(q))

    def flagged_counts_by_day(self, days: int = 30) -> list[tuple[str, int]]:
        """(batch, flagged count) of the most recent runs with published pairs, oldest first.

        ``n_flagged`` changes only when an attempt completes, so a batch being
        rerun still counts with its published pairs.
        """
        with self.session() as s:
            # Retroactive runs are not days: their counts say how much the references grew, not the queries.
            rows = s.execute(select(MatchRunRow.batch, MatchRunRow.n_flagged)
                             .where(MatchRunRow.last_complete_at.is_not(None), MatchRunRow.retro_of.is_(None))
                             .order_by(MatchRunRow.started_at.desc()).limit(days)).all()
        return [(b, n) for b, n in reversed(rows)]


def _fill_run(row: MatchRunRow, run: MatchRunRecord) -> None:
    row.model_version = run.model_version
    row.stats_version = run.stats_version
    row.index_version = run.index_version
    row.calibration_version = run.calibration_version
    row.threshold = run.threshold
    row.n_queries = run.n_queries
    row.n_failed = run.n_failed
    row.n_candidates = run.n_candidates
    row.failures = _jsonable(run.failures)
    row.candidates_key = run.candidates_key


def _scored_by(run: MatchRunRecord) -> dict[str, Any]:
    """What a pair written by ``run`` records about how it was scored (its flagged_pairs columns)."""
    return {"model_version": run.model_version, "stats_version": run.stats_version,
            "index_version": run.index_version, "calibration_version": run.calibration_version,
            "threshold": run.threshold}


def _dialect_insert(dialect: str):
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.close()


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str)) if obj is not None else {}


def _parse_ts(value: str | datetime | None) -> datetime:
    if isinstance(value, datetime):
        return value
    if not value:
        return utcnow()
    return datetime.fromisoformat(value)


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable url>"


def migration_files(folder: Path | None = None) -> list[Path]:
    folder = folder or (MIGRATIONS_DIR if MIGRATIONS_DIR.is_dir() else _PACKAGED_MIGRATIONS)
    return sorted(p for p in folder.glob("*.sql") if p.name[:4].isdigit())


def upgrade(db: Database, folder: Path | None = None) -> list[str]:
    """Bring the schema up to date; returns the migrations applied now.

    Postgres: applies each ``NNNN_*.sql`` not yet in ``schema_migrations``,
    in order, each in its own transaction, under an advisory lock so two
    upgrading processes never interleave. SQLite: ``create_all`` from the
    models (the embedded default has no roles or server-side functions).
    Raises ConfigError if the database is unreachable.
    """
    db.check()
    if not db.is_postgres:
        Base.metadata.create_all(db.engine)
        _sqlite_upgrade(db.engine)
        return []
    applied_now = []
    with db.engine.connect() as conn:
        conn.execute(text("select pg_advisory_lock(724411)"))
        try:
            conn.execute(text("create table if not exists schema_migrations ("
                              "name text primary key, applied_at timestamptz not null default now())"))
            conn.commit()
            done = {r[0] for r in conn.execute(text("select name from schema_migrations"))}
            conn.commit()
            for path in migration_files(folder):
                if path.name in done:
                    continue
                # psycopg reads a lone % as a placeholder even without parameters.
                sql = path.read_text().replace("%", "%%")
                with conn.begin():
                    conn.exec_driver_sql(sql)
                    conn.execute(text("insert into schema_migrations(name) values (:n)"), {"n": path.name})
                applied_now.append(path.name)
        finally:
            conn.execute(text("select pg_advisory_unlock(724411)"))
            conn.commit()
    return applied_now


# SQLite files made by an older version: create_all never adds columns to existing tables.
# (table, column, SQLite type, backfill statement or None)
_SQLITE_ADDED_COLUMNS = (
    ("match_runs", "last_complete_at", "DATETIME",
     "UPDATE match_runs SET last_complete_at = COALESCE(finished_at, started_at) "
     "WHERE status = 'complete' OR EXISTS (SELECT 1 FROM flagged_pairs fp WHERE fp.run_id = match_runs.id)"),
    *((("flagged_pairs", column, sql_type,
        f"UPDATE flagged_pairs SET {column} = (SELECT r.{column} FROM match_runs r WHERE r.id = flagged_pairs.run_id)")
       for column, sql_type in (("model_version", "VARCHAR(200)"), ("stats_version", "VARCHAR(200)"),
                                ("index_version", "VARCHAR(200)"), ("calibration_version", "VARCHAR(200)"),
                                ("threshold", "FLOAT")))),
    ("flagged_pairs", "bank", "VARCHAR(100)", None),
    ("flagged_pairs", "query_sha256", "VARCHAR(64)", None),
    ("flagged_pairs", "match_source", "VARCHAR(8) NOT NULL DEFAULT 'sscd'", None),
    ("flagged_pairs", "pdq_distance", "INTEGER", None),
    ("match_runs", "retro_of", "VARCHAR(300)", None),
)


def _sqlite_upgrade(engine: Engine) -> None:
    """Bring an existing SQLite file to the models' columns and guards (what the migrations add).

    Idempotent. Columns added here are nullable (SQLite cannot add a NOT
    NULL column without a default); the code always writes them. The
    decided-pair guard (migration 0007) is recreated each time, so it
    always covers every column of the model.
    """
    from sqlalchemy import inspect

    with engine.begin() as conn:
        insp = inspect(conn)
        for table, column, sql_type, backfill in _SQLITE_ADDED_COLUMNS:
            if column in {c["name"] for c in insp.get_columns(table)}:
                continue
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}")
            if backfill:
                conn.exec_driver_sql(backfill)
        frozen = " OR ".join(f"NEW.{c.name} IS NOT OLD.{c.name}" for c in FlaggedPairRow.__table__.columns
                             if c.name not in ("evidence_key", "heatmap_key"))
        cleared_only = " OR ".join(f"(NEW.{k} IS NOT NULL AND NEW.{k} IS NOT OLD.{k})"
                                   for k in ("evidence_key", "heatmap_key"))
        decided = "EXISTS (SELECT 1 FROM review_decisions d WHERE d.pair_id = OLD.id)"
        message = "flagged pair has a moderator''s decision: {} is not allowed (only its evidence keys may be cleared)"
        conn.exec_driver_sql("DROP TRIGGER IF EXISTS flagged_pairs_decided_no_update")
        conn.exec_driver_sql(
            f"CREATE TRIGGER flagged_pairs_decided_no_update BEFORE UPDATE ON flagged_pairs "
            f"WHEN {decided} AND ({frozen} OR {cleared_only}) "
            f"BEGIN SELECT RAISE(ABORT, '{message.format('UPDATE')}'); END")
        conn.exec_driver_sql("DROP TRIGGER IF EXISTS flagged_pairs_decided_no_delete")
        conn.exec_driver_sql(
            f"CREATE TRIGGER flagged_pairs_decided_no_delete BEFORE DELETE ON flagged_pairs WHEN {decided} "
            f"BEGIN SELECT RAISE(ABORT, '{message.format('DELETE')}'); END")


def connect(url: str, *, migrate: bool = True) -> Database:
    """Open the database at ``url`` and (by default) bring its schema up to date."""
    if not url:
        raise ConfigError("MODERATION_DATABASE_URL is empty")
    db = Database(url)
    if migrate:
        upgrade(db)
    return db


def pairs_from(items: Iterable[Any]) -> list[FlaggedPair]:
    return [FlaggedPair(**{k: getattr(i, k) for k in FlaggedPair.__dataclass_fields__}) for i in items]


__all__ = ["Database", "FlaggedPair", "MatchRunRecord", "connect", "upgrade", "ModerationError"]
