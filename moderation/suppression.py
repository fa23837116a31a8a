"""False-positive suppression: which pairs above the threshold are not flagged, and why.

Applied by the matching job to the pairs it would flag, after scoring:

- ``rejected_before``: a moderator's standing decision on a pair with the
  same query content (sha256) and reference is ``rejected`` (any batch, any
  earlier run). Undoing that decision lifts it.
- ``reference_suppressed``: the reference's policy is ``suppress``.
- ``strict_reference``: the reference's policy is ``strict`` and the pair's
  geometric verification has fewer inliers than the bar (the policy's own,
  else ``Settings.strict_min_inliers``); a pair that was not verified at all
  (verification off, outside the verification budget) never passes it.

Suppressed pairs are written to the run's ``suppressed.csv`` with the
reason; they stay in ``candidates.csv`` like every candidate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

from sqlalchemy import bindparam, text

from moderation.db import Database
from moderation.matching import Candidate, _csv_text
from moderation.reference_controls import Controls, Policy

SHA_CHUNK = 5000


class Reason(str, Enum):
    REJECTED_BEFORE = "rejected_before"
    REFERENCE_SUPPRESSED = "reference_suppressed"
    STRICT_REFERENCE = "strict_reference"


@dataclass(frozen=True)
class Suppressed:
    candidate: Candidate
    reason: Reason
    detail: str = ""


def rejected_pairs(db: Database, shas: Iterable[str]) -> set[tuple[str, str]]:
    """(query sha256, reference id) pairs among ``shas`` whose standing decision is ``rejected``."""
    wanted = sorted({s for s in shas if s})
    out: set[tuple[str, str]] = set()
    if not wanted:
        return out
    if db.is_postgres:
        query = text("SELECT query_sha256, reference_id FROM review_rejected_pairs "
                     "WHERE query_sha256 IN :shas").bindparams(bindparam("shas", expanding=True))
        with db.engine.connect() as conn:
            for i in range(0, len(wanted), SHA_CHUNK):
                out.update((s, r) for s, r in conn.execute(query, {"shas": wanted[i:i + SHA_CHUNK]}))
        return out
    from moderation.review import _sqlite_states, ensure_schema

    ensure_schema(db)
    query = text("SELECT id, query_sha256, reference_id FROM flagged_pairs "
                 "WHERE query_sha256 IN :shas").bindparams(bindparam("shas", expanding=True))
    with db.engine.connect() as conn:
        rows = []
        for i in range(0, len(wanted), SHA_CHUNK):
            rows += conn.execute(query, {"shas": wanted[i:i + SHA_CHUNK]}).all()
        states = _sqlite_states(conn, [r.id for r in rows])
    return {(r.query_sha256, r.reference_id) for r in rows
            if states.get(r.id, {}).get("decision") == "rejected"}


def split_suppressed(chosen: list[Candidate], query_shas: Mapping[str, str], rejected: set[tuple[str, str]],
                     controls: Controls, strict_min_inliers: int) -> tuple[list[Candidate], list[Suppressed]]:
    """``chosen`` split into (still flagged, suppressed with reasons), order kept (rules: module docstring)."""
    kept: list[Candidate] = []
    dropped: list[Suppressed] = []
    for c in chosen:
        why = _reason(c, query_shas.get(c.query_id, ""), rejected, controls, strict_min_inliers)
        if why is None:
            kept.append(c)
        else:
            dropped.append(Suppressed(c, *why))
    return kept, dropped


def _reason(c: Candidate, sha: str, rejected: set[tuple[str, str]], controls: Controls,
            strict_min_inliers: int) -> tuple[Reason, str] | None:
    if sha and (sha, c.reference_id) in rejected:
        return Reason.REJECTED_BEFORE, "a moderator rejected this query content with this reference"
    policy = controls.policies.get(c.reference_id)
    if policy is None:
        return None
    if policy.policy is Policy.SUPPRESS:
        return Reason.REFERENCE_SUPPRESSED, "reference policy: suppress"
    if policy.policy is Policy.STRICT:
        bar = policy.min_inliers or strict_min_inliers
        inliers = c.verification.inliers if c.verification is not None else None
        if inliers is None or inliers < bar:
            seen = "not verified" if inliers is None else f"{inliers} inliers"
            return Reason.STRICT_REFERENCE, f"{seen} < {bar} required"
    return None


SUPPRESSED_COLUMNS = ("query_id", "reference_id", "bank", "score", "inliers", "reason", "detail")


def suppressed_csv(items: list[Suppressed], banks: Mapping[str, str]) -> str:
    """The run artifact ``suppressed.csv``: one row per suppressed pair (header only when none)."""
    def row(s: Suppressed) -> list:
        c = s.candidate
        return [c.query_id, c.reference_id, banks.get(c.reference_id, ""), f"{c.score:.6f}",
                "" if c.verification is None else c.verification.inliers, s.reason.value, s.detail]

    return _csv_text(SUPPRESSED_COLUMNS, (row(s) for s in items))
