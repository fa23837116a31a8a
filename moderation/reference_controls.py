"""Operators' controls over what is matched: banks and references switched off, match policies.

Every change is one row of the append-only ``reference_control_log`` (who,
when, why); the state in force is the latest row per target. On Postgres
the rows are written by the SECURITY DEFINER functions of migrations 0009
and 0010 (``reference_bank_disable`` ... ``reference_set_policy``), which
only ``moderation_operator`` (and the owner) may execute; the same
functions are the SQL interface for an operator in ``psql``. The embedded
SQLite default has no roles: rows are written here, with the same checks.

The matching job reads :func:`read_controls` once at the start of every run:

- a disabled bank or reference is removed from the search (its index
  positions are skipped by FAISS), so it produces no candidate from that
  run on, without an index rebuild; the next index build leaves it out of
  the index proper, and re-enabling it puts it back in the next run either
  way (see ``moderation.jobs``);
- a reference's policy ``strict`` flags its pairs only with at least N
  geometric inliers (its own N, else ``Settings.strict_min_inliers``);
  ``suppress`` never flags them (:mod:`moderation.suppression`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from sqlalchemy import text

from moderation.banks import check_bank_name
from moderation.db import Database, ReferenceBankRow, ReferenceControlRow, utcnow
from moderation.errors import NotFoundError
from moderation.review import (ReviewInputError, _pg, _rows, _sqlite_states, _summarise, check_moderator,
                               ensure_schema)

MAX_REASON_CHARS = 4000


class TargetKind(str, Enum):
    BANK = "bank"
    REFERENCE = "reference"


class Policy(str, Enum):
    """How a reference's pairs are flagged (its candidates are searched either way)."""

    NORMAL = "normal"
    STRICT = "strict"  # flagged only with enough geometric inliers
    SUPPRESS = "suppress"  # never flagged; kept in the run's suppressed.csv


@dataclass(frozen=True)
class ReferencePolicy:
    policy: Policy
    min_inliers: int | None = None  # strict only; None: Settings.strict_min_inliers


@dataclass(frozen=True)
class Controls:
    """The controls in force, folded from the log up to entry ``log_id`` (0: no entry yet)."""

    disabled_banks: frozenset[str] = frozenset()
    disabled_references: frozenset[str] = frozenset()
    policies: Mapping[str, ReferencePolicy] = field(default_factory=dict)
    log_id: int = 0

    def removed(self, banks: Mapping[str, str]) -> set[str]:
        """Reference ids (keys of ``banks``: id -> bank) that must not match: disabled, or in a disabled bank."""
        return {rid for rid, bank in banks.items()
                if rid in self.disabled_references or bank in self.disabled_banks}

    def summary(self) -> dict[str, Any]:
        """What a run records about the controls it applied (matching.json)."""
        return {"log_id": self.log_id, "disabled_banks": sorted(self.disabled_banks),
                "disabled_references": len(self.disabled_references),
                "policies": {p.value: sum(1 for x in self.policies.values() if x.policy is p)
                             for p in (Policy.STRICT, Policy.SUPPRESS)}}


def read_controls(db: Database) -> Controls:
    """The controls in force now (both backends: the log is small, so it is folded here)."""
    with db.engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT id, target_kind, target, action, min_inliers FROM reference_control_log ORDER BY id")).all()
    on_off: dict[tuple[str, str], str] = {}
    policies: dict[str, ReferencePolicy] = {}
    for r in rows:
        if r.action in ("disable", "enable"):
            on_off[(r.target_kind, r.target)] = r.action
        else:
            policies[r.target] = ReferencePolicy(Policy(r.action), r.min_inliers)
    off = {key for key, action in on_off.items() if action == "disable"}
    return Controls(frozenset(t for k, t in off if k == TargetKind.BANK.value),
                    frozenset(t for k, t in off if k == TargetKind.REFERENCE.value),
                    {rid: p for rid, p in policies.items() if p.policy is not Policy.NORMAL},
                    rows[-1].id if rows else 0)


# -- changes ----------------------------------------------------------------------------------


def _check_reason(why: str | None) -> str:
    if not isinstance(why, str) or not why.strip() or len(why) > MAX_REASON_CHARS:
        raise ReviewInputError(f"a reason (1 to {MAX_REASON_CHARS} characters) is required for every change")
    return why.strip()


def _check_target(kind: TargetKind, target: str) -> str:
    if kind is TargetKind.BANK:
        return check_bank_name(target)
    if not isinstance(target, str) or not target.strip() or len(target) > 300:
        raise ReviewInputError(f"invalid reference id {target!r}")
    return target


def set_bank_enabled(db: Database, bank: str, enabled: bool, why: str, by: str | None = None) -> dict[str, Any]:
    """Switch a bank on or off from the next matching run; returns the log entry written.

    ``by``: who (None: the database user; naming someone else needs
    ``moderation_review_service`` on Postgres). Raises NotFoundError for a
    bank no index build has registered, ReviewInputError without a reason,
    ReviewPermissionError when the database user is not an operator.
    """
    return _record(db, TargetKind.BANK, bank, "enable" if enabled else "disable", why, by)


def set_reference_enabled(db: Database, reference_id: str, enabled: bool, why: str,
                          by: str | None = None) -> dict[str, Any]:
    """Switch one reference on or off from the next matching run (errors as :func:`set_bank_enabled`)."""
    return _record(db, TargetKind.REFERENCE, reference_id, "enable" if enabled else "disable", why, by)


def set_reference_policy(db: Database, reference_id: str, policy: Policy, why: str, *,
                         min_inliers: int | None = None, by: str | None = None) -> dict[str, Any]:
    """Give a reference a match policy from the next run; ``min_inliers`` only with STRICT."""
    policy = Policy(policy)
    if min_inliers is not None and (policy is not Policy.STRICT or not 1 <= int(min_inliers) <= 100_000):
        raise ReviewInputError("min_inliers (1 to 100000) goes with the strict policy only")
    return _record(db, TargetKind.REFERENCE, reference_id, policy.value, why, by, min_inliers)


_FUNCTIONS = {"disable": "reference_{}disable", "enable": "reference_{}enable"}


def _record(db: Database, kind: TargetKind, target: str, action: str, why: str, by: str | None,
            min_inliers: int | None = None) -> dict[str, Any]:
    target, why, by = _check_target(kind, target), _check_reason(why), check_moderator(by)
    if db.is_postgres:
        with _pg(db) as conn:
            if action in _FUNCTIONS:
                fn = _FUNCTIONS[action].format("bank_" if kind is TargetKind.BANK else "")
                lid = conn.execute(text(f"SELECT {fn}(:t, :why, :by)"), {"t": target, "why": why, "by": by}).scalar()
            else:
                lid = conn.execute(text("SELECT reference_set_policy(:t, :p, :why, :n, :by)"),
                                   {"t": target, "p": action, "why": why, "n": min_inliers, "by": by}).scalar()
            row = conn.execute(text("SELECT * FROM reference_control_log WHERE id = :i"), {"i": lid}).one()
            return dict(row._mapping)
    if by is None:
        raise ReviewInputError("name who makes the change (the embedded database has no login users)")
    with db.session() as s, s.begin():
        if kind is TargetKind.BANK and s.get(ReferenceBankRow, target) is None:
            raise NotFoundError(f"no reference bank {target!r} (banks are registered by the index build)")
        row = ReferenceControlRow(target_kind=kind.value, target=target, action=action, min_inliers=min_inliers,
                                  reason=why, changed_by=by, changed_at=utcnow())
        s.add(row)
        s.flush()
        return {c.name: getattr(row, c.name) for c in ReferenceControlRow.__table__.columns}


def register_banks(db: Database, counts: Mapping[str, int], index_version: str) -> None:
    """Record the banks an index build saw and their sizes (banks it no longer saw keep 0 references)."""
    with db.session() as s, s.begin():
        for row in s.query(ReferenceBankRow).all():
            if row.name not in counts:
                row.n_references = 0
        for name, n in counts.items():
            row = s.get(ReferenceBankRow, name)
            if row is None:
                s.add(ReferenceBankRow(name=name, n_references=n, index_version=index_version, seen_at=utcnow()))
            else:
                row.n_references, row.index_version, row.seen_at = n, index_version, utcnow()


# -- reading ----------------------------------------------------------------------------------


def control_log(db: Database, *, target: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """The change log, newest first (optionally for one bank or reference)."""
    where = "WHERE target = :t" if target is not None else ""
    with db.engine.connect() as conn:
        return _rows(conn.execute(text(f"SELECT * FROM reference_control_log {where} ORDER BY id DESC LIMIT :l"),
                                  {"t": target, "l": int(limit)}))


def bank_summaries(db: Database) -> list[dict[str, Any]]:
    """Per bank: enabled, references, and flagged / reviewed / confirmed / rejected / unsure / pending,
    observed precision (confirmed / (confirmed + rejected)); pairs from before banks under bank None."""
    if db.is_postgres:
        with _pg(db) as conn:
            return _rows(conn.execute(text("SELECT * FROM review_bank_summary ORDER BY bank NULLS LAST")))
    controls = read_controls(db)
    ensure_schema(db)
    with db.engine.connect() as conn:
        states = _sqlite_states(conn)
        banks = {r.name: r.n_references for r in conn.execute(text("SELECT name, n_references FROM reference_banks"))}
        pairs = conn.execute(text("SELECT id, bank FROM flagged_pairs")).all()
    by_bank: dict[str | None, list[str]] = {b: [] for b in banks}
    for pid, bank in pairs:
        by_bank.setdefault(bank, []).append(states[pid]["decision"] if pid in states else "pending")
    return [{"bank": b, "n_references": banks.get(b), "enabled": None if b not in banks else
             b not in controls.disabled_banks, **_summarise(s)}
            for b, s in sorted(by_bank.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))]


def reference_rejections(db: Database, limit: int = 50) -> list[dict[str, Any]]:
    """References by number of rejected pairs (standing decisions), most first, with their policy."""
    if db.is_postgres:
        with _pg(db) as conn:
            return _rows(conn.execute(text("SELECT * FROM review_reference_rejections LIMIT :l"), {"l": int(limit)}))
    controls = read_controls(db)
    ensure_schema(db)
    with db.engine.connect() as conn:
        states = _sqlite_states(conn)
        pairs = conn.execute(text("SELECT id, reference_id, bank FROM flagged_pairs")).all()
    per: dict[str, dict[str, Any]] = {}
    for pid, rid, bank in pairs:
        entry = per.setdefault(rid, {"reference_id": rid, "bank": bank, "states": []})
        entry["states"].append(states[pid]["decision"] if pid in states else "pending")
    out = []
    for rid, entry in per.items():
        counts = _summarise(entry.pop("states"))
        if counts["rejected"]:
            pol = controls.policies.get(rid)
            out.append({**entry, "rejected": counts["rejected"], "confirmed": counts["confirmed"],
                        "pending": counts["pending"], "observed_precision": counts["observed_precision"],
                        "policy": pol.policy.value if pol else Policy.NORMAL.value,
                        "min_inliers": pol.min_inliers if pol else None,
                        "disabled": rid in controls.disabled_references})
    out.sort(key=lambda e: (-e["rejected"], e["confirmed"], e["reference_id"]))
    return out[:int(limit)]
