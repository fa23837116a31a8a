"""Reading references for an index build: each at most once, with the fresh vectors' memory bounded.

The build (:func:`moderation.jobs.prepare_reference_index`) hands the reader
the references it must read. The reader reads them in batches of at most
:data:`FRESH_VECTORS_MAX`; every vector it computes goes to the vector
cache as one part per batch. While the vectors computed this run number at
most :data:`FRESH_VECTORS_MAX` they are also kept in memory (a nightly
build's handful of new references, added to the previous index in place:
no part is fetched back); beyond that the reader lets them go and serves
them from the cache. A full build streams every vector from the cache's
parts in the fill order (:mod:`moderation.index_fill`), which does not
depend on how the reads were batched, so the index is the same either way.
A cached vector is never fetched while reading."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from moderation.descriptor import resolve_device
from moderation.embedding import ImageSource, embed, printable
from moderation.errors import ModerationError
from moderation.images import Failure, ImageRef
from moderation.pdq import pdq_cache
from moderation.reference_changes import FailedReference
from moderation.vector_cache import Namespace, VectorCache

log = logging.getLogger(__name__)

# At 512 float32 dimensions: 128 MiB of vectors computed this run held at once, and as much per batch read.
FRESH_VECTORS_MAX = 65_536


class ReferenceReader:
    """Reads references for an index build, each at most once, and serves their vectors.

    :meth:`read` hashes, decodes, embeds and describes (PDQ, local features)
    from one read of each image; :meth:`vectors` takes vectors from what
    was read this run, else from the vector cache,
    reading an image whose cached vector turned out missing or corrupt.
    ``attempted`` holds every id read; ``failures`` every failure;
    ``lasting`` those that repeat while the bytes are unchanged (for the
    manifest). Memory: at most ``fresh_max`` computed vectors are held
    (``peak_fresh`` records the most held at once), and one read batch.
    """

    def __init__(self, p, loaded, source: ImageSource, *, fresh_max: int | None = None):
        from moderation.local_features import FeatureCache
        from moderation.two_stage import TwoStageConfig

        self.p, self.loaded, self.source = p, loaded, source
        self.settings = loaded.settings_for(p.settings)
        self.fresh_max = max(1, FRESH_VECTORS_MAX if fresh_max is None else fresh_max)
        self._cache: VectorCache | None = None
        self.pdq = pdq_cache(p.store, Namespace.REFERENCES) if p.settings.pdq else None
        self.feature_cache = (FeatureCache(p.store, TwoStageConfig.from_settings(p.settings).features)
                              if p.settings.verify else None)
        self._feature_known: frozenset[str] | None = None
        self.features = None if self.feature_cache is None else {
            "computed": 0, "failed": 0, "config": self.feature_cache.config.key()}
        self.fresh: dict[str, np.ndarray] = {}  # id -> vector computed this run, until `spilled`
        self.spilled = False  # more were computed than fit: `fresh` is empty, the cache serves them
        self.peak_fresh = 0
        self._computed_shas: dict[str, str] = {}  # sha computed this run -> the first id it was computed for
        self.failures: list[Failure] = []
        self.lasting: list[FailedReference] = []
        self.attempted: set[str] = set()
        self.cached = 0

    @property
    def cache(self) -> VectorCache:
        if self._cache is None:  # its manifests are read only if a vector is needed
            # Added vectors are not kept by the cache: what the reader holds is all that is held.
            self._cache = VectorCache(self.p.store, self.loaded.version, Namespace.REFERENCES, keep_added=False)
        return self._cache

    def feature_known(self) -> frozenset[str]:
        if self._feature_known is None:
            self._feature_known = frozenset(self.feature_cache.known())
        return self._feature_known

    def missing_from_caches(self, refs: list[ImageRef], *, need_vectors: bool) -> list[ImageRef]:
        """The refs (sha known) lacking a cache entry this build needs: they must be read after all."""
        if not refs:
            return []
        missing: dict[str, str] = {}
        # Membership from the caches' manifests: no copy of every known sha (a gigabyte each at 10M).
        if need_vectors:
            missing.update((r.image_id, "vector") for r in refs if r.sha256 not in self.cache)
        if self.pdq is not None:
            missing.update((r.image_id, "PDQ hash") for r in refs
                           if r.sha256 not in self.pdq and r.image_id not in missing)
        if self.feature_cache is not None:
            known = self.feature_known()
            missing.update((r.image_id, "local features") for r in refs
                           if r.sha256 not in known and r.image_id not in missing)
        for rid, what in list(missing.items())[:20]:
            log.warning("reference %s is unchanged but its %s is not cached: reading it", rid, what)
        if len(missing) > 20:
            log.warning("... %d unchanged references in all are read for a missing cache entry", len(missing))
        return [replace(r, sha256="") for r in refs if r.image_id in missing]

    def read(self, refs: list[ImageRef]) -> dict[str, ImageRef]:
        """Read ``refs`` (once each), a batch of at most ``fresh_max`` at a time.

        Returns id -> ref with its sha256 for those that decoded.
        """
        out: dict[str, ImageRef] = {}
        for s in range(0, len(refs), self.fresh_max):
            out.update(self._read_batch(refs[s:s + self.fresh_max]))
        return out

    def _read_batch(self, refs: list[ImageRef]) -> dict[str, ImageRef]:
        if not refs:
            return {}
        if not self.spilled and len(self.fresh) + len(refs) > self.fresh_max:
            log.info("more than %d reference vectors computed in this build: serving them from the vector "
                     "cache instead of memory", self.fresh_max)
            self.spilled = True
            self.fresh.clear()
        self.attempted.update(r.image_id for r in refs)
        result = embed(self.loaded.module, self.source, self.settings, cache=self.cache,
                       device=resolve_device(self.settings.device.value), refs=refs, desc="embedding references",
                       pdq_cache=self.pdq, feature_cache=self.feature_cache, fetch_cached=False,
                       feature_known=None if self.feature_cache is None else self.feature_known())
        log.info("read %d references (%d vectors in the cache already, %d failed)", len(refs), result.cached,
                 len(result.failures))
        self.cached += result.cached
        self.failures += result.failures
        self.lasting += _lasting(refs, result.failures, set(result.retryable))
        if result.features is not None:
            self.features["computed"] += result.features["computed"]
            self.features["failed"] += result.features["failed"]
        vectors = dict(zip((result.refs[j].image_id for j in result.embedded), result.vectors))
        for r in result.refs:
            if r.image_id in vectors:
                self._computed_shas.setdefault(r.sha256, r.image_id)
            elif r.sha256 not in self._computed_shas:
                continue  # its vector was in the cache before this run: streamed from its part
            if not self.spilled:
                # The same bytes under several ids share the vector computed first, as the cache serves it
                # (the cache keeps the first of a sha): held or not, each id gets the same bits.
                first = self._computed_shas[r.sha256]
                self.fresh[r.image_id] = vectors[first] if first in vectors else self.fresh[first]
        self.peak_fresh = max(self.peak_fresh, len(self.fresh))
        return {r.image_id: r for r in result.refs}

    def vectors(self, refs: list[ImageRef]) -> np.ndarray:
        """Raw vectors of ``refs`` in order (read this run, else from the cache, else read now)."""
        out = [self.fresh.get(r.image_id) for r in refs]
        for i, r in enumerate(refs):
            if out[i] is None:
                out[i] = self.cache.get(r.sha256)
        lost = [r for r, v in zip(refs, out) if v is None]
        if lost:
            log.warning("%d cached reference vectors were missing or corrupt: reading those images", len(lost))
            got = self.read([replace(r, sha256="") for r in lost])
            out = [v if v is not None else self._vector_read(got.get(r.image_id)) for r, v in zip(refs, out)]
            if any(v is None for v in out):
                raise ModerationError("a reference whose cached vector was lost no longer decodes; "
                                      "rebuild the index in full (`moderation index build --full`)")
        return np.stack(out).astype(np.float32)

    def _vector_read(self, ref: ImageRef | None) -> np.ndarray | None:
        """The vector of a ref just read (None if it did not decode): held, or from the part it went to."""
        if ref is None:
            return None
        held = self.fresh.get(ref.image_id)
        return held if held is not None else self.cache.get(ref.sha256)


def _lasting(refs: list[ImageRef], failures: list[Failure], retryable: set[str]) -> list[FailedReference]:
    """The ``failures`` of ``refs`` that repeat while the listing is unchanged (those with a fingerprint)."""
    by_location = {printable(r.location): r for r in refs}
    out = []
    for f in failures:
        ref = by_location.get(f.location)
        if ref is not None and ref.fingerprint and ref.location not in retryable:
            out.append(FailedReference(ref.image_id, ref.location, ref.fingerprint, f.reason, f.detail))
    return out
