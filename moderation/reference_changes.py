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
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from moderation.errors import ModerationError
from moderation.images import Failure, ImageRef

MANIFEST_FILE = "references.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class ManifestEntry:
    """One indexed reference as the manifest records it."""

    image_id: str
    location: str
    fingerprint: str
    sha256: str


def manifest_bytes(refs: Iterable[ImageRef]) -> bytes:
    """The manifest of ``refs`` (each with its sha256), sorted by id: deterministic bytes."""
    rows = sorted([r.image_id, r.location, r.fingerprint, r.sha256] for r in refs)
    return json.dumps({"format": MANIFEST_FORMAT, "references": rows}, separators=(",", ":")).encode()


def read_manifest(data: bytes) -> dict[str, ManifestEntry]:
    """Reference id -> entry; ModerationError if ``data`` is not a manifest (then rebuild with ``--full``)."""
    try:
        raw = json.loads(data)
        if raw.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {raw.get('format')!r}")
        return {row[0]: ManifestEntry(*map(str, row)) for row in raw["references"]}
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
    """

    unchanged: list[ImageRef] = field(default_factory=list)
    added: list[ImageRef] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    duplicates: list[Failure] = field(default_factory=list)

    @property
    def to_read(self) -> list[ImageRef]:
        """The added references whose sha256 is unknown: the only ones whose bytes must be read."""
        return [r for r in self.added if not r.sha256]

    def summary(self) -> dict[str, int]:
        return {"unchanged": len(self.unchanged), "new": len(self.added) - len(self.replaced),
                "changed": len(self.replaced), "deleted": len(self.deleted), "to_read": len(self.to_read)}


def detect_changes(listed: Sequence[ImageRef], previous: Mapping[str, ManifestEntry] | None,
                   hints: Mapping[str, tuple[str, str]] | None = None) -> ReferenceChanges:
    """Compare a listing with the previous version's manifest (None: everything is new).

    ``hints`` maps location -> (fingerprint, sha256) learned this run by
    whoever already read the object (the DAG's shards); a hint counts only
    for the same fingerprint. The first listed ref of an id wins, as
    :func:`moderation.embedding.dedupe_ids` does.
    """
    previous = previous or {}
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
        if before is not None:
            out.replaced.append(ref.image_id)
        hint = hints.get(ref.location)
        sha = hint[1] if hint and ref.fingerprint and hint[0] == ref.fingerprint else ""
        out.added.append(replace(ref, sha256=sha))
    out.deleted = sorted(set(previous) - seen)
    return out


def listed_refs(source) -> list[ImageRef]:
    """The source's references with fingerprints (``source.listed()``), or without (``refs()``) if it has none."""
    listed = getattr(source, "listed", None)
    return list(listed() if listed is not None else source.refs())
