"""Which references changed since the last index version, from the listing alone (no bytes read).

Each index version carries a manifest (``references.json``): per reference
its id, location, listing fingerprint (:attr:`moderation.images.ImageRef.fingerprint`:
size + ETag on S3, size + mtime in ns on disk) and the sha256 of its bytes.
The next build lists the source and compares: a reference whose location
and fingerprint are those of the manifest has the same bytes, so its sha256
(and through it its cached vector, PDQ hash and local features) is known
without reading it. Everything else is new or changed and is read once;
ids in the manifest that the listing no longer has are deleted.

An empty fingerprint (a source that cannot give one, a link) never
matches: such a reference is always read.

References that failed for a lasting reason (the bytes do not decode, the
source refused the object from its size) are recorded beside the indexed
ones (``failed``: id, location, fingerprint, reason, detail). Listed again
with the same location and fingerprint they are still failed, and are not
read; a new fingerprint reads them again. A failure that may pass on retry
(a network or disk error while fetching) is never recorded. Manifests
written before the ``failed`` section existed load with none.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from moderation.errors import ModerationError
from moderation.images import Failure, ImageRef

MANIFEST_FILE = "references.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One indexed reference as the manifest records it."""

    image_id: str
    location: str
    fingerprint: str
    sha256: str


@dataclass(frozen=True)
class FailedReference:
    """A reference that failed for a lasting reason, as listed when it failed: not read again while unchanged."""

    image_id: str
    location: str
    fingerprint: str
    reason: str
    detail: str = ""

    def failure(self) -> Failure:
        """The Failure an index version's info lists for it (the reason of the read that failed)."""
        return Failure(self.image_id, self.location, self.reason, self.detail)


@dataclass(frozen=True)
class Manifest:
    """An index version's manifest: the indexed references and the failed ones, by id."""

    references: dict[str, ManifestEntry] = field(default_factory=dict)
    failed: dict[str, FailedReference] = field(default_factory=dict)


def manifest_bytes(refs: Iterable[ImageRef], failed: Iterable[FailedReference] = ()) -> bytes:
    """The manifest of ``refs`` (each with its sha256) and ``failed``, each sorted by id: deterministic bytes.

    The ``failed`` section is written only when there is one, so a set
    without failures keeps the bytes it always had.
    """
    rows = sorted([r.image_id, r.location, r.fingerprint, r.sha256] for r in refs)
    raw: dict = {"format": MANIFEST_FORMAT, "references": rows}
    failed_rows = sorted([f.image_id, f.location, f.fingerprint, f.reason, f.detail] for f in failed)
    if failed_rows:
        raw["failed"] = failed_rows
    return json.dumps(raw, separators=(",", ":")).encode()


def read_manifest(data: bytes) -> Manifest:
    """The manifest in ``data``; ModerationError if it is not one (then rebuild with ``--full``).

    A manifest without a ``failed`` section (written before it existed) has no failed references.
    """
    try:
        raw = json.loads(data)
        if raw.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {raw.get('format')!r}")
        # The sha is interned: the caches' manifests, the refs and this entry then share one string (at 10M
        # references each copy would cost a gigabyte).
        references = {row[0]: ManifestEntry(str(row[0]), str(row[1]), str(row[2]), sys.intern(str(row[3])))
                      for row in raw["references"]}
        failed = {row[0]: FailedReference(*map(str, row)) for row in raw.get("failed", [])}
        return Manifest(references, failed)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ModerationError(f"the index manifest {MANIFEST_FILE} is unreadable ({exc}); "
                              "rebuild the index in full (`moderation index build --full`)") from None


@dataclass
class ReferenceChanges:
    """The listing compared with the previous manifest.

    ``unchanged`` carry their sha256 from the manifest; ``added`` (new or
    changed ids) carry it only when a hint gave it for the same fingerprint,
    else "" (they must be read). ``deleted`` ids left the listing;
    ``replaced`` are ids in the previous version whose content changed.
    ``duplicates`` are later files with an id already listed (never read).
    ``still_failed`` failed before and are listed unchanged: not read, not indexed.
    """

    unchanged: list[ImageRef] = field(default_factory=list)
    added: list[ImageRef] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    duplicates: list[Failure] = field(default_factory=list)
    still_failed: list[FailedReference] = field(default_factory=list)

    @property
    def to_read(self) -> list[ImageRef]:
        """The added references whose sha256 is unknown: the only ones whose bytes must be read."""
        return [r for r in self.added if not r.sha256]

    def summary(self) -> dict[str, int]:
        return {"unchanged": len(self.unchanged), "new": len(self.added) - len(self.replaced),
                "changed": len(self.replaced), "deleted": len(self.deleted), "to_read": len(self.to_read),
                "still_failed": len(self.still_failed)}


def detect_changes(listed: Sequence[ImageRef], previous: Manifest | None,
                   hints: Mapping[str, tuple[str, str]] | None = None) -> ReferenceChanges:
    """Compare a listing with the previous version's manifest (None: everything is new).

    ``hints`` maps location -> (fingerprint, sha256) learned this run by
    whoever already read the object (the DAG's shards); a hint counts only
    for the same fingerprint. The first listed ref of an id wins, as
    :func:`moderation.embedding.dedupe_ids` does. A ref that failed in the
    previous version with the same location and fingerprint is
    ``still_failed`` (unless a hint says it was read since).
    """
    failed = previous.failed if previous is not None else {}
    previous = previous.references if previous is not None else {}
    hints = hints or {}
    out = ReferenceChanges()
    seen: set[str] = set()
    for ref in listed:
        if ref.image_id in seen:
            out.duplicates.append(Failure(ref.image_id, ref.location, "duplicate_id", "another file has the same id"))
            continue
        seen.add(ref.image_id)
        before = previous.get(ref.image_id)
        if (before is not None and ref.fingerprint and before.sha256
                and (before.location, before.fingerprint) == (ref.location, ref.fingerprint)):
            out.unchanged.append(replace(ref, sha256=before.sha256))
            continue
        hint = hints.get(ref.location)
        sha = hint[1] if hint and ref.fingerprint and hint[0] == ref.fingerprint else ""
        bad = failed.get(ref.image_id)
        if (bad is not None and ref.fingerprint and not sha
                and (bad.location, bad.fingerprint) == (ref.location, ref.fingerprint)):
            out.still_failed.append(bad)
            continue
        if before is not None:
            out.replaced.append(ref.image_id)
        out.added.append(replace(ref, sha256=sha))
    out.deleted = sorted(set(previous) - seen)
    return out


def listed_refs(source) -> list[ImageRef]:
    """The source's references with fingerprints (``source.listed()``), or without (``refs()``) if it has none."""
    listed = getattr(source, "listed", None)
    return list(listed() if listed is not None else source.refs())
