"""Sharded index builds: one trained empty index, shards that fill copies of it, merged or searched together.

The shape of a sharded build on Airflow: one task trains the empty index
(:func:`moderation.index_stream.train_empty_index`) and publishes its bytes;
mapped tasks each add one shard's vectors to a copy (:func:`build_shard`);
a last task merges the shards (:func:`merge_shards`: the IVF's inverted
lists are concatenated, shard by shard, which is what adding every vector
to one index in shard order gives: the merged index answers exactly as a
single build over the concatenated shards). Flat shards can also be
searched together without merging (:func:`search_together`, FAISS
``IndexShards``), each shard's positions offset by the sizes before it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from moderation.errors import ModerationError
from moderation.faiss_import import load_faiss
from moderation.index import ReferenceIndex, ivf_of
from moderation.index_stream import Chunk, add_chunks


def build_shard(template: ReferenceIndex, chunks: Iterable[Chunk]) -> ReferenceIndex:
    """A copy of the (trained, empty) ``template`` with ``chunks`` added; the template is untouched.

    Raises ModerationError if the template is not empty or not trained, or
    on a duplicate id or a chunk of another dimension.
    """
    faiss = load_faiss()
    if len(template) or not template.index.is_trained:
        raise ModerationError("a shard starts from a trained, empty index: build it with "
                              "index_stream.train_empty_index")
    shard = ReferenceIndex(faiss.clone_index(template.index), [], template.factory, nprobe=template.nprobe)
    return add_chunks(shard, chunks)


def merge_shards(shards: Sequence[ReferenceIndex]) -> ReferenceIndex:
    """One index holding every shard's vectors, positions in shard order.

    The vectors move, as FAISS merges: every shard is left empty (no id, no
    vector), so a merge never holds two copies of the data. All shards must
    come from copies of one trained template (same factory, same coarse
    centroids and codec); raises ModerationError, with the shards
    unchanged, when they do not, when there are none, or when a reference
    id is in two shards.
    """
    faiss = load_faiss()
    if not shards:
        raise ModerationError("no shards to merge")
    first = shards[0]
    if any(shard.mapped for shard in shards):
        raise ModerationError("a memory-mapped shard cannot be merged (its lists are read-only): load the shards "
                              "with mmap=False, or search them together")
    fingerprint = _codec_fingerprint(faiss, first.index)
    for other in shards[1:]:
        if other.factory != first.factory or other.dim != first.dim \
                or _codec_fingerprint(faiss, other.index) != fingerprint:
            raise ModerationError("shards were not built from one trained template (different factory, "
                                  "centroids or codec); build every shard from the same train_empty_index")
    ids = [rid for shard in shards for rid in shard.ids]
    if len(set(ids)) != len(ids):
        raise ModerationError("a reference id is in more than one shard; give each reference to one shard")
    merged = first.index
    ivf = ivf_of(faiss, merged) is not None
    for other in shards[1:]:
        try:
            # An IVF stores positions in its lists: add_id shifts the other shard's past everything merged
            # so far. Flat codes are positional already and take no shift.
            merged.merge_from(other.index, merged.ntotal if ivf else 0)
        except RuntimeError as exc:
            raise ModerationError(f"FAISS cannot merge {first.factory!r} shards ({str(exc).splitlines()[0]}); "
                                  "search them together instead (search_together) if they are Flat") from None
    result = ReferenceIndex(merged, ids, first.factory, nprobe=first.nprobe)
    first.index = _empty_clone(faiss, merged)
    for shard in shards:
        shard.ids = []
    return result


def search_together(shards: Sequence[ReferenceIndex]) -> ReferenceIndex:
    """An index that searches every shard and merges the results, without copying them.

    Positions are shard order (shard i's first position follows the
    vectors of shards 0..i-1), so ids and searches agree with
    :func:`merge_shards`. The shards are shared, not copied: do not add to
    them afterwards. Raises ModerationError for no shards, mixed factories
    or dimensions, or duplicate ids. Not serialisable: merge to publish.
    """
    faiss = load_faiss()
    if not shards:
        raise ModerationError("no shards to search")
    first = shards[0]
    if any(s.factory != first.factory or s.dim != first.dim for s in shards):
        raise ModerationError("shards of different factories or dimensions cannot be searched together")
    ids = [rid for shard in shards for rid in shard.ids]
    if len(set(ids)) != len(ids):
        raise ModerationError("a reference id is in more than one shard; give each reference to one shard")
    together = faiss.IndexShards(first.dim, True, True)  # threaded, successive ids
    for shard in shards:
        together.add_shard(shard.index)
    together.own_indices = False  # the shards stay theirs; FAISS's Python wrapper keeps them referenced
    return _Together(together, ids, first.factory, nprobe=first.nprobe)


class _Together(ReferenceIndex):
    """A ReferenceIndex over ``faiss.IndexShards``.

    IndexShards hands one selector to every shard, which would read global
    positions as each shard's local ones; skipped positions are therefore
    dropped from an over-fetched search instead (the generic path).
    """

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.skip:
            return self.index.search(q, k)
        return self._search_dropping(q, k)

    def add(self, vectors: np.ndarray, ids: list[str]) -> None:
        raise ModerationError("shards searched together cannot grow: merge them (merge_shards) first")

    def serialise(self) -> tuple[bytes, bytes]:
        raise ModerationError("shards searched together are not one index: merge them (merge_shards) to publish")


def _codec_fingerprint(faiss, index) -> bytes:
    """Bytes of what a merge needs shared: the coarse centroids and the codec's trained parameters."""
    ivf = ivf_of(faiss, index)
    if ivf is None:
        return faiss.serialize_index(_empty_clone(faiss, index)).tobytes()
    ivf = faiss.downcast_index(ivf)
    parts = [ivf.quantizer.reconstruct_n(0, ivf.nlist).tobytes()]
    for attr in ("sq", "pq"):
        codec = getattr(ivf, attr, None)
        if codec is not None:
            trained = codec.trained if attr == "sq" else codec.centroids
            parts.append(faiss.vector_to_array(trained).tobytes())
    return b"".join(parts)


def _empty_clone(faiss, index):
    """An empty index with ``index``'s training."""
    clone = faiss.clone_index(index)
    clone.reset()
    return clone
