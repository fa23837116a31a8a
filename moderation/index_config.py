"""Which FAISS index a reference set of a given size gets: the ``auto`` factory.

``MODERATION_INDEX_FACTORY=auto`` (the default) resolves, per build, from the
number of vectors ``n``:

* ``n < MODERATION_INDEX_FLAT_MAX`` (1,000,000): ``Flat``, exact search;
  below that size an exact scan of 10,000 queries costs minutes on a CPU and
  an IVF index's training costs more than it saves.
* otherwise ``IVF{nlist}_HNSW32,SQ8``: an inverted file with ``nlist`` the
  power of two at or above ``sqrt(n)`` (1,024 at 1M, 4,096 at 10M, 16,384
  at 100M), an HNSW graph over the centroids so that assigning millions of
  vectors (build) and picking the probed lists (search) do not scan every
  centroid, and 8-bit scalar quantisation (a quarter of the float32 size,
  with a recall loss that nearest-neighbour ranking barely sees).

``nprobe`` (lists visited per query) is ``MODERATION_INDEX_NPROBE`` when
set, else :func:`auto_nprobe` of ``nlist``, 1/64 of the lists and at least
32. At 10M synthetic references ``benchmarks/large_index_bench.py`` reaches
recall@10 of 0.95 of exact search from nprobe 8 on its tuning queries; the
rule keeps a margin (64 there, 2.4 % of exact search time) for data whose
neighbourhoods cross list boundaries more than the generator's do. At 1M
(1,024 lists) the tuning queries need more than 16 (0.945 at 16, 0.968 at
32; ``benchmarks/results/large_index_1M.json``), hence the floor of 32.
Any other factory string is used as given (FAISS ``index_factory`` syntax).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from moderation.errors import ConfigError

AUTO = "auto"
DEFAULT_FLAT_MAX = 1_000_000
MIN_NLIST = 64
MAX_NLIST = 65_536
HNSW_COARSE_FROM = 4_096  # below this many lists an exact scan of the centroids is as fast as the graph
TRAIN_PER_LIST = 40  # k-means sample per list: FAISS asks for at least 39
TRAIN_OTHER = 65_536  # sample of a trained factory without lists (PQ, SQ): 256 codes x 256
KMEANS_ITERATIONS = 10  # FAISS's 25 cost 2.5x the training time for centroids that barely move after 10

_IVF = re.compile(r"(?:^|,)IVF(\d+)")


@dataclass(frozen=True)
class IndexOptions:
    """How ``auto`` resolves: the size from which it leaves Flat, and the nprobe (0: by size)."""

    flat_max: int = DEFAULT_FLAT_MAX
    nprobe: int = 0
    train_size: int = 0  # vectors k-means trains on (0: TRAIN_PER_LIST per list)

    def __post_init__(self) -> None:
        if self.flat_max < 1:
            raise ConfigError("MODERATION_INDEX_FLAT_MAX must be at least 1")
        if self.nprobe < 0 or self.train_size < 0:
            raise ConfigError("MODERATION_INDEX_NPROBE and MODERATION_INDEX_TRAIN_SIZE must be 0 (by size) or more")

    @classmethod
    def from_settings(cls, settings) -> IndexOptions:
        return cls(flat_max=settings.index_flat_max, nprobe=settings.index_nprobe,
                   train_size=settings.index_train_size)


@dataclass(frozen=True)
class IndexPlan:
    """A resolved index: its factory string, nprobe (None unless IVF) and the size of the training sample.

    ``train_size`` is only used when the factory needs training (Flat and
    HNSW do not).
    """

    factory: str
    nprobe: int | None
    train_size: int

    @property
    def nlist(self) -> int | None:
        return ivf_lists(self.factory)


def auto_nlist(n: int) -> int:
    """Lists of the inverted file for ``n`` vectors: the power of two at or above sqrt(n), within [64, 65536]."""
    want = 2 ** math.ceil(math.log2(max(math.sqrt(max(n, 1)), 1)))
    return min(MAX_NLIST, max(MIN_NLIST, want))


def auto_nprobe(nlist: int) -> int:
    """Lists probed per query for ``nlist`` lists: 1/64 of them, at least 32 (see the module docstring)."""
    return max(32, nlist // 64)


def auto_factory(n: int, flat_max: int = DEFAULT_FLAT_MAX) -> str:
    """The factory string ``auto`` stands for at ``n`` vectors."""
    if n < flat_max:
        return "Flat"
    nlist = auto_nlist(n)
    coarse = f"IVF{nlist}_HNSW32" if nlist >= HNSW_COARSE_FROM else f"IVF{nlist}"
    return f"{coarse},SQ8"


def ivf_lists(factory: str) -> int | None:
    """``nlist`` of an IVF factory string, None for any other."""
    m = _IVF.search(factory)
    return int(m.group(1)) if m else None


def plan_index(n: int, factory: str = AUTO, options: IndexOptions = IndexOptions()) -> IndexPlan:
    """Resolve ``factory`` (``auto`` or a FAISS string) for ``n`` vectors.

    nprobe: ``options.nprobe`` if set, else :func:`auto_nprobe` (capped at
    nlist); None for a factory without an inverted file. The training
    sample is ``options.train_size``, else TRAIN_PER_LIST per list (IVF) or
    TRAIN_OTHER, never more than n.
    Raises ConfigError for an empty factory string.
    """
    if not factory or not factory.strip():
        raise ConfigError("MODERATION_INDEX_FACTORY is empty: set it to `auto`, `Flat` or a FAISS "
                          "index_factory string such as `IVF4096,SQ8`")
    resolved = auto_factory(n, options.flat_max) if factory.strip().lower() == AUTO else factory.strip()
    nlist = ivf_lists(resolved)
    if nlist is None:
        return IndexPlan(resolved, None, min(n, options.train_size or TRAIN_OTHER))
    nprobe = min(nlist, options.nprobe or auto_nprobe(nlist))
    train = options.train_size or TRAIN_PER_LIST * nlist
    return IndexPlan(resolved, nprobe, min(n, train))
