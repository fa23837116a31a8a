"""Building a reference index from chunks of vectors, never holding all of them.

A build reads its source twice when the index needs training: once to draw
the training sample, once to add every vector, chunk by chunk. Memory is the
index itself, the id list, the sample and one chunk. The sample is the
``train_size`` rows with the smallest keys of a hash of their global row
number, taken in row order: the same rows however the source is cut into
chunks, so a streamed build and an in-memory build of the same vectors are
identical (``build_index`` is this function over one chunk).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from moderation.errors import ModerationError
from moderation.faiss_import import load_faiss
from moderation.index import ReferenceIndex, ivf_of
from moderation.index_config import KMEANS_ITERATIONS, IndexOptions, IndexPlan, plan_index

Chunk = tuple[np.ndarray, list[str]]
ChunkSource = Callable[[], Iterable[Chunk]]  # a fresh pass over the chunks on each call

_HASH_SEED = 0x9E3779B97F4A7C15


def row_keys(start: int, count: int) -> np.ndarray:
    """Sampling keys of rows ``start .. start+count-1`` (splitmix64 of the row number; independent of chunking)."""
    with np.errstate(over="ignore"):
        z = np.arange(start, start + count, dtype=np.uint64) + np.uint64(_HASH_SEED)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@dataclass
class _Sample:
    """The running sample: rows with the smallest keys seen so far."""

    size: int
    keys: np.ndarray | None = None
    rows: np.ndarray | None = None
    vectors: np.ndarray | None = None

    def offer(self, start: int, x: np.ndarray) -> None:
        keys = row_keys(start, len(x))
        rows = np.arange(start, start + len(x), dtype=np.int64)
        if self.keys is not None:
            keys, rows = np.concatenate([self.keys, keys]), np.concatenate([self.rows, rows])
            x = np.concatenate([self.vectors, x])
        if len(keys) > self.size:
            keep = np.argpartition(keys, self.size - 1)[:self.size]
            keys, rows, x = keys[keep], rows[keep], x[keep]
        self.keys, self.rows, self.vectors = keys, rows, np.ascontiguousarray(x)

    def in_row_order(self) -> np.ndarray:
        return self.vectors[np.argsort(self.rows, kind="stable")]


def _checked(chunk: Chunk, dim: int | None) -> tuple[np.ndarray, list[str]]:
    vectors, ids = chunk
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] != len(ids):
        raise ModerationError(f"{len(ids)} ids for vectors of shape {x.shape}")
    if dim is not None and len(ids) and x.shape[1] != dim:
        raise ModerationError(f"a chunk of dimension {x.shape[1]} in a source of dimension {dim}")
    return x, list(ids)


def new_index(plan: IndexPlan, dim: int):
    """An empty FAISS inner-product index for ``plan``; ModerationError naming a bad factory string."""
    faiss = load_faiss()
    try:
        index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ModerationError(f"invalid FAISS factory string {plan.factory!r}: {str(exc).splitlines()[0]}; "
                              "set MODERATION_INDEX_FACTORY to `auto`, `Flat` or e.g. `IVF4096,SQ8`") from None
    ivf = ivf_of(faiss, index)
    if ivf is not None:
        ivf.cp.niter = KMEANS_ITERATIONS
        ivf = faiss.downcast_index(ivf)
        if getattr(ivf, "do_polysemous_training", False):
            # The factory turns it on for IVF-PQ; searches here never use Hamming filtering, and it
            # costs minutes of training.
            ivf.do_polysemous_training = False
        if plan.nprobe:
            ivf.nprobe = plan.nprobe
    return index


def train_empty_index(chunks: ChunkSource, total: int, factory: str = "auto",
                      options: IndexOptions | None = None, *, nprobe: int | None = None) -> ReferenceIndex:
    """An empty index for ``total`` vectors, trained (if its factory needs it) on the planned sample.

    Reads the source once if training is needed (to draw the sample) and
    only its first chunk otherwise. The shards of a sharded build each add
    their vectors to a copy of this index (:mod:`moderation.index_shards`).
    Raises ModerationError on an empty source, mismatched chunks, or a
    sample too small for the factory.
    """
    options = _options(options)
    if total < 1:
        raise ModerationError("no reference vectors to index")
    plan = plan_index(total, factory, options)
    if nprobe is not None:
        plan = IndexPlan(plan.factory, nprobe if plan.nprobe is not None else None, plan.train_size)
    sample = _Sample(plan.train_size)
    dim, start, index = None, 0, None
    for chunk in chunks():
        x, _ = _checked(chunk, dim)
        if not len(x):
            continue
        dim = x.shape[1]
        if index is None:
            index = new_index(plan, dim)
            if index.is_trained:
                break
        sample.offer(start, x)
        start += len(x)
    if index is None:
        raise ModerationError("no reference vectors to index")
    if not index.is_trained:
        train = sample.in_row_order()
        try:
            index.train(train)
        except RuntimeError as exc:
            raise ModerationError(f"cannot train {plan.factory!r} on {len(train)} vectors "
                                  f"({str(exc).splitlines()[0]}); use fewer lists or `Flat`") from None
    return ReferenceIndex(index, [], plan.factory, nprobe=plan.nprobe)


def add_chunks(index: ReferenceIndex, chunks: Iterable[Chunk]) -> ReferenceIndex:
    """Add every chunk to ``index`` in order (in place; returned for chaining).

    Raises ModerationError on a duplicate id (within or across chunks) or a
    chunk of another dimension.
    """
    seen = set(index.ids)
    for chunk in chunks:
        x, ids = _checked(chunk, index.dim)
        if not ids:
            continue
        before = len(seen)
        seen.update(ids)
        if len(seen) != before + len(ids):
            raise ModerationError("reference ids must be unique")
        index.index.add(x)
        index.ids.extend(ids)
    return index


def build_index_streaming(chunks: ChunkSource, total: int, factory: str = "auto",
                          options: IndexOptions | None = None, *, nprobe: int | None = None) -> ReferenceIndex:
    """Build an index over ``total`` vectors that ``chunks()`` yields as (vectors, ids) chunks.

    ``chunks`` is called once per pass (twice for a factory that trains)
    and must yield the same vectors in the same order each time. ``factory``
    ``auto`` resolves by ``total`` (:func:`moderation.index_config.plan_index`;
    ``options`` default to ``Settings.from_env()``'s). Raises
    ModerationError if the passes yield a different number of vectors than
    ``total``, on duplicate ids, mismatched chunks or a bad factory.
    """
    index = train_empty_index(chunks, total, factory, options, nprobe=nprobe)
    add_chunks(index, chunks())
    if len(index) != total:
        raise ModerationError(f"the source yielded {len(index)} vectors, {total} were announced; "
                              "it changed during the build: build again")
    return index


def _options(options: IndexOptions | None) -> IndexOptions:
    if options is not None:
        return options
    from moderation.config import Settings

    return IndexOptions.from_settings(Settings.from_env())
