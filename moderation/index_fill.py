"""Filling a full index build in shards: the fill order, its ranges, and a sharded build's staging objects.

A full index build trains one empty index on a sample of the kept vectors
and then adds every one of them. Both passes read the vector cache a part at
a time, in the *fill order* (:func:`fill_order`: part key, then row in the
part; what :meth:`VectorCache.stream` yields), never every vector at once.
Part keys sort in write order (:func:`moderation.vector_cache.write_part`),
so the order does not depend on how the reads that computed the vectors were
batched (:mod:`moderation.reference_reader`): the index is the same.
The fill is cut into contiguous ranges of that order (:func:`fill_ranges`);
each range fills a copy of the trained template
(:func:`moderation.index_shards.build_shard`) and the copies are merged in
range order (:func:`moderation.index_shards.merge_shards`), which is what
adding every vector to one index in that order gives. So the single-process
build (one process fills every range) and the Airflow build (one mapped task
per range, ``reference_index_nightly``'s ``fill_shard``) publish the same index.

A sharded build keeps its objects under a run-scoped prefix
(:class:`FillStaging`, ``staging/index-fill/MODEL/RUN/``): the prepared build,
the trained template, and per range its references (all a fill task reads
besides the template and the vectors) and its filled index and id list;
index files go to and from the store through local files, never whole in
memory beside the index. The publishing task deletes them once the version
is in force; ``moderation gc`` removes those of a build that died, once the
grace period has passed.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moderation.errors import ModerationError, NotFoundError
from moderation.images import ImageRef, file_sha256
from moderation.index import ReferenceIndex
from moderation.index_stream import Chunk
from moderation.store import ObjectStore
from moderation.vector_cache import VectorCache

STAGING_PREFIX = "staging/index-fill/"
CHUNK = 8192  # vectors per chunk of the refs read again (a cache part is a chunk as it is)

Apply = Callable[[np.ndarray], np.ndarray]  # raw descriptor vectors -> indexed (post-processed) vectors
ReadAgain = Callable[[list[ImageRef]], np.ndarray]  # raw vectors of refs the cache lost, read from the images


def fill_order(cache: VectorCache, refs: Sequence[ImageRef]) -> list[ImageRef]:
    """``refs`` in the order :func:`ordered_chunks` yields them from ``cache``.

    Cached vectors by (part key, row), one image under several ids in
    ``refs`` order; refs the cache does not hold last, in ``refs`` order.
    Needs a cache with nothing held in memory (a fresh instance).
    """
    where = cache.positions()
    last = ("\uffff", 0)
    ranked = sorted(range(len(refs)), key=lambda i: (*where.get(refs[i].sha256, last), i))
    return [refs[i] for i in ranked]


def fill_ranges(n: int, size: int, max_shards: int | None = None) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges of ``n`` positions, about ``size`` each, at most ``max_shards`` of them.

    Always at least one range (``[(0, 0)]`` for ``n`` 0). Raises
    ModerationError for a size or shard cap below 1.
    """
    if size < 1 or (max_shards is not None and max_shards < 1):
        raise ModerationError("a fill range holds at least one reference, and there is at least one range")
    count = max(1, math.ceil(n / size))
    if max_shards is not None:
        count = min(count, max_shards)
    step = math.ceil(n / count) if n else 0
    return [(min(n, i * step), min(n, (i + 1) * step)) for i in range(count)]


def ordered_chunks(cache: VectorCache, refs: Sequence[ImageRef], apply: Apply,
                   read_again: ReadAgain) -> Iterator[Chunk]:
    """(``apply``-ed vectors, ids) of ``refs``, a cache part at a time, in :func:`fill_order`.

    ``cache`` must hold nothing in memory (a fresh instance, or one only
    ever streamed from: streaming keeps nothing, so it serves every pass).
    Refs whose vector the cache lost (a part gone or corrupt) come
    last, from ``read_again``. Every ref comes exactly once.
    """
    ids_of: dict[str, list[str]] = {}
    for r in refs:
        ids_of.setdefault(r.sha256, []).append(r.image_id)
    for shas, vectors in cache.stream(list(ids_of)):
        rows, ids = [], []
        for j, sha in enumerate(shas):
            for rid in ids_of.pop(sha, ()):  # one image under several ids: each gets the vector
                rows.append(j)
                ids.append(rid)
        if ids:
            yield apply(vectors[rows]), ids
    rest = [r for r in refs if r.sha256 in ids_of]
    for s in range(0, len(rest), CHUNK):
        part = rest[s:s + CHUNK]
        yield apply(read_again(part)), [r.image_id for r in part]


@dataclass(frozen=True)
class FillStaging:
    """The staging objects of one sharded build: ``staging/index-fill/MODEL/RUN/``.

    ``run`` is one key segment (an Airflow run id through
    :func:`moderation.orchestration.run_slug`). Reruns of the run overwrite
    the same keys. Reading a missing object raises NotFoundError.
    """

    store: ObjectStore
    model_version: str
    run: str

    @property
    def prefix(self) -> str:
        return f"{STAGING_PREFIX}{self.model_version}/{self.run}/"

    def put_prepared(self, data: dict) -> None:
        self.store.put(self.prefix + "prepared.json", json.dumps(data).encode(), "application/json")

    def prepared(self) -> dict:
        return json.loads(self.store.get(self.prefix + "prepared.json"))

    def put_range(self, i: int, refs: Sequence[ImageRef], build_id: str) -> None:
        """Store range ``i``'s references (what its fill task reads instead of the whole preparation)."""
        rows = [[r.image_id, r.location, r.sha256, r.fingerprint] for r in refs]
        self.store.put(f"{self.prefix}range-{i:05d}.json", json.dumps({"build_id": build_id, "refs": rows}).encode(),
                       "application/json")

    def range_refs(self, i: int, build_id: str) -> list[ImageRef]:
        """Range ``i``'s references; ModerationError unless they were staged for ``build_id``."""
        try:
            data = json.loads(self.store.get(f"{self.prefix}range-{i:05d}.json"))
        except NotFoundError:
            data = {"build_id": None}
        if data["build_id"] != build_id:
            raise ModerationError(f"the build staged under {self.prefix} was prepared again since this fill task "
                                  "was mapped: clear the run's prepare_build task and everything after it")
        return [ImageRef(*row) for row in data["refs"]]

    def put_template(self, template: ReferenceIndex) -> str:
        """Store the trained empty index; returns the sha256 of its staged file."""
        return self._put_index("template", template)

    def template(self) -> ReferenceIndex:
        return self._index("template")

    def put_shard(self, i: int, shard: ReferenceIndex, build_id: str) -> None:
        """Store range ``i``'s filled copy, marked with the prepared build it belongs to."""
        self._put_index(f"shard-{i:05d}", shard)
        self.store.put(f"{self.prefix}shard-{i:05d}.build", build_id.encode(), "text/plain")

    def shard(self, i: int, build_id: str, ids: Sequence[str]) -> ReferenceIndex:
        """Range ``i``'s filled copy; ModerationError unless it was filled for ``build_id`` with exactly ``ids``."""
        try:
            marked = self.store.get(f"{self.prefix}shard-{i:05d}.build").decode()
            shard = self._index(f"shard-{i:05d}")
        except NotFoundError:
            raise ModerationError(f"fill shard {i} of this run is missing from {self.prefix}: run its "
                                  "fill_shard task (or the whole DAG run) again") from None
        if marked != build_id or shard.ids != list(ids):
            raise ModerationError(f"fill shard {i} in {self.prefix} was filled for another preparation of this "
                                  "build: clear the fill_shard tasks of this run so that they fill again")
        return shard

    def clear(self) -> int:
        """Delete every staging object of the run (the prepared build last: a retry can still tell it was done)."""
        keys = sorted(self.store.list(self.prefix), key=lambda k: k.endswith("prepared.json"))
        for key in keys:
            self.store.delete(key)
        return len(keys)

    # Through a local file: an index's bytes in memory beside the index would double the peak.
    def _put_index(self, name: str, index: ReferenceIndex) -> str:
        with tempfile.TemporaryDirectory(prefix="moderation-fill-") as tmp:
            path = Path(tmp) / "index.faiss"
            ids_bytes = index.save(path)
            self.store.put_file(f"{self.prefix}{name}.faiss", path)
            sha = file_sha256(path)
        self.store.put(f"{self.prefix}{name}.ids.json", ids_bytes, "application/json")
        return sha

    def _index(self, name: str) -> ReferenceIndex:
        ids_bytes = self.store.get(f"{self.prefix}{name}.ids.json")
        with tempfile.TemporaryDirectory(prefix="moderation-fill-") as tmp:
            path = Path(tmp) / "index.faiss"
            self.store.get_file(f"{self.prefix}{name}.faiss", path)
            return ReferenceIndex.load(path, ids_bytes)
