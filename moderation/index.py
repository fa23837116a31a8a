"""The reference index: FAISS build, serialise, search.

Vectors are unit-norm, so inner product is cosine similarity. The factory
string is FAISS's ``index_factory`` syntax: ``Flat`` (exact, the default),
``IVF4096,Flat``, ``IVF4096,PQ64``, ``HNSW32``... Positions in the index map
to reference ids through ``ids`` (kept beside the index), stable for the
life of an index version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from moderation.errors import ModerationError
from moderation.faiss_import import load_faiss


@dataclass
class ReferenceIndex:
    index: object  # faiss.Index
    ids: list[str]
    factory: str = "Flat"

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Top-``k`` (scores (nq, k'), reference ids) per query, k' = min(k, size).

        Rows are sorted by decreasing score; FAISS's -1 (not enough
        results, e.g. an IVF probe that found few) is dropped from the ids
        and its score set to -inf.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ModerationError(f"query vectors have dimension {q.shape[-1]}, index has {self.dim}")
        k = min(k, len(self))
        if k == 0 or q.shape[0] == 0:
            return np.zeros((q.shape[0], 0), np.float32), [[] for _ in range(q.shape[0])]
        scores, idx = self.index.search(q, k)
        scores = np.where(idx < 0, -np.inf, scores).astype(np.float32)
        ids = [[self.ids[j] for j in row if j >= 0] for row in idx]
        return scores, ids

    def serialise(self) -> tuple[bytes, bytes]:
        faiss = load_faiss()
        return (faiss.serialize_index(self.index).tobytes(),
                json.dumps({"ids": self.ids, "factory": self.factory}).encode())

    @classmethod
    def deserialise(cls, index_bytes: bytes, ids_bytes: bytes) -> ReferenceIndex:
        faiss = load_faiss()
        index = faiss.deserialize_index(np.frombuffer(index_bytes, dtype=np.uint8))
        meta = json.loads(ids_bytes)
        if len(meta["ids"]) != index.ntotal:
            raise ModerationError("index and id list disagree in length; the artifact is corrupt")
        return cls(index, meta["ids"], meta.get("factory", "Flat"))


def build_index(vectors: np.ndarray, ids: list[str], factory: str = "Flat",
                nprobe: int = 16) -> ReferenceIndex:
    """Build an inner-product index over ``vectors`` (n, d) with reference ``ids``.

    Trains the index on the vectors themselves when the factory needs it.
    Raises ModerationError on mismatched lengths, duplicate ids, or an IVF
    factory with fewer vectors than it needs to train.
    """
    faiss = load_faiss()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or len(ids) != x.shape[0]:
        raise ModerationError(f"{len(ids)} ids for {x.shape[0] if x.ndim == 2 else '?'} vectors")
    if len(set(ids)) != len(ids):
        raise ModerationError("reference ids must be unique")
    if x.shape[0] == 0:
        raise ModerationError("no reference vectors to index")
    try:
        index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ModerationError(f"invalid FAISS factory string {factory!r}: {exc}") from None
    if not index.is_trained:
        try:
            index.train(x)
        except RuntimeError as exc:
            raise ModerationError(f"cannot train {factory!r} on {x.shape[0]} vectors: {exc}") from None
    index.add(x)
    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except RuntimeError:
        pass  # not an IVF index
    return ReferenceIndex(index, list(ids), factory)
