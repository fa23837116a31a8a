"""The reference index: FAISS build, serialise, search.

Vectors are unit-norm, so inner product is cosine similarity. The factory
string is FAISS's ``index_factory`` syntax: ``Flat`` (exact, the default),
``IVF4096,Flat``, ``IVF4096,PQ64``, ``HNSW32``... Positions in the index map
to reference ids through ``ids`` (kept beside the index), stable for the
life of an index version.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from moderation.errors import ModerationError
from moderation.faiss_import import load_faiss


@dataclass
class ReferenceIndex:
    """A FAISS index and the reference id of each position.

    ``skip`` holds positions that searches pass over (operators' removal
    list, applied at search time so a disabled reference stops matching
    without a rebuild); see :meth:`without`.
    """

    index: object  # faiss.Index
    ids: list[str]
    factory: str = "Flat"
    skip: frozenset[int] = field(default_factory=frozenset)

    def without(self, reference_ids: Iterable[str]) -> ReferenceIndex:
        """This index (shared, not copied) with searches that never return ``reference_ids``.

        Ids not in the index are ignored.
        """
        drop = set(reference_ids)
        return replace(self, skip=frozenset(i for i, rid in enumerate(self.ids) if rid in drop))

    def add(self, vectors: np.ndarray, ids: list[str]) -> None:
        """Append vectors (already post-processed, as at build) under ``ids``; ModerationError on a clash."""
        if set(ids) & set(self.ids) or len(set(ids)) != len(ids):
            raise ModerationError("reference ids must be unique")
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] != len(ids) or (len(ids) and x.shape[1] != self.dim):
            raise ModerationError(f"{len(ids)} ids for vectors of shape {x.shape}, index dimension {self.dim}")
        if len(ids):
            self.index.add(x)
            self.ids.extend(ids)

    def remove(self, reference_ids: Iterable[str]) -> int:
        """Delete ``reference_ids`` from the index in place; returns how many were there (others are ignored).

        The remaining references keep their order and are renumbered 0..n-1,
        so ``ids`` stays the position -> id map (for IVF the stored labels are
        rewritten to match). Raises ModerationError for an index type FAISS
        cannot remove from (HNSW): rebuild it instead.
        """
        drop = set(reference_ids)
        gone = np.fromiter((i for i, rid in enumerate(self.ids) if rid in drop), dtype=np.int64)
        if not len(gone):
            return 0
        faiss = load_faiss()
        skipped = {self.ids[i] for i in self.skip}
        try:
            removed = self.index.remove_ids(gone)
        except RuntimeError as exc:
            raise ModerationError(f"a {self.factory!r} index cannot remove references ({exc}); "
                                  "rebuild it in full") from None
        if removed != len(gone):
            raise ModerationError(f"FAISS removed {removed} of {len(gone)} references; the index is inconsistent")
        keep = np.ones(len(self.ids), dtype=bool)
        keep[gone] = False
        try:
            ivf = faiss.extract_index_ivf(self.index)
        except RuntimeError:
            ivf = None  # flat codes: FAISS compacts positions itself, in order
        if ivf is not None:
            # IVF lists keep the labels given at add time: map them onto the compacted positions.
            new_pos = np.cumsum(keep) - 1
            lists = ivf.invlists
            for list_no in range(ivf.nlist):
                size = lists.list_size(list_no)
                if size:
                    labels = faiss.rev_swig_ptr(lists.get_ids(list_no), size)
                    labels[:] = new_pos[labels]
        self.ids = [rid for rid, k in zip(self.ids, keep) if k]
        self.skip = frozenset(i for i, rid in enumerate(self.ids) if rid in skipped)
        return int(len(gone))

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
        scores, idx = self._search(q, k)
        scores = np.where(idx < 0, -np.inf, scores).astype(np.float32)
        ids = [[self.ids[j] for j in row if j >= 0] for row in idx]
        return scores, ids

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.skip:
            return self.index.search(q, k)
        faiss = load_faiss()
        skip = np.fromiter(sorted(self.skip), dtype=np.int64)
        batch = faiss.IDSelectorBatch(skip)
        selector = faiss.IDSelectorNot(batch)
        try:
            return self.index.search(q, k, params=_selector_params(faiss, self.index, selector))
        except (RuntimeError, TypeError):
            # An index type without selector support: fetch enough to drop the skipped positions.
            scores, idx = self.index.search(q, min(k + len(skip), len(self)))
            keep = ~np.isin(idx, skip)
            out_s = np.full((q.shape[0], k), -np.inf, np.float32)
            out_i = np.full((q.shape[0], k), -1, np.int64)
            for row in range(q.shape[0]):
                s_row, i_row = scores[row][keep[row]][:k], idx[row][keep[row]][:k]
                out_s[row, :len(s_row)], out_i[row, :len(i_row)] = s_row, i_row
            return out_s, out_i

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


def _selector_params(faiss, index, selector):
    """Search parameters carrying ``selector``, of the type the index expects (IVF and HNSW keep their own knobs)."""
    try:
        ivf = faiss.extract_index_ivf(index)
        return faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe)
    except RuntimeError:
        pass
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None:
        return faiss.SearchParametersHNSW(sel=selector, efSearch=hnsw.efSearch)
    return faiss.SearchParameters(sel=selector)


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
