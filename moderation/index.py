"""The reference index: FAISS build, serialise, search.

Vectors are unit-norm, so inner product is cosine similarity. The factory
string is ``auto`` (chosen by size, see :mod:`moderation.index_config`) or
FAISS's ``index_factory`` syntax: ``Flat`` (exact), ``IVF4096,SQ8``,
``IVF4096,PQ64``, ``HNSW32``... Positions in the index map to reference ids
through ``ids`` (kept beside the index), stable for the life of an index
version. Building from chunks without holding every vector is
:mod:`moderation.index_stream`; shards, :mod:`moderation.index_shards`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from moderation.errors import ModerationError
from moderation.faiss_import import load_faiss


@dataclass
class ReferenceIndex:
    """A FAISS index and the reference id of each position.

    ``skip`` holds positions that searches pass over (operators' removal
    list, applied at search time so a disabled reference stops matching
    without a rebuild); see :meth:`without`. ``factory`` is the resolved
    factory string (never ``auto``). ``nprobe``: inverted lists each search
    visits (None: not an IVF index, or the value stored in the index).
    """

    index: object  # faiss.Index
    ids: list[str]
    factory: str = "Flat"
    skip: frozenset[int] = field(default_factory=frozenset)
    nprobe: int | None = None
    mapped: bool = False  # memory-mapped from a file (load(mmap=True)): read-only

    def without(self, reference_ids: Iterable[str]) -> ReferenceIndex:
        """This index (shared, not copied) with searches that never return ``reference_ids``.

        Ids not in the index are ignored.
        """
        drop = set(reference_ids)
        return replace(self, skip=frozenset(i for i, rid in enumerate(self.ids) if rid in drop))

    def add(self, vectors: np.ndarray, ids: list[str]) -> None:
        """Append vectors (already post-processed, as at build) under ``ids``.

        ModerationError on a clash, or on a memory-mapped index (read-only).
        """
        if self.mapped:
            # FAISS aborts the process on a write to mapped codes; refuse before it gets there.
            raise ModerationError("this index is memory-mapped and read-only; load it with mmap=False to add "
                                  "references to it")
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
        faiss = load_faiss()
        if not self.skip:
            # Passed per call, not set on the index: searches from several threads share one index.
            params = _ivf_params(faiss, self.index, None, self.nprobe)
            return self.index.search(q, k) if params is None else self.index.search(q, k, params=params)
        skip = np.fromiter(sorted(self.skip), dtype=np.int64)
        batch = faiss.IDSelectorBatch(skip)
        selector = faiss.IDSelectorNot(batch)
        try:
            return self.index.search(q, k, params=_selector_params(faiss, self.index, selector, self.nprobe))
        except (RuntimeError, TypeError):
            # An index type without selector support.
            return self._search_dropping(q, k)

    def _search_dropping(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Fetch enough to drop the skipped positions (for index types that take no selector)."""
        faiss = load_faiss()
        skip = np.fromiter(sorted(self.skip), dtype=np.int64)
        wide = min(k + len(skip), len(self))
        params = _ivf_params(faiss, self.index, None, self.nprobe)
        scores, idx = self.index.search(q, wide) if params is None else self.index.search(q, wide, params=params)
        keep = ~np.isin(idx, skip)
        out_s = np.full((q.shape[0], k), -np.inf, np.float32)
        out_i = np.full((q.shape[0], k), -1, np.int64)
        for row in range(q.shape[0]):
            s_row, i_row = scores[row][keep[row]][:k], idx[row][keep[row]][:k]
            out_s[row, :len(s_row)], out_i[row, :len(i_row)] = s_row, i_row
        return out_s, out_i

    def serialise(self) -> tuple[bytes, bytes]:
        faiss = load_faiss()
        return faiss.serialize_index(self.index).tobytes(), self._meta()

    def _meta(self) -> bytes:
        meta = {"ids": self.ids, "factory": self.factory}
        if self.nprobe is not None:  # absent otherwise: a Flat index's id list keeps its bytes (and content hash)
            meta["nprobe"] = self.nprobe
        return json.dumps(meta).encode()

    @classmethod
    def deserialise(cls, index_bytes: bytes, ids_bytes: bytes) -> ReferenceIndex:
        faiss = load_faiss()
        index = faiss.deserialize_index(np.frombuffer(index_bytes, dtype=np.uint8))
        return cls._from_parts(index, ids_bytes)

    def save(self, index_path: Path | str) -> bytes:
        """Write the FAISS index to a local file (for :meth:`load`); returns the id list's bytes to keep beside it."""
        load_faiss().write_index(self.index, str(index_path))
        return self._meta()

    @classmethod
    def load(cls, index_path: Path | str, ids_bytes: bytes, *, mmap: bool = False) -> ReferenceIndex:
        """An index from a local file written by :meth:`save` (or :meth:`serialise`'s bytes saved as a file).

        ``mmap=True`` maps the file instead of reading it: the vectors stay
        in the page cache, shared by every process that maps the same file,
        and are paged in as searches touch them. The file must outlive the
        index and must not be rewritten meanwhile; a mapped index is
        read-only (:meth:`add` raises). Index types FAISS cannot map are
        read into memory as usual. Raises ModerationError if the
        file is missing or is not a FAISS index, or disagrees with the ids.
        """
        faiss = load_faiss()
        path = Path(index_path)
        if not path.is_file():
            raise ModerationError(f"index file {path} does not exist; write it with ReferenceIndex.save first")
        # IO_FLAG_MMAP_IFC ("in-file codes") maps both flat codes and IVF lists; IO_FLAG_MMAP maps only the latter.
        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError as exc:
            raise ModerationError(f"{path} is not a readable FAISS index ({str(exc).splitlines()[0]})") from None
        return replace(cls._from_parts(index, ids_bytes), mapped=mmap)

    @classmethod
    def _from_parts(cls, index, ids_bytes: bytes) -> ReferenceIndex:
        meta = json.loads(ids_bytes)
        if len(meta["ids"]) != index.ntotal:
            raise ModerationError("index and id list disagree in length; the artifact is corrupt")
        return cls(index, meta["ids"], meta.get("factory", "Flat"), nprobe=meta.get("nprobe"))


def ivf_of(faiss, index):
    """The IVF inside ``index`` (behind a transform or refinement too), or None."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _ivf_params(faiss, index, selector, nprobe: int | None):
    """SearchParametersIVF for an IVF index (``nprobe`` or the index's own), else None."""
    ivf = ivf_of(faiss, index)
    if ivf is None:
        return None
    nprobe = nprobe or ivf.nprobe
    params = faiss.SearchParametersIVF(nprobe=nprobe) if selector is None else \
        faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
    if getattr(faiss.downcast_index(ivf.quantizer), "hnsw", None) is not None:
        # An HNSW coarse quantizer must return nprobe good lists, not just the nearest few; its own
        # efSearch stays low because adding millions of vectors assigns each through the same graph.
        params.quantizer_params = faiss.SearchParametersHNSW(efSearch=max(16, 2 * nprobe))
    return params


def _selector_params(faiss, index, selector, nprobe: int | None = None):
    """Search parameters carrying ``selector``, of the type the index expects (IVF and HNSW keep their own knobs)."""
    params = _ivf_params(faiss, index, selector, nprobe)
    if params is not None:
        return params
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None:
        return faiss.SearchParametersHNSW(sel=selector, efSearch=hnsw.efSearch)
    return faiss.SearchParameters(sel=selector)


def build_index(vectors: np.ndarray, ids: list[str], factory: str = "Flat",
                nprobe: int | None = None, *, options=None) -> ReferenceIndex:
    """Build an inner-product index over ``vectors`` (n, d) with reference ``ids``.

    ``factory`` ``auto`` resolves by size (:func:`moderation.index_config.plan_index`
    with ``options``, default: those of ``Settings.from_env()``); the
    result's ``factory`` is the resolved string. ``nprobe`` overrides the
    planned one. A factory that needs training trains on the planned sample
    of the vectors (the same rows :func:`moderation.index_stream.build_index_streaming`
    picks, so both builds are identical). Raises ModerationError on
    mismatched lengths, duplicate ids, an invalid factory, or an IVF factory
    with fewer vectors than it needs to train.
    """
    from moderation.index_stream import build_index_streaming

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or len(ids) != x.shape[0]:
        raise ModerationError(f"{len(ids)} ids for {x.shape[0] if x.ndim == 2 else '?'} vectors")
    return build_index_streaming(lambda: [(x, list(ids))], x.shape[0], factory, options, nprobe=nprobe)
