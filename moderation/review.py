"""The moderators' review queue: claim, release, decide, undo, and what they read.

Postgres (production) does the work in SQL: every write goes through the
SECURITY DEFINER functions of ``sql/migrations/0002_review.sql``
(``review_claim`` ... ``review_undo``) and every read through its views
(``review_pending``, ``review_pair_context``, ...). This module is a thin
Python API over them with the same names and semantics, so the CLI, a web
front end and a moderator in ``psql`` (``sql/queries/``) see one behaviour.

SQLite (the embedded default, one machine) has no SKIP LOCKED, roles or
server functions: the same operations run here in Python inside one
``BEGIN IMMEDIATE`` transaction each, which SQLite serialises. Same
results, no concurrency beyond that.

Semantics (both backends):

- A pair is *pending* until it has a standing decision; its state is its
  latest decision that has not been undone (``confirmed`` | ``rejected`` |
  ``unsure``). Decisions are append-only; an undo is a new row that names
  the decision it takes back.
- ``claim`` takes the next N pending pairs, best first (score, then age),
  for a lease. A pair is held by at most one moderator. One moderator
  holds at most ``max_held_pairs`` pairs under live claims, each for at
  most ``max_lease_seconds`` (50 and 3600 by default: Postgres reads them
  from ``review_limits``, SQLite uses MAX_HELD_PAIRS and
  MAX_LEASE_SECONDS). A longer lease is refused (ReviewInputError); a
  claim for more pairs than the room left takes only that many, and one
  with no room left is refused (ClaimLimitError). A claim past its
  lease still lets its holder decide until someone else claims the pair.
- ``decide`` needs a claim on the pair and ends it. ``undo`` takes back the
  caller's latest standing decision and gives the pair back to the caller,
  claimed. ``release`` gives claims back unused.
- Only pairs a complete attempt of their batch published, and that the
  quality gate does not hold back, are offered for review. A rerun of the
  batch leaves them offered while it runs, fails or dies; its own pairs
  replace them when it completes.

Moderator names: 1-200 characters, no control characters. On Postgres a
database login acts as itself; naming another moderator needs the
``moderation_review_service`` role (or superuser).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import bindparam, inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.types import DateTime

from moderation.db import Database
from moderation.errors import ModerationError, NotFoundError

DECISIONS = ("confirmed", "rejected", "unsure")
STATES = ("pending",) + DECISIONS
MAX_NOTE_CHARS = 4000
MAX_CLAIM = 1000
# Claim limits of the embedded default (SQLite). Postgres reads its own from review_limits
# (migration 0008), which the database owner may change.
MAX_HELD_PAIRS = 50
MAX_LEASE_SECONDS = 3600
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ReviewError(ModerationError):
    """A review operation was refused; the message says why and what to do."""


class ClaimError(ReviewError):
    """The moderator holds no claim where one is needed, or cannot undo."""


class ClaimConflictError(ReviewError):
    """Another moderator holds the pair."""


class ClaimLimitError(ReviewError):
    """The moderator already holds as many pairs as one may; decide or release some first."""


class ReviewInputError(ReviewError, ValueError):
    """A bad argument: moderator name, decision, note, count or lease."""


class ReviewPermissionError(ReviewError, PermissionError):
    """The database user may not do this (e.g. act as another moderator)."""


# -- argument checks -------------------------------------------------------------------------


def check_moderator(moderator: str | None) -> str | None:
    """Return the moderator name stripped, or None (= the database user); raise ReviewInputError."""
    if moderator is None:
        return None
    if not isinstance(moderator, str):
        raise ReviewInputError("moderator must be a string")
    name = moderator.strip()
    if not name or len(name) > 200 or _CONTROL.search(name):
        raise ReviewInputError("invalid moderator name: 1-200 characters, no control characters")
    _utf8(name, "moderator name")
    return name


def check_decision(decision: str) -> str:
    if decision not in DECISIONS:
        raise ReviewInputError(f"decision must be one of {', '.join(DECISIONS)}, not {decision!r}")
    return decision


def check_note(note: str | None) -> str | None:
    if note is None:
        return None
    if not isinstance(note, str):
        raise ReviewInputError("note must be a string")
    if len(note) > MAX_NOTE_CHARS:
        raise ReviewInputError(f"note longer than {MAX_NOTE_CHARS} characters")
    if "\x00" in note:
        raise ReviewInputError("note contains a NUL character")
    _utf8(note, "note")
    return note


def _utf8(value: str, what: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ReviewInputError(f"{what} is not valid UTF-8 text") from None


def _pair_id(pair_id: Any) -> int:
    if isinstance(pair_id, bool) or not isinstance(pair_id, int) or pair_id < 1 or pair_id > 2**63 - 1:
        raise ReviewInputError(f"pair id must be a positive integer, not {pair_id!r}")
    return pair_id


def _lease(db: Database, lease_seconds: int | None) -> int | None:
    """The lease argument: None (the default lease) or whole seconds; raise ReviewInputError.

    SQLite's bounds are checked here (10 to MAX_LEASE_SECONDS). Postgres
    checks its own (10 to review_limits.max_lease_seconds) in the claim
    functions; here only what would not even reach them.
    """
    if lease_seconds is None:
        return None
    if isinstance(lease_seconds, bool) or not isinstance(lease_seconds, int):
        raise ReviewInputError(f"claim lease must be a whole number of seconds, not {lease_seconds!r}")
    if db.is_postgres:
        if not -2**31 <= lease_seconds < 2**31:
            raise ReviewInputError(f"claim lease of {lease_seconds} seconds is out of range")
    elif not 10 <= lease_seconds <= MAX_LEASE_SECONDS:
        raise ReviewInputError(f"claim lease must be between 10 and {MAX_LEASE_SECONDS} seconds, "
                               f"not {lease_seconds}")
    return lease_seconds


# -- Postgres plumbing -----------------------------------------------------------------------

_SQLSTATE_ERRORS: dict[str, type[ModerationError]] = {
    "P0002": NotFoundError,
    "55000": ClaimError,
    "55P03": ClaimConflictError,
    "54000": ClaimLimitError,
    "22023": ReviewInputError,
    "42501": ReviewPermissionError,
}


@contextmanager
def _pg(db: Database) -> Iterator[Connection]:
    """One transaction; review functions' errors become ReviewError subclasses with their message."""
    try:
        with db.engine.begin() as conn:
            yield conn
    except DBAPIError as exc:
        state = getattr(exc.orig, "sqlstate", None)
        cls = _SQLSTATE_ERRORS.get(state or "")
        if cls is None:
            raise
        diag = getattr(exc.orig, "diag", None)
        msg = (getattr(diag, "message_primary", None) or str(exc.orig)).strip()
        hint = getattr(diag, "message_hint", None)
        raise cls(f"{msg} ({hint})" if hint else msg) from None


def _rows(result) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in result]


_CLAIM_COLUMNS = ("claim_id", "pair_id", "run_id", "query_id", "reference_id", "score", "raw_score",
                  "evidence_key", "heatmap_key", "expires_at")


# -- SQLite plumbing -------------------------------------------------------------------------

_SQLITE_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS review_claims (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        pair_id INTEGER NOT NULL REFERENCES flagged_pairs(id) ON DELETE CASCADE,
        moderator VARCHAR(200) NOT NULL,
        claimed_at DATETIME NOT NULL,
        expires_at DATETIME NOT NULL,
        ended_at DATETIME,
        end_reason VARCHAR(20))""",
    "CREATE UNIQUE INDEX IF NOT EXISTS review_claims_one_open_idx ON review_claims (pair_id) "
    "WHERE ended_at IS NULL",
    "CREATE INDEX IF NOT EXISTS review_decisions_pair_idx2 ON review_decisions (pair_id, id)",
    "CREATE TRIGGER IF NOT EXISTS review_decisions_no_update BEFORE UPDATE ON review_decisions "
    "BEGIN SELECT RAISE(ABORT, 'review_decisions is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS review_decisions_no_delete BEFORE DELETE ON review_decisions "
    "BEGIN SELECT RAISE(ABORT, 'review_decisions is append-only'); END",
)


def ensure_schema(db: Database) -> None:
    """Make the review tables usable on SQLite (no-op on Postgres, where migration 0002 does it).

    Adds ``review_claims``, the ``review_decisions.undoes`` column and the
    append-only triggers if missing. Idempotent; cheap after the first call.
    """
    if db.is_postgres or getattr(db, "_review_schema_ready", False):
        return
    with db.engine.begin() as conn:
        cols = {c["name"] for c in inspect(conn).get_columns("review_decisions")}
        if "undoes" not in cols:
            conn.exec_driver_sql("ALTER TABLE review_decisions ADD COLUMN undoes INTEGER "
                                 "REFERENCES review_decisions(id)")
        conn.exec_driver_sql("CREATE UNIQUE INDEX IF NOT EXISTS review_decisions_undoes_idx "
                             "ON review_decisions (undoes) WHERE undoes IS NOT NULL")
        for stmt in _SQLITE_SCHEMA:
            conn.exec_driver_sql(stmt)
    db._review_schema_ready = True  # type: ignore[attr-defined]


@contextmanager
def _sqlite_write(db: Database) -> Iterator[Connection]:
    """A write transaction that holds SQLite's write lock from its first statement.

    BEGIN IMMEDIATE: a claim's read and its writes see one state, and a
    second writer waits (up to the connection timeout) instead of failing
    half way.
    """
    ensure_schema(db)
    with db.engine.connect() as conn:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.rollback()
            raise
        conn.commit()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _ts(name: str):
    return bindparam(name, type_=DateTime(timezone=True))


def _aware(value: Any) -> Any:
    """SQLite hands timestamps back naive (they are stored as UTC): make them aware."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def _holds_clause(conn: Connection) -> str:
    if inspect(conn).has_table("quality_holds"):
        return ("AND NOT EXISTS (SELECT 1 FROM quality_holds h "
                "WHERE h.batch = r.batch AND h.status <> 'released')")
    return ""


def _sqlite_states(conn: Connection, pair_ids: Iterable[int] | None = None) -> dict[int, dict[str, Any]]:
    """pair_id -> its standing decision row (absent: pending), derived from the log."""
    rows = conn.execute(text(
        "SELECT id, pair_id, moderator, decision, note, claim_id, undoes, decided_at "
        "FROM review_decisions ORDER BY id")).all()
    undone = {r.undoes for r in rows if r.undoes is not None}
    wanted = None if pair_ids is None else set(pair_ids)
    out: dict[int, dict[str, Any]] = {}
    for r in rows:  # ascending id: the last standing one wins
        if r.decision == "undo" or r.id in undone:
            continue
        if wanted is not None and r.pair_id not in wanted:
            continue
        out[r.pair_id] = {**dict(r._mapping), "decided_at": _aware(r.decided_at)}
    return out


def _sqlite_open_claims(conn: Connection) -> dict[int, dict[str, Any]]:
    rows = conn.execute(text(
        "SELECT id, pair_id, moderator, claimed_at, expires_at FROM review_claims WHERE ended_at IS NULL")).all()
    return {r.pair_id: {**dict(r._mapping), "expires_at": _aware(r.expires_at),
                        "claimed_at": _aware(r.claimed_at)} for r in rows}


_SQLITE_PAIRS = """
SELECT fp.id AS pair_id, fp.run_id, r.batch, fp.query_id, fp.reference_id, fp.query_key,
       fp.reference_key, fp.raw_score, fp.score, fp.rank, fp.evidence_key, fp.heatmap_key,
       fp.created_at AS flagged_at, r.status AS run_status, r.started_at AS run_started_at,
       r.finished_at AS run_finished_at, fp.threshold, fp.model_version, fp.stats_version,
       fp.index_version, fp.calibration_version, fp.match_source, fp.pdq_distance
FROM flagged_pairs fp JOIN match_runs r ON r.id = fp.run_id
"""


def _sqlite_visible_pairs(conn: Connection) -> list[dict[str, Any]]:
    rows = conn.execute(text(_SQLITE_PAIRS + " WHERE r.last_complete_at IS NOT NULL " + _holds_clause(conn)))
    out = []
    for r in rows:
        d = dict(r._mapping)
        d["flagged_at"] = _aware(d["flagged_at"])
        out.append(d)
    out.sort(key=lambda d: (-d["score"], d["flagged_at"], d["pair_id"]))
    return out


def _claim_dict(claim_id: int, expires_at: datetime, pair: dict[str, Any]) -> dict[str, Any]:
    return {"claim_id": claim_id, **{k: pair[k] for k in _CLAIM_COLUMNS[1:-1]}, "expires_at": expires_at}


def _lease_td(lease_seconds: int | None) -> timedelta:
    from moderation.config import Settings

    return timedelta(seconds=lease_seconds if lease_seconds is not None
                     else Settings.claim_lease_seconds)


def _insert_claim(conn: Connection, pair_id: int, who: str, now: datetime, expires: datetime) -> int:
    return conn.execute(text(
        "INSERT INTO review_claims (pair_id, moderator, claimed_at, expires_at) "
        "VALUES (:p, :m, :now, :exp) RETURNING id").bindparams(_ts("now"), _ts("exp")),
        {"p": pair_id, "m": who, "now": now, "exp": expires}).scalar_one()


def _end_claims(conn: Connection, where: str, params: dict, reason: str, now: datetime) -> int:
    return conn.execute(text(
        f"UPDATE review_claims SET ended_at = :now, end_reason = :reason WHERE ended_at IS NULL AND {where}")
        .bindparams(_ts("now")), {**params, "now": now, "reason": reason}).rowcount


def _sqlite_room(claims: dict[int, dict[str, Any]], who: str, now: datetime) -> int:
    """How many more pairs ``who`` may claim (SQLite); raise ClaimLimitError when none."""
    held = sum(1 for c in claims.values() if c["moderator"] == who and c["expires_at"] > now)
    if held >= MAX_HELD_PAIRS:
        raise ClaimLimitError(f"moderator {who!r} already holds {held} pairs, the most one may hold at a "
                              f"time is {MAX_HELD_PAIRS} (decide or release some first)")
    return MAX_HELD_PAIRS - held


def _sqlite_who(moderator: str | None) -> str:
    if moderator is None:
        raise ReviewInputError("name the moderator (the embedded database has no login users)")
    return moderator


# -- the operations ---------------------------------------------------------------------------


def claim(db: Database, moderator: str | None, n: int = 10, *,
          lease_seconds: int | None = None) -> list[dict[str, Any]]:
    """Claim the next ``n`` pending pairs for ``moderator``; returns the claims made, best first.

    Each claim: claim_id, pair_id, run_id, query_id, reference_id, score,
    raw_score, evidence_key, heatmap_key, expires_at. Fewer than ``n`` (or
    none) when the queue has fewer unclaimed pairs, or when the moderator
    may hold fewer more pairs (the cap counts their live claims; expired
    ones no longer count). Pairs other sessions are claiming at the same
    moment are skipped, never waited for and never double-claimed.
    ``lease_seconds`` defaults to the database setting
    ``moderation.claim_lease_seconds`` (Postgres) or 900.

    Raises ReviewInputError for a bad name, ``n`` outside 1..1000 or a lease
    outside 10 s..the lease cap; ClaimLimitError when the moderator already
    holds as many pairs as the cap allows.
    """
    who = check_moderator(moderator)
    lease = _lease(db, lease_seconds)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CLAIM:
        raise ReviewInputError(f"claim between 1 and {MAX_CLAIM} pairs at a time")
    if db.is_postgres:
        with _pg(db) as conn:
            return _rows(conn.execute(text("SELECT * FROM review_claim(:n, :who, :lease)"),
                                      {"n": n, "who": who, "lease": lease}))
    who = _sqlite_who(who)
    with _sqlite_write(db) as conn:
        now = _now()
        states = _sqlite_states(conn)
        claims = _sqlite_open_claims(conn)
        n = min(n, _sqlite_room(claims, who, now))
        picked = []
        for pair in _sqlite_visible_pairs(conn):
            if pair["pair_id"] in states:
                continue
            c = claims.get(pair["pair_id"])
            if c is not None and c["expires_at"] > now:
                continue
            picked.append(pair)
            if len(picked) == n:
                break
        out = []
        expires = now + _lease_td(lease)
        for pair in picked:
            _end_claims(conn, "pair_id = :p", {"p": pair["pair_id"]}, "expired", now)
            cid = _insert_claim(conn, pair["pair_id"], who, now, expires)
            out.append(_claim_dict(cid, expires, pair))
        return out


def claim_pair(db: Database, moderator: str | None, pair_id: int, *,
               lease_seconds: int | None = None) -> dict[str, Any]:
    """Claim one named pair (any state), or renew one's own claim on it.

    Raises ClaimConflictError if another moderator holds an unexpired claim,
    ClaimLimitError if the moderator already holds as many pairs as the cap
    allows (renewing a live claim of one's own needs no room),
    NotFoundError if there is no such pair, ReviewInputError for a lease
    outside 10 s..the lease cap.
    """
    who = check_moderator(moderator)
    pair_id = _pair_id(pair_id)
    lease = _lease(db, lease_seconds)
    if db.is_postgres:
        with _pg(db) as conn:
            return _rows(conn.execute(text("SELECT * FROM review_claim_pair(:p, :who, :lease)"),
                                      {"p": pair_id, "who": who, "lease": lease}))[0]
    who = _sqlite_who(who)
    with _sqlite_write(db) as conn:
        now = _now()
        pair = _sqlite_pair(conn, pair_id)
        c = _sqlite_open_claims(conn).get(pair_id)
        if c is not None and c["moderator"] != who and c["expires_at"] > now:
            raise ClaimConflictError(f"pair {pair_id} is claimed by {c['moderator']!r} until {c['expires_at']}")
        if not (c is not None and c["moderator"] == who and c["expires_at"] > now):
            _sqlite_room(_sqlite_open_claims(conn), who, now)
        expires = now + _lease_td(lease)
        if c is not None and c["moderator"] == who:
            conn.execute(text("UPDATE review_claims SET expires_at = :exp WHERE id = :id")
                         .bindparams(_ts("exp")), {"exp": expires, "id": c["id"]})
            return _claim_dict(c["id"], expires, pair)
        _end_claims(conn, "pair_id = :p", {"p": pair_id}, "expired", now)
        return _claim_dict(_insert_claim(conn, pair_id, who, now, expires), expires, pair)


def release(db: Database, moderator: str | None, pair_ids: int | Iterable[int] | None = None) -> dict[str, Any]:
    """Give back ``moderator``'s claims on ``pair_ids`` (all of them when None).

    Returns ``{"released": count}``; pairs the moderator does not hold are ignored.
    """
    who = check_moderator(moderator)
    ids = None if pair_ids is None else ([_pair_id(pair_ids)] if isinstance(pair_ids, int)
                                         else [_pair_id(p) for p in pair_ids])
    if db.is_postgres:
        with _pg(db) as conn:
            n = conn.execute(text("SELECT review_release(CAST(:ids AS bigint[]), :who)"),
                             {"ids": ids, "who": who}).scalar_one()
        return {"released": n}
    who = _sqlite_who(who)
    with _sqlite_write(db) as conn:
        now = _now()
        if ids is None:
            n = _end_claims(conn, "moderator = :m", {"m": who}, "released", now)
        else:
            n = sum(_end_claims(conn, "moderator = :m AND pair_id = :p", {"m": who, "p": p}, "released", now)
                    for p in ids)
        return {"released": n}


def decide(db: Database, pair_id: int, moderator: str | None, decision: str,
           note: str | None = None) -> dict[str, Any]:
    """Record ``decision`` (confirmed | rejected | unsure) on a pair ``moderator`` holds.

    Returns ``{"decision_id", "pair_id", "decision", "moderator"}``. Raises
    ClaimError if the moderator holds no claim on the pair (never claimed,
    released, or taken over by someone else after the lease ran out),
    NotFoundError for an unknown pair, ReviewInputError for a bad decision
    or note.
    """
    who = check_moderator(moderator)
    pair_id = _pair_id(pair_id)
    decision = check_decision(decision)
    note = check_note(note)
    if db.is_postgres:
        with _pg(db) as conn:
            did = conn.execute(text("SELECT review_decide(:p, :d, :note, :who)"),
                               {"p": pair_id, "d": decision, "note": note, "who": who}).scalar_one()
            who = who or conn.execute(text("SELECT session_user")).scalar_one()
        return {"decision_id": did, "pair_id": pair_id, "decision": decision, "moderator": who}
    who = _sqlite_who(who)
    with _sqlite_write(db) as conn:
        now = _now()
        _sqlite_pair(conn, pair_id)
        c = _sqlite_open_claims(conn).get(pair_id)
        if c is None or c["moderator"] != who:
            held = f" (it is claimed by {c['moderator']!r})" if c else ""
            raise ClaimError(f"moderator {who!r} holds no claim on pair {pair_id}{held}; claim it first")
        did = conn.execute(text(
            "INSERT INTO review_decisions (pair_id, moderator, decision, note, claim_id, decided_at) "
            "VALUES (:p, :m, :d, :note, :c, :now) RETURNING id").bindparams(_ts("now")),
            {"p": pair_id, "m": who, "d": decision, "note": note, "c": c["id"], "now": now}).scalar_one()
        _end_claims(conn, "id = :id", {"id": c["id"]}, "decided", now)
        return {"decision_id": did, "pair_id": pair_id, "decision": decision, "moderator": who}


def undo(db: Database, moderator: str | None, *, lease_seconds: int | None = None) -> dict[str, Any]:
    """Take back ``moderator``'s latest standing decision; the pair comes back claimed by them.

    Returns ``{"undo_id", "undone_id", "pair_id", "claim_id", "state"}``
    (``state``: the pair's state afterwards, usually ``pending``). Raises
    NotFoundError when there is nothing to undo, ClaimError when the pair
    was decided again since, ClaimConflictError when someone holds it,
    ReviewInputError for a lease outside 10 s..the lease cap. The claim it
    hands back is not refused by the cap on held pairs (it is one pair the
    moderator decided), but it counts towards it from then on.
    """
    who = check_moderator(moderator)
    lease = _lease(db, lease_seconds)
    if db.is_postgres:
        with _pg(db) as conn:
            return _rows(conn.execute(text("SELECT * FROM review_undo(:who, :lease)"),
                                      {"who": who, "lease": lease}))[0]
    who = _sqlite_who(who)
    with _sqlite_write(db) as conn:
        now = _now()
        rows = conn.execute(text(
            "SELECT d.id, d.pair_id FROM review_decisions d WHERE d.moderator = :m AND d.decision <> 'undo' "
            "AND NOT EXISTS (SELECT 1 FROM review_decisions u WHERE u.undoes = d.id) "
            "ORDER BY d.id DESC LIMIT 1"), {"m": who}).all()
        if not rows:
            raise NotFoundError(f"moderator {who!r} has no decision to undo")
        prev_id, pair_id = rows[0]
        standing = _sqlite_states(conn, [pair_id]).get(pair_id)
        if standing is None or standing["id"] != prev_id:
            raise ClaimError(f"cannot undo decision {prev_id} on pair {pair_id}: the pair has been "
                             "decided again since (the later decision must be undone by whoever made it)")
        c = _sqlite_open_claims(conn).get(pair_id)
        if c is not None and c["moderator"] != who and c["expires_at"] > now:
            raise ClaimConflictError(f"cannot undo: pair {pair_id} is claimed by {c['moderator']!r}")
        if c is not None:
            _end_claims(conn, "id = :id", {"id": c["id"]}, "released" if c["moderator"] == who else "expired", now)
        cid = _insert_claim(conn, pair_id, who, now, now + _lease_td(lease))
        uid = conn.execute(text(
            "INSERT INTO review_decisions (pair_id, moderator, decision, note, claim_id, undoes, decided_at) "
            "VALUES (:p, :m, 'undo', NULL, :c, :u, :now) RETURNING id").bindparams(_ts("now")),
            {"p": pair_id, "m": who, "c": cid, "u": prev_id, "now": now}).scalar_one()
        after = _sqlite_states(conn, [pair_id]).get(pair_id)
        return {"undo_id": uid, "undone_id": prev_id, "pair_id": pair_id, "claim_id": cid,
                "state": after["decision"] if after else "pending"}


def my_claims(db: Database, moderator: str | None) -> list[dict[str, Any]]:
    """``moderator``'s open claims, best first (expired ones included until taken over)."""
    who = check_moderator(moderator)
    if db.is_postgres:
        with _pg(db) as conn:
            return _rows(conn.execute(text("SELECT * FROM review_my_claims(:who)"), {"who": who}))
    who = _sqlite_who(who)
    ensure_schema(db)
    with db.engine.connect() as conn:
        claims = {pid: c for pid, c in _sqlite_open_claims(conn).items() if c["moderator"] == who}
        pairs = [p for p in _sqlite_all_pairs(conn) if p["pair_id"] in claims]
    pairs.sort(key=lambda d: (-d["score"], d["flagged_at"], d["pair_id"]))
    return [_claim_dict(claims[p["pair_id"]]["id"], claims[p["pair_id"]]["expires_at"], p) for p in pairs]


# -- reading ----------------------------------------------------------------------------------


def pending(db: Database, limit: int = 20, offset: int = 0) -> list[dict[str, Any]]:
    """Pending pairs, best first: the ``review_pending`` view (claimed ones show who holds them)."""
    limit, offset = max(0, int(limit)), max(0, int(offset))
    if db.is_postgres:
        with _pg(db) as conn:
            rows = _rows(conn.execute(text("SELECT * FROM review_pending LIMIT :l OFFSET :o"),
                                      {"l": limit, "o": offset}))
        for r in rows:
            r["age_seconds"] = r.pop("age").total_seconds()
        return rows
    ensure_schema(db)
    with db.engine.connect() as conn:
        now = _now()
        states = _sqlite_states(conn)
        claims = _sqlite_open_claims(conn)
        out = []
        for p in _sqlite_visible_pairs(conn):
            if p["pair_id"] in states:
                continue
            c = claims.get(p["pair_id"])
            live = c is not None and c["expires_at"] > now
            out.append({k: p[k] for k in ("pair_id", "run_id", "batch", "query_id", "reference_id", "score",
                                          "raw_score", "rank", "flagged_at")}
                       | {"age_seconds": (now - p["flagged_at"]).total_seconds(),
                          "claimed_by": c["moderator"] if live else None,
                          "claim_expires_at": c["expires_at"] if live else None,
                          "evidence_key": p["evidence_key"], "heatmap_key": p["heatmap_key"]})
        return out[offset:offset + limit]


def pair_details(db: Database, pair_id: int) -> dict[str, Any]:
    """Everything about one pair (the ``review_pair_context`` view).

    Keys: ids and object keys of query and reference, raw and normalised
    score, rank, run (id, batch, date, status of its latest attempt), the
    threshold and the model, statistics, index and calibration versions
    that scored the pair (the pair's own: a rerun with other versions does
    not change them on a pair it keeps), evidence and heatmap keys, state and the
    standing decision, who holds a claim, ``history`` (every decision on the
    pair, undo rows included) and ``reference_decisions`` (standing
    decisions on other pairs with the same reference). Raises NotFoundError.
    """
    pair_id = _pair_id(pair_id)
    if db.is_postgres:
        with _pg(db) as conn:
            rows = _rows(conn.execute(text("SELECT * FROM review_pair_context WHERE pair_id = :p"),
                                      {"p": pair_id}))
        if not rows:
            raise NotFoundError(f"no flagged pair {pair_id}")
        return rows[0]
    ensure_schema(db)
    with db.engine.connect() as conn:
        p = _sqlite_pair(conn, pair_id)
        states = _sqlite_states(conn)
        now = _now()
        c = _sqlite_open_claims(conn).get(pair_id)
        live = c is not None and c["expires_at"] > now
        cur = states.get(pair_id)
        history = [{"decision_id": r.id, "moderator": r.moderator, "decision": r.decision, "note": r.note,
                    "claim_id": r.claim_id, "undoes": r.undoes, "decided_at": _aware(r.decided_at)}
                   for r in conn.execute(text(
                       "SELECT id, moderator, decision, note, claim_id, undoes, decided_at "
                       "FROM review_decisions WHERE pair_id = :p ORDER BY id"), {"p": pair_id})]
        others = conn.execute(text("SELECT id, run_id, query_id, score FROM flagged_pairs "
                                   "WHERE reference_id = :r AND id <> :p"),
                              {"r": p["reference_id"], "p": pair_id}).all()
        ref_decisions = sorted(
            ({"pair_id": o.id, "run_id": o.run_id, "query_id": o.query_id, "score": o.score,
              "decision": states[o.id]["decision"], "moderator": states[o.id]["moderator"],
              "note": states[o.id]["note"], "decided_at": states[o.id]["decided_at"],
              "_id": states[o.id]["id"]} for o in others if o.id in states), key=lambda d: d["_id"])
        for d in ref_decisions:
            d.pop("_id")
    started = _aware(p["run_started_at"])
    return {**{k: v for k, v in p.items() if k not in ("run_started_at", "run_finished_at", "flagged_at")},
            "run_date": started.date() if started else None, "run_started_at": started,
            "run_finished_at": _aware(p["run_finished_at"]), "flagged_at": _aware(p["flagged_at"]),
            "state": cur["decision"] if cur else "pending",
            "current_decision": cur["decision"] if cur else None,
            "decided_by": cur["moderator"] if cur else None,
            "decided_at": cur["decided_at"] if cur else None,
            "decision_note": cur["note"] if cur else None,
            "claimed_by": c["moderator"] if live else None,
            "claim_expires_at": c["expires_at"] if live else None,
            "history": history, "reference_decisions": ref_decisions}


def _sqlite_pair(conn: Connection, pair_id: int) -> dict[str, Any]:
    row = conn.execute(text(_SQLITE_PAIRS + " WHERE fp.id = :p"), {"p": pair_id}).first()
    if row is None:
        raise NotFoundError(f"no flagged pair {pair_id}")
    d = dict(row._mapping)
    d["flagged_at"] = _aware(d["flagged_at"])
    return d


def _sqlite_all_pairs(conn: Connection) -> list[dict[str, Any]]:
    out = []
    for r in conn.execute(text(_SQLITE_PAIRS)):
        d = dict(r._mapping)
        d["flagged_at"] = _aware(d["flagged_at"])
        out.append(d)
    return out


def _summarise(states: Iterable[str]) -> dict[str, Any]:
    counts = {s: 0 for s in STATES}
    for s in states:
        counts[s] += 1
    judged = counts["confirmed"] + counts["rejected"]
    return {"flagged": sum(counts.values()),
            "reviewed": counts["confirmed"] + counts["rejected"] + counts["unsure"],
            "confirmed": counts["confirmed"], "rejected": counts["rejected"], "unsure": counts["unsure"],
            "pending": counts["pending"],
            "observed_precision": counts["confirmed"] / judged if judged else None}


def run_summaries(db: Database, limit: int = 30) -> list[dict[str, Any]]:
    """Per match run, newest first: flagged, reviewed, confirmed, rejected, unsure, pending,
    observed precision (confirmed / (confirmed + rejected); None before any such decision)."""
    if db.is_postgres:
        with _pg(db) as conn:
            return _rows(conn.execute(text(
                "SELECT * FROM review_run_summary ORDER BY started_at DESC, run_id DESC LIMIT :l"),
                {"l": int(limit)}))
    ensure_schema(db)
    with db.engine.connect() as conn:
        states = _sqlite_states(conn)
        runs = conn.execute(text(
            "SELECT id, batch, status, started_at, finished_at, threshold, model_version, stats_version, "
            "index_version FROM match_runs ORDER BY started_at DESC, id DESC LIMIT :l"), {"l": int(limit)}).all()
        pairs = conn.execute(text("SELECT id, run_id FROM flagged_pairs")).all()
    by_run: dict[int, list[str]] = {}
    for pid, rid in pairs:
        by_run.setdefault(rid, []).append(states[pid]["decision"] if pid in states else "pending")
    return [{"run_id": r.id, "batch": r.batch, "status": r.status, "started_at": _aware(r.started_at),
             "finished_at": _aware(r.finished_at), "threshold": r.threshold, "model_version": r.model_version,
             "stats_version": r.stats_version, "index_version": r.index_version,
             **_summarise(by_run.get(r.id, []))} for r in runs]


def daily_summaries(db: Database, days: int = 30) -> list[dict[str, Any]]:
    """Per UTC day on which pairs were flagged, newest first, with the same counts as run_summaries."""
    if db.is_postgres:
        with _pg(db) as conn:
            return _rows(conn.execute(text("SELECT * FROM review_daily_summary ORDER BY day DESC LIMIT :l"),
                                      {"l": int(days)}))
    ensure_schema(db)
    with db.engine.connect() as conn:
        states = _sqlite_states(conn)
        pairs = conn.execute(text("SELECT id, created_at FROM flagged_pairs")).all()
    by_day: dict[Any, list[str]] = {}
    for pid, created in pairs:
        by_day.setdefault(_aware(created).astimezone(timezone.utc).date(), []).append(
            states[pid]["decision"] if pid in states else "pending")
    return [{"day": day, **_summarise(s)} for day, s in sorted(by_day.items(), reverse=True)[:int(days)]]


def decision_log(db: Database, *, pair_id: int | None = None, moderator: str | None = None,
                 limit: int = 100) -> list[dict[str, Any]]:
    """The audit trail, newest first: who decided what, when, from which claim, and undos."""
    clauses, params = [], {"l": int(limit)}
    if pair_id is not None:
        clauses.append("pair_id = :p")
        params["p"] = _pair_id(pair_id)
    if moderator is not None:
        clauses.append("moderator = :m")
        params["m"] = check_moderator(moderator)
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    if db.is_postgres:
        with _pg(db) as conn:
            return _rows(conn.execute(text(
                f"SELECT * FROM review_decision_log {where} ORDER BY decision_id DESC LIMIT :l"), params))
    ensure_schema(db)
    with db.engine.connect() as conn:
        rows = _rows(conn.execute(text(
            "SELECT id AS decision_id, pair_id, moderator, decision, note, claim_id, undoes, decided_at "
            f"FROM review_decisions {where} ORDER BY id DESC LIMIT :l"), params))
    for r in rows:
        r["decided_at"] = _aware(r["decided_at"])
    return rows


def pair_states(db: Database, *, model_version: str | None = None, stats_version: str | None = None,
                states: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Every flagged pair with its state, standing decision and scoring versions (for feedback and pruning).

    Keys: pair_id, run_id, batch, query_id, reference_id, query_key,
    reference_key, score, raw_score, evidence_key, heatmap_key, flagged_at,
    threshold, model_version, stats_version, index_version,
    calibration_version, match_source, pdq_distance, state, decision_id,
    decided_by, decided_at, note.
    The threshold and versions are those that scored the pair, and
    ``model_version`` / ``stats_version`` filter on them. Includes pairs of
    any run status (pairs only exist once their run completed at least once).
    """
    wanted = None if states is None else set(states)
    if wanted is not None and not wanted <= set(STATES):
        raise ReviewInputError(f"states must be among {STATES}")
    clauses, params = [], {}
    if model_version is not None:
        clauses.append("fp.model_version = :mv")
        params["mv"] = model_version
    if stats_version is not None:
        clauses.append("fp.stats_version = :sv")
        params["sv"] = stats_version
    cols = ("fp.id AS pair_id, fp.run_id, r.batch, fp.query_id, fp.reference_id, fp.query_key, "
            "fp.reference_key, fp.score, fp.raw_score, fp.evidence_key, fp.heatmap_key, "
            "fp.created_at AS flagged_at, fp.threshold, fp.model_version, fp.stats_version, fp.index_version, "
            "fp.calibration_version, fp.match_source, fp.pdq_distance")
    if db.is_postgres:
        if wanted is not None:
            clauses.append("q.state = ANY(:states)")
            params["states"] = sorted(wanted)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        with _pg(db) as conn:
            return _rows(conn.execute(text(
                f"SELECT {cols}, q.state, d.id AS decision_id, d.moderator AS decided_by, d.decided_at, "
                "d.note FROM flagged_pairs fp JOIN match_runs r ON r.id = fp.run_id "
                "JOIN review_queue q ON q.pair_id = fp.id "
                f"LEFT JOIN review_decisions d ON d.id = q.decision_id {where} ORDER BY fp.id"), params))
    ensure_schema(db)
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    with db.engine.connect() as conn:
        standing = _sqlite_states(conn)
        rows = _rows(conn.execute(text(
            f"SELECT {cols} FROM flagged_pairs fp JOIN match_runs r ON r.id = fp.run_id {where} ORDER BY fp.id"),
            params))
    out = []
    for r in rows:
        s = standing.get(r["pair_id"])
        r["flagged_at"] = _aware(r["flagged_at"])
        r.update(state=s["decision"] if s else "pending", decision_id=s["id"] if s else None,
                 decided_by=s["moderator"] if s else None, decided_at=s["decided_at"] if s else None,
                 note=s["note"] if s else None)
        if wanted is None or r["state"] in wanted:
            out.append(r)
    return out


def evidence_links(store, details: dict[str, Any], expires: timedelta = timedelta(hours=1)) -> dict[str, str]:
    """Openable links for a pair's evidence: presigned URLs (S3) or file paths (local store).

    ``details`` is a :func:`pair_details` result. Keys absent from the store
    layout (e.g. a query path outside the store) are left out.
    """
    out = {}
    for key in ("evidence_key", "heatmap_key"):
        value = details.get(key)
        if value:
            try:
                out[key.replace("_key", "_url")] = store.locate(value, expires)
            except ValueError:
                continue
    return out


__all__ = ["claim", "claim_pair", "release", "decide", "undo", "my_claims", "pending", "pair_details",
           "run_summaries", "daily_summaries", "decision_log", "pair_states", "evidence_links",
           "ensure_schema", "ReviewError", "ClaimError", "ClaimConflictError", "ClaimLimitError", "ReviewInputError",
           "ReviewPermissionError", "DECISIONS"]
