"""The vector cache: descriptor vectors by (model version, image sha256), in parts in the object store.

Layout, one namespace per lifetime::

    embeddings/MODEL/references/PART.npz   reference and background vectors: kept while the model is
    embeddings/MODEL/references/PART.json  the part's manifest
    embeddings/MODEL/queries/PART.npz      query vectors: kept MODERATION_QUERY_VECTOR_RETENTION_DAYS
    embeddings/MODEL/queries/PART.json

A part holds the vectors one embedding call added (npz arrays ``sha256``,
``vectors``); ``PART`` is its write time and a hash of its bytes, so two
writers never overwrite each other. Its manifest, written after the part,
records the part's own sha256 and size, the image shas it holds, the
dimension and the write time. A part without a manifest is never read (a
writer died between the two; ``moderation gc`` sweeps it).

Reading: opening a cache reads the namespace's manifests only (the sha
index); a part is fetched and checked against its manifest the first time
one of its shas is asked for, so a job loads the parts holding its images
and nothing else. A part or manifest that fails its check is dropped
(logged, both objects deleted) and :meth:`VectorCache.get` answers None for
its shas: the caller re-embeds those images and the new vectors go to a new
part. Parts of the old layout (``embeddings/MODEL/PART.npz``, no manifest)
are not read; ``moderation gc`` moves them into the namespaces
(:func:`migrate_legacy_part`).
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from enum import Enum

import numpy as np

from moderation.errors import NotFoundError
from moderation.images import sha256_hex
from moderation.store import ObjectStore

log = logging.getLogger(__name__)

ROOT = "embeddings/"
FORMAT = 1
_SHA = re.compile(r"^[0-9a-f]{64}$")
_MANIFEST_READERS = 8  # manifests are small: their fetch time is latency, fetched side by side


class Namespace(str, Enum):
    """Which lifetime a vector has: reference/background vectors live with the model, query vectors expire."""

    REFERENCES = "references"
    QUERIES = "queries"


@dataclass(frozen=True)
class PartManifest:
    """What a part holds; ``sha256``/``bytes`` are those of the part object itself."""

    model_version: str
    namespace: str
    part: str
    sha256: str
    bytes: int
    count: int
    dim: int
    created_at: str
    shas: list[str]
    format: int = FORMAT

    @property
    def created(self) -> datetime:
        return datetime.fromisoformat(self.created_at)

    @classmethod
    def parse(cls, data: bytes) -> PartManifest:
        """A manifest from its bytes; ValueError naming what is wrong."""
        try:
            raw = json.loads(data)
            record = cls(**raw)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not a part manifest ({type(exc).__name__})") from None
        if record.format != FORMAT:
            raise ValueError(f"manifest format {record.format!r}, expected {FORMAT}")
        if not isinstance(record.shas, list) or len(record.shas) != record.count \
                or not all(isinstance(s, str) and _SHA.match(s) for s in record.shas):
            raise ValueError("the sha list is malformed or disagrees with the count")
        try:
            record.created
        except (TypeError, ValueError):
            raise ValueError(f"created_at {record.created_at!r} is not a timestamp") from None
        # Interned: the reference manifest and the other caches hold the same shas (one string, not four).
        record.shas[:] = map(sys.intern, record.shas)
        return record


def model_prefix(model_version: str) -> str:
    return f"{ROOT}{model_version}/"


def namespace_prefix(model_version: str, namespace: Namespace) -> str:
    return f"{model_prefix(model_version)}{Namespace(namespace).value}/"


def manifest_key(part_key: str) -> str:
    return part_key[:-len(".npz")] + ".json"


def part_key(manifest_key_: str) -> str:
    return manifest_key_[:-len(".json")] + ".npz"


def parse_key(key: str) -> tuple[str, Namespace | None, str] | None:
    """(model, namespace or None for the old layout, file name) of a cache key; None if not a cache file.

    File names end in ``.npz`` (a part) or ``.json`` (a manifest; never in the old layout).
    """
    if not key.startswith(ROOT):
        return None
    parts = key[len(ROOT):].split("/")
    if len(parts) == 2 and parts[1].endswith(".npz"):
        return parts[0], None, parts[1]
    if len(parts) == 3 and parts[2].endswith((".npz", ".json")):
        try:
            return parts[0], Namespace(parts[1]), parts[2]
        except ValueError:
            return None
    return None


class VectorCache:
    """Vectors by sha256 for one model version and one namespace.

    Contract: ``sha in cache`` and :meth:`known` answer from the manifests
    alone; :meth:`get` returns the vector, or None when the sha is unknown
    or its part turned out missing or corrupt (then the part is dropped and
    the caller must embed the image again). :meth:`add` persists new
    vectors as one part (idempotent: shas already known are not written
    again). ``store`` None keeps everything in memory. With ``keep_added``
    False (and a store), added vectors are not kept in memory: the new part
    is known by its manifest, like a part written by another job, and read
    back when asked for (a job that adds more vectors than it can hold).
    """

    def __init__(self, store: ObjectStore | None, model_version: str,
                 namespace: Namespace = Namespace.REFERENCES, *, warn_legacy: bool = True,
                 keep_added: bool = True):
        self.store = store
        self.model_version = model_version
        self.namespace = Namespace(namespace)
        self.prefix = namespace_prefix(model_version, self.namespace)
        self._where: dict[str, str] = {}  # sha -> part key
        self._manifests: dict[str, PartManifest] = {}  # part key -> manifest, until loaded
        self._vectors: dict[str, np.ndarray] = {}
        self.keep_added = keep_added or store is None
        if store is not None:
            self._read_manifests(warn_legacy)

    def _read_manifests(self, warn_legacy: bool) -> None:
        listed = list(self.store.list(model_prefix(self.model_version)))
        keys = [k for k in listed if k.startswith(self.prefix) and k.endswith(".json")]
        with ThreadPoolExecutor(max_workers=max(1, min(_MANIFEST_READERS, len(keys)))) as pool:
            fetched = list(pool.map(self._fetch_manifest, keys))
        for key, manifest in zip(keys, fetched):
            if manifest is None:
                continue
            self._manifests[part_key(key)] = manifest
            for sha in manifest.shas:
                self._where.setdefault(sha, part_key(key))
        legacy = [k for k in listed if (parsed := parse_key(k)) is not None and parsed[1] is None]
        if legacy and warn_legacy:
            log.warning("vector cache: %d parts of the old layout under %s are not read, and the images "
                        "they hold are embedded again; run `moderation gc` once to move them into the "
                        "new layout", len(legacy), model_prefix(self.model_version))

    def _fetch_manifest(self, key: str) -> PartManifest | None:
        try:
            data = self.store.get(key)
        except NotFoundError:  # dropped or swept since the listing
            return None
        try:
            return PartManifest.parse(data)
        except ValueError as exc:
            self._drop(part_key(key), f"its manifest is unreadable: {exc}", None)
            return None

    def __contains__(self, sha: str) -> bool:
        return sha in self._where or sha in self._vectors

    def __len__(self) -> int:
        return len(self._where.keys() | self._vectors.keys())

    def known(self) -> frozenset[str]:
        """Every sha this cache can answer, from the manifests (no part is fetched)."""
        return frozenset(self._where) | frozenset(self._vectors)

    def positions(self) -> dict[str, tuple[str, int]]:
        """sha -> (part key, row in the part) of every stored vector: the order :meth:`stream` yields them in.

        From the manifests alone (no part is fetched); vectors only held in
        memory are not listed (:meth:`stream` yields them last).
        """
        out: dict[str, tuple[str, int]] = {}
        for key, manifest in self._manifests.items():
            for row, sha in enumerate(manifest.shas):
                if self._where.get(sha) == key:
                    out.setdefault(sha, (key, row))
        return out

    def get(self, sha: str) -> np.ndarray | None:
        """The vector of ``sha``; None if unknown, or if its part is missing or corrupt (dropped)."""
        if sha in self._vectors:
            return self._vectors[sha]
        key = self._where.get(sha)
        if key is None:
            return None
        self._load(key)
        return self._vectors.get(sha)

    def _load(self, key: str) -> None:
        manifest = self._manifests.pop(key)
        try:
            data = self.store.get(key)
        except NotFoundError:
            log.info("vector cache: part %s disappeared (swept or dropped elsewhere); its %d images are "
                     "embedded again", key, manifest.count)
            self._forget(manifest.shas)
            return
        try:
            shas, vectors = _check_part(data, manifest)
        except ValueError as exc:
            self._drop(key, str(exc), manifest)
            return
        for sha, vec in zip(shas, vectors):
            self._vectors.setdefault(sha, vec)
        self._forget(manifest.shas)

    def stream(self, shas: Collection[str] | None = None) -> Iterator[tuple[list[str], np.ndarray]]:
        """(shas, vectors) part by part, for a build that must not hold every vector at once.

        Yields each stored part holding any of ``shas`` (all parts if None)
        once, restricted to the requested shas that this cache answers from
        that part, then the vectors held in memory (added or loaded) as a
        last chunk. Every sha comes at most once, in a stable order (part
        key order). Nothing is kept: memory is one part at a time. A part
        that is missing or fails its check is dropped as :meth:`get` drops
        it, and its shas are not yielded: the caller compares counts and
        embeds the missing images again.
        """
        want = None if shas is None else set(shas)
        for key in sorted({k for sha, k in self._where.items() if want is None or sha in want}):
            manifest = self._manifests.get(key)
            if manifest is None:
                continue
            try:
                data = self.store.get(key)
            except NotFoundError:
                log.info("vector cache: part %s disappeared (swept or dropped elsewhere)", key)
                self._manifests.pop(key, None)
                self._forget([s for s in manifest.shas if self._where.get(s) == key])
                continue
            try:
                part_shas, vectors = _check_part(data, manifest)
            except ValueError as exc:
                self._manifests.pop(key, None)
                self._drop(key, str(exc), manifest)
                continue
            take = [i for i, sha in enumerate(part_shas)
                    if self._where.get(sha) == key and sha not in self._vectors and (want is None or sha in want)]
            if take:
                yield [part_shas[i] for i in take], vectors[take]
        held = [sha for sha in self._vectors if want is None or sha in want]
        if held:
            yield held, np.stack([self._vectors[sha] for sha in held])

    def _forget(self, shas: Iterable[str]) -> None:
        for sha in shas:
            self._where.pop(sha, None)

    def _drop(self, key: str, reason: str, manifest: PartManifest | None) -> None:
        count = f"its {manifest.count} vectors" if manifest else "the vectors it held"
        log.warning("vector cache: part %s is corrupt (%s); dropped it, %s are embedded again when next "
                    "needed", key, reason, count)
        if manifest is not None:
            self._forget(manifest.shas)
        # The manifest goes first: a part without one is never read, whatever happens next.
        self.store.delete(manifest_key(key))
        self.store.delete(key)

    def add(self, shas: Sequence[str], vectors: np.ndarray) -> None:
        """Remember new vectors and persist them as one new part (shas already known are skipped)."""
        new: dict[str, np.ndarray] = {}
        for sha, vec in zip(shas, vectors):
            if sha not in self and sha not in new:
                new[sha] = np.asarray(vec, dtype=np.float32)
        if not new:
            return
        if self.keep_added:
            self._vectors.update(new)
        if self.store is None:
            return
        manifest = write_part(self.store, self.model_version, self.namespace, list(new),
                              np.stack(list(new.values())))
        if not self.keep_added:
            key = f"{self.prefix}{manifest.part}"
            self._manifests[key] = manifest
            for sha in manifest.shas:
                self._where[sha] = key


def write_part(store: ObjectStore, model_version: str, namespace: Namespace, shas: Sequence[str],
               vectors: np.ndarray, now: datetime | None = None) -> PartManifest:
    """Store one part and then its manifest; returns the manifest."""
    buf = io.BytesIO()
    np.savez(buf, sha256=np.array(list(shas)), vectors=np.asarray(vectors, dtype=np.float32))
    data = buf.getvalue()
    digest = sha256_hex(data)
    when = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    # Stamped to the microsecond so that key order is write order, also within a second: a full index build
    # fills in part key order, and a build that read in batches (a part each) must fill as one that read at once.
    name = f"{when.strftime('%Y%m%dT%H%M%S%f')}-{digest[:16]}"
    key = f"{namespace_prefix(model_version, namespace)}{name}.npz"
    manifest = PartManifest(model_version=model_version, namespace=Namespace(namespace).value,
                            part=f"{name}.npz", sha256=digest, bytes=len(data), count=len(shas),
                            dim=int(vectors.shape[1]) if len(shas) else 0,
                            created_at=when.isoformat(timespec="seconds"), shas=list(shas))
    store.put(key, data)
    store.put(manifest_key(key), json.dumps(asdict(manifest)).encode(), "application/json")
    return manifest


def _check_part(data: bytes, manifest: PartManifest) -> tuple[list[str], np.ndarray]:
    """The part's (shas, vectors) if its bytes match the manifest; ValueError saying how they do not."""
    if len(data) != manifest.bytes or sha256_hex(data) != manifest.sha256:
        raise ValueError("sha256 does not match its manifest")
    shas, vectors = read_npz(data)
    if shas != manifest.shas or vectors.shape != (manifest.count, manifest.dim):
        raise ValueError("contents disagree with its manifest")
    return shas, vectors


def read_npz(data: bytes) -> tuple[list[str], np.ndarray]:
    """(shas, float32 vectors) of a part's bytes; ValueError if they are not a readable part."""
    import zipfile

    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as part:
            shas = [str(s) for s in part["sha256"]]
            vectors = np.asarray(part["vectors"], dtype=np.float32)
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as exc:
        raise ValueError(f"not a readable part ({type(exc).__name__}: {exc})") from None
    if vectors.ndim != 2 or vectors.shape[0] != len(shas):
        raise ValueError("not a readable part (shas and vectors disagree)")
    return shas, vectors


def migrate_legacy_part(store: ObjectStore, key: str, reference_shas: Collection[str],
                        caches: dict[tuple[str, Namespace], VectorCache]) -> dict[str, int]:
    """Move one old-layout part into the namespaces, then delete it; returns counts per namespace.

    Shas in ``reference_shas`` (those of the model's index versions) go to
    the references namespace, the rest (query or background vectors: the
    old layout did not tell them apart) to the queries namespace, where
    retention ends them. ``caches`` is reused across calls. Idempotent: a
    rerun after a crash skips what was already moved. An unreadable part is
    deleted (it could only ever have failed).
    """
    parsed = parse_key(key)
    if parsed is None or parsed[1] is not None:
        raise ValueError(f"{key!r} is not an old-layout cache part")
    model = parsed[0]
    try:
        shas, vectors = read_npz(store.get(key))
    except NotFoundError:
        return {}
    except ValueError as exc:
        log.warning("vector cache: old-layout part %s is corrupt (%s); deleted", key, exc)
        store.delete(key)
        return {"corrupt": 1}
    counts: dict[str, int] = {}
    for namespace in Namespace:
        take = [i for i, s in enumerate(shas) if (s in reference_shas) == (namespace is Namespace.REFERENCES)]
        if not take:
            continue
        cache = caches.get((model, namespace))
        if cache is None:
            cache = caches[(model, namespace)] = VectorCache(store, model, namespace, warn_legacy=False)
        cache.add([shas[i] for i in take], vectors[take])
        counts[namespace.value] = len(take)
    store.delete(key)
    return counts
