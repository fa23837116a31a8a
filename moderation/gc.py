"""Sweeping the object store: removing what no version in use, no live run and no cache manifest needs.

:func:`collect_garbage` (``moderation gc``, and the last task of the nightly
reference index DAG) applies these rules, each only to objects last written
more than the grace period ago (``MODERATION_GC_GRACE_HOURS``, default 24 h:
longer than any job, so nothing a running job is writing or reading goes):

1. **half-written versions**: a version folder under ``models/``, ``stats/``,
   ``indexes/`` or ``calibrations/`` without ``manifest.json`` (a publish that
   died before its manifest; such a version is never resolved);
2. **superseded versions**: index versions of a model other than the one its
   ``CURRENT`` names and the newest ``MODERATION_KEEP_VERSIONS``; statistics
   versions likewise, except any that a remaining index version was built
   with. Only once the pointer has stayed put for the grace period, since a
   job that pinned the previous version may still be reading it. Model and
   calibration versions are never removed (small, and the review database
   names them);
3. a scope whose pointer, or the manifest it names, is unreadable is left
   alone entirely (reported under ``skipped``) until it is republished;
4. **vector cache** (:mod:`moderation.vector_cache`): parts without a
   manifest, manifests without a part, and query-namespace parts older than
   ``MODERATION_QUERY_VECTOR_RETENTION_DAYS`` (retention, no grace needed);
   parts of the old layout are moved into the namespaces, not removed;
5. **failed runs**: the ``runs/BATCH/`` objects of match runs that failed,
   except evidence that a flagged pair of the batch still shows. Runs still
   marked ``running`` are never touched;
6. **evidence** of decided pairs past ``MODERATION_EVIDENCE_RETENTION_DAYS``,
   by :func:`moderation.evidence.prune_evidence` (the same sweep as
   ``moderation evidence prune``);
7. **staging of sharded index builds** (:mod:`moderation.index_fill`,
   ``staging/index-fill/MODEL/RUN/``) left by a build that never published:
   a run's folder goes once every object in it is older than the grace
   period (a running build keeps writing into its folder; a published one
   deletes its own).

Nothing outside those prefixes is ever deleted, nor anything a ``CURRENT``
pointer or a kept version references. A version's manifest is deleted before
its files and a cache part's manifest before the part, so a sweep killed
midway leaves only objects that the next sweep recognises as half-written.
Reruns are idempotent; a dry run changes nothing and lists every object it
would remove, with its size and reason.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from moderation.errors import CorruptPointerError, IntegrityError, ModerationError
from moderation.registry import MANIFEST, POINTER, Kind, Registry
from moderation.store import ObjectInfo
from moderation.vector_cache import Namespace, manifest_key, migrate_legacy_part, parse_key, part_key

log = logging.getLogger(__name__)

MANAGED_PREFIXES = ("models/", "stats/", "indexes/", "calibrations/", "embeddings/", "runs/", "staging/")
# How many folder levels name a scope (what one CURRENT pointer governs) under each kind.
_SCOPE_DEPTH = {Kind.MODEL: 1, Kind.INDEX: 2, Kind.STATS: 2, Kind.CALIBRATION: 3}
_RETIRED = (Kind.INDEX, Kind.STATS)


@dataclass(frozen=True)
class Removal:
    key: str
    bytes: int
    reason: str


@dataclass
class GcReport:
    """What a sweep removed (or, in a dry run, would remove), moved and left alone."""

    dry_run: bool
    grace_hours: float
    removals: list[Removal] = field(default_factory=list)
    migrated: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Counts and bytes by reason, without the object list (small enough for XCom)."""
        by_reason: dict[str, dict[str, int]] = {}
        for r in self.removals:
            row = by_reason.setdefault(r.reason, {"objects": 0, "bytes": 0})
            row["objects"] += 1
            row["bytes"] += r.bytes
        return {"dry_run": self.dry_run, "grace_hours": self.grace_hours, "objects": len(self.removals),
                "bytes": sum(r.bytes for r in self.removals), "by_reason": by_reason,
                "migrated_vectors": self.migrated, "skipped": self.skipped,
                "evidence": {k: v for k, v in self.evidence.items() if k != "keys"}}

    def to_dict(self) -> dict[str, Any]:
        """The summary and every object (``would_delete`` in a dry run, else ``deleted``)."""
        items = [asdict(r) for r in self.removals]
        return {**self.summary(), ("would_delete" if self.dry_run else "deleted"): items}


def collect_garbage(p, *, grace_hours: float | None = None, dry_run: bool = False,
                    now: datetime | None = None) -> GcReport:
    """Apply the module's rules to ``p``'s store and review database; returns the report.

    ``grace_hours`` defaults to ``settings.gc_grace_hours``; ``now`` (UTC)
    exists for tests that need time to pass (evidence retention, delegated
    to :func:`moderation.evidence.prune_evidence`, counts from the real time). Raises ModerationError on a
    negative grace period, StoreError / DatabaseUnavailableError when a
    service is down (a rerun resumes: every step is idempotent).
    """
    grace = p.settings.gc_grace_hours if grace_hours is None else float(grace_hours)
    if not grace >= 0:
        raise ModerationError(f"the grace period must be 0 hours or more, not {grace_hours!r}")
    sweep = _Sweep(p, grace, dry_run, (now or datetime.now(timezone.utc)).astimezone(timezone.utc))
    sweep.registry_versions()
    sweep.vector_cache()
    sweep.failed_runs()
    sweep.evidence()
    sweep.staging()
    summary = sweep.report.summary()
    log.info("gc%s: %d objects, %d bytes %s; by reason %s; skipped %s", " (dry run)" if dry_run else "",
             summary["objects"], summary["bytes"], "would go" if dry_run else "removed",
             summary["by_reason"], summary["skipped"] or "nothing")
    return sweep.report


class _Sweep:
    def __init__(self, p, grace_hours: float, dry_run: bool, now: datetime):
        self.p, self.store, self.dry_run, self.now = p, p.store, dry_run, now
        self.registry = Registry(p.store)
        self.cutoff = now - timedelta(hours=grace_hours)
        self.report = GcReport(dry_run=dry_run, grace_hours=grace_hours)

    # -- helpers ---------------------------------------------------------------------------------

    def settled(self, objects: Iterable[ObjectInfo]) -> bool:
        """Every object was last written before the grace period (an unknown time counts as new)."""
        return all(o.modified is not None and o.modified <= self.cutoff for o in objects)

    def remove(self, objects: Sequence[ObjectInfo], reason: str) -> None:
        for o in objects:
            if not o.key.startswith(MANAGED_PREFIXES):  # a bug upstream must never reach the images
                log.error("gc: refusing to delete %r: outside the managed prefixes", o.key)
                continue
            self.report.removals.append(Removal(o.key, o.size, reason))
            if not self.dry_run:
                self.store.delete(o.key)

    # -- 1-3: registry versions --------------------------------------------------------------------

    def registry_versions(self) -> None:
        # Index scopes first: the statistics they were built with are kept with them.
        in_use: dict[str, set[str] | None] = {}
        for kind in (Kind.MODEL, Kind.INDEX, Kind.STATS, Kind.CALIBRATION):
            for scope, (versions, has_pointer) in sorted(self._scopes(kind).items()):
                self._scope(kind, scope, versions, has_pointer, in_use)

    def _scopes(self, kind: Kind) -> dict[str, tuple[dict[str, list[ObjectInfo]], bool]]:
        depth = _SCOPE_DEPTH[kind]
        scopes: dict[str, tuple[dict[str, list[ObjectInfo]], bool]] = {}
        for o in self.store.entries(kind.value + "/"):
            parts = o.key.split("/")
            if len(parts) <= depth:
                continue
            scope, rest = "/".join(parts[:depth]), parts[depth:]
            versions, has_pointer = scopes.get(scope, ({}, False))
            if rest == [POINTER]:
                has_pointer = True
            elif len(rest) >= 2:
                versions.setdefault(rest[0], []).append(o)
            scopes[scope] = (versions, has_pointer)
        return scopes

    def _scope(self, kind: Kind, scope: str, versions: dict[str, list[ObjectInfo]], has_pointer: bool,
               in_use: dict[str, set[str] | None]) -> None:
        model = scope.split("/")[1] if kind != Kind.MODEL else ""
        complete = {v for v, objs in versions.items() if any(o.key == f"{scope}/{v}/{MANIFEST}" for o in objs)}
        try:
            pointer = self.registry.read_pointer(kind, scope) if has_pointer else None
            if pointer is not None and pointer.version not in complete:
                raise CorruptPointerError(f"{scope}/{POINTER} names version {pointer.version}, which has "
                                          "no manifest", f"{scope}/{POINTER}")
        except CorruptPointerError as exc:
            self.report.skipped.append(f"{scope}: left alone, its pointer is broken ({exc})")
            if kind == Kind.INDEX:
                in_use[model] = None  # which statistics its versions need is unknown: keep them all
            return
        for version in sorted(set(versions) - complete):
            if self.settled(versions[version]):
                self.remove(versions[version], "half-written version (no manifest)")
        if kind in _RETIRED:
            self._retire(kind, scope, model, versions, complete, pointer, in_use)

    def _retire(self, kind: Kind, scope: str, model: str, versions: dict[str, list[ObjectInfo]],
                complete: set[str], pointer, in_use: dict[str, set[str] | None]) -> None:
        records, unreadable = {}, set()
        for version in complete:
            try:
                records[version] = self.registry.manifest(kind, version, scope=scope)
            except IntegrityError as exc:
                unreadable.add(version)
                self.report.skipped.append(f"{scope}/{version}: kept, {exc}")
        newest = sorted(records.values(), key=lambda r: (r.created_at, r.version), reverse=True)
        keep = unreadable | {r.version for r in newest[:self.p.settings.keep_versions]}
        if pointer is not None:
            keep.add(pointer.version)
        if kind == Kind.INDEX:
            if unreadable:
                in_use[model] = None
            used = in_use.setdefault(model, set())
        else:
            used = in_use.get(model, set())
            if used is None:
                return
            keep |= used
        # A job that pinned the previous version before the pointer moved may still be reading it.
        moved_long_ago = pointer is not None and pointer.at is not None and pointer.at <= self.cutoff
        for version, record in sorted(records.items()):
            if version in keep or not moved_long_ago or not self.settled(versions[version]):
                if kind == Kind.INDEX and used is not None:
                    used.add(record.stats_version)
                continue
            manifest_first = sorted(versions[version], key=lambda o: not o.key.endswith("/" + MANIFEST))
            self.remove(manifest_first, f"superseded {kind.value} version")

    # -- 4: vector cache ---------------------------------------------------------------------------

    def vector_cache(self) -> None:
        entries = {o.key: o for o in self.store.entries("embeddings/")}
        retention = self.now - timedelta(days=self.p.settings.query_vector_retention_days)
        legacy: dict[str, list[ObjectInfo]] = defaultdict(list)
        for key, o in entries.items():
            parsed = parse_key(key)
            if parsed is None:
                continue
            model, namespace, name = parsed
            if namespace is None:
                legacy[model].append(o)
            elif name.endswith(".npz"):
                if manifest_key(key) not in entries and self.settled([o]):
                    self.remove([o], "cache part without a manifest")
            elif (part := entries.get(part_key(key))) is None:
                if self.settled([o]):
                    self.remove([o], "cache manifest without its part")
            elif namespace is Namespace.QUERIES and o.modified is not None and o.modified <= retention:
                self.remove([o, part], "query vectors past retention")
        for model, parts in sorted(legacy.items()):
            self._migrate(model, parts)

    def _migrate(self, model: str, parts: list[ObjectInfo]) -> None:
        if self.dry_run:
            self.report.migrated["old-layout parts to move"] = \
                self.report.migrated.get("old-layout parts to move", 0) + len(parts)
            return
        references = self._reference_shas(model)
        caches: dict = {}
        for o in parts:
            for name, count in migrate_legacy_part(self.store, o.key, references, caches).items():
                self.report.migrated[name] = self.report.migrated.get(name, 0) + count
        log.info("gc: moved %d old-layout vector-cache parts of model %s into the new layout", len(parts), model)

    def _reference_shas(self, model: str) -> set[str]:
        import json

        shas: set[str] = set()
        for record in self.registry.versions(Kind.INDEX, model_version=model):
            if "shas.json" not in record.files:
                continue
            try:
                shas.update(json.loads(self.registry.load(Kind.INDEX, record, "shas.json")).values())
            except (IntegrityError, ValueError) as exc:
                log.warning("gc: cannot read the reference shas of index %s (%s); its vectors are treated "
                            "as query vectors", record.version, exc)
        return shas

    # -- 5-6: runs and evidence --------------------------------------------------------------------

    def failed_runs(self) -> None:
        from sqlalchemy import select

        from moderation.db import FlaggedPairRow, MatchRunRow
        from moderation.jobs import run_folder_of

        with self.p.db.session() as s:
            runs = list(s.execute(select(MatchRunRow.id, MatchRunRow.batch, MatchRunRow.finished_at)
                                  .where(MatchRunRow.status == "failed")))
            shown = {k for row in s.execute(select(FlaggedPairRow.evidence_key, FlaggedPairRow.heatmap_key)
                                            .where(FlaggedPairRow.run_id.in_([r.id for r in runs])))
                     for k in row if k}
        for run in runs:
            finished = run.finished_at
            if finished is None or (finished if finished.tzinfo else finished.replace(tzinfo=timezone.utc)) \
                    > self.cutoff:
                continue
            doomed = [o for o in self.store.entries(run_folder_of(run.batch) + "/") if o.key not in shown]
            self.remove([o for o in doomed if self.settled([o])], "artifact of a failed match run")

    def evidence(self) -> None:
        from moderation.evidence import prune_evidence

        planned = prune_evidence(self.p, dry_run=True)
        keys = set(planned["keys"])
        if keys:
            sizes = {o.key: o.size for o in self.store.entries("runs/") if o.key in keys}
            self.report.removals += [Removal(k, sizes.get(k, 0), "evidence past retention")
                                     for k in planned["keys"]]
        self.report.evidence = planned if self.dry_run or not keys else prune_evidence(self.p)

    # -- 7: staging of sharded index builds --------------------------------------------------------

    def staging(self) -> None:
        from moderation.index_fill import STAGING_PREFIX

        runs: dict[str, list[ObjectInfo]] = defaultdict(list)
        depth = STAGING_PREFIX.count("/") + 2  # .../MODEL/RUN/
        for o in self.store.entries(STAGING_PREFIX):
            runs["/".join(o.key.split("/")[:depth])].append(o)
        for _, objects in sorted(runs.items()):
            if self.settled(objects):
                self.remove(objects, "staging of an index build that never published")
