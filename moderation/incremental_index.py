"""Bring a published index up to date instead of building it again: remove what left, add what came.

Used by :func:`moderation.jobs.build_reference_index` when the previous
index version has the same statistics version and factory. An index that
needs training (IVF, PQ) keeps its trained quantiser while the reference
set stays within ``retrain_growth`` times the count it was trained on
(recorded in the version's ``info["trained_count"]``); beyond that, or for
an index FAISS cannot remove from (HNSW), the caller rebuilds in full.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from moderation.errors import ModerationError
from moderation.index import ReferenceIndex
from moderation.registry import IndexVersion


def content_hash(stats_version: str, factory: str, rows: Iterable[tuple[str, str, str, str]],
                 held_ids: Iterable[str], failed: Iterable[tuple[str, ...]] = ()) -> str:
    """The content hash of an index version without its vectors in memory.

    ``rows`` are (id, location, sha256, bank) per reference: the vectors are a
    function of the sha256, the model and the statistics version, so equal
    rows, statistics and factory mean an equal index. ``failed`` rows (the
    manifest's failed references) count too, so that a new lasting failure
    is published and not read again; without any the hash is what it was
    before they were recorded.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps([stats_version, factory]).encode())
    for row in sorted(rows):
        digest.update(json.dumps(list(row)).encode())
        digest.update(b"\n")
    digest.update(json.dumps(sorted(held_ids)).encode())
    failed_rows = sorted(list(row) for row in failed)
    if failed_rows:
        digest.update(json.dumps(["failed", failed_rows]).encode())
    return digest.hexdigest()


def trained_count(index: ReferenceIndex) -> int | None:
    """How many vectors a fresh build of this index trains on (all of them), or None if it needs no training."""
    from moderation.faiss_import import load_faiss

    fresh = load_faiss().index_factory(index.dim, index.factory)
    return None if fresh.is_trained else len(index)


def can_update(previous: IndexVersion, stats_version: str, factory: str, new_count: int,
               retrain_growth: float) -> tuple[bool, str]:
    """(True, "") if ``previous`` can be updated in place to ``new_count`` references, else (False, why)."""
    if previous.stats_version != stats_version:
        return False, f"statistics changed ({previous.stats_version} -> {stats_version})"
    if previous.factory != factory:
        return False, f"factory changed ({previous.factory} -> {factory})"
    trained = previous.info.get("trained_count")
    if trained and new_count > retrain_growth * trained:
        return False, (f"{new_count} references > {retrain_growth:g} x the {trained} the quantiser was trained "
                       "on (MODERATION_INDEX_RETRAIN_GROWTH): retraining")
    return True, ""


def update_index(index: ReferenceIndex, keep: Sequence[str], stale: set[str],
                 vectors_of: Callable[[list[str]], np.ndarray]) -> dict[str, int]:
    """Make ``index`` hold exactly the ids of ``keep``: drop the rest and ``stale`` ids, add the missing.

    ``stale`` ids are in the index with content that changed: removed and
    added again. ``vectors_of(ids)`` returns the post-processed vectors of
    the ids to add, in order. Raises ModerationError if FAISS cannot remove
    from this index type. Returns the counts removed and added.
    """
    wanted = set(keep)
    drop = {rid for rid in index.ids if rid not in wanted or rid in stale}
    removed = index.remove(drop)
    present = set(index.ids)
    add = [rid for rid in keep if rid not in present]
    if add:
        index.add(vectors_of(add), add)
    if len(index) != len(wanted):
        raise ModerationError(f"the updated index holds {len(index)} references, expected {len(wanted)}")
    return {"removed": removed, "added": len(add)}


def held_vectors(ids: Sequence[str], previous: Mapping[str, np.ndarray],
                 vectors_of: Callable[[list[str]], np.ndarray], dim: int) -> np.ndarray:
    """Vectors of the held-out ``ids``: from the previous version's held-out file where given, else ``vectors_of``."""
    out = np.zeros((len(ids), dim), np.float32)
    fetch = [i for i, rid in enumerate(ids) if rid not in previous]
    for i, rid in enumerate(ids):
        if rid in previous:
            out[i] = previous[rid]
    if fetch:
        out[fetch] = vectors_of([ids[i] for i in fetch])
    return out
