"""Search every view of every query and merge the candidates per (query, reference).

Each view is post-processed, searched and score-normalised exactly as a
whole query is (:func:`moderation.matching.search`), so the background
set keeps each crop's scores honest: a crop of sky or a plain wall scores
high against many references and its normalised score drops accordingly.
A reference's candidate score is its best normalised score over the
query's views; the view that gave it is recorded.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from moderation.index import ReferenceIndex
from moderation.matching import Candidate, MatchParams, search
from moderation.statistics import BackgroundIndex, Postprocessor


WHOLE_VIEWS = frozenset({"full", "mirror"})


def search_views(vectors: np.ndarray, owner: np.ndarray, view_names: list[str], query_ids: list[str],
                 index: ReferenceIndex, postprocessor: Postprocessor | None,
                 background: BackgroundIndex | None, params: MatchParams, *,
                 k_view: int | None = None, crop_penalty: float = 0.0) -> list[Candidate]:
    """Top ``params.k`` merged candidates per query, best first, ranks 1..k.

    ``vectors[j]`` is view ``view_names[j]`` of query ``query_ids[owner[j]]``.
    Each view contributes its top ``k_view`` (default ``params.k``) references.
    A crop view's normalised score is lowered by ``crop_penalty`` before the
    merge: a query has many crops and each is a fresh chance for a chance
    match, while the whole image (and its mirror) is one.
    """
    k_view = k_view or params.k
    view_keys = [str(j) for j in range(len(view_names))]
    per_view = search(vectors, view_keys, index, postprocessor, background, replace(params, k=k_view))
    best: dict[tuple[int, str], Candidate] = {}
    for c in per_view:
        j = int(c.query_id)
        q = int(owner[j])
        if crop_penalty and view_names[j] not in WHOLE_VIEWS:
            c = replace(c, score=c.score - crop_penalty)
        key = (q, c.reference_id)
        old = best.get(key)
        if old is None or c.score > old.score:
            best[key] = Candidate(query_ids[q], c.reference_id, c.raw_score, c.score, 0, view=view_names[j])
    by_query: dict[int, list[Candidate]] = {}
    for (q, _), c in best.items():
        by_query.setdefault(q, []).append(c)
    out: list[Candidate] = []
    for q in sorted(by_query):
        ranked = sorted(by_query[q], key=lambda c: (-c.score, c.reference_id))[:params.k]
        out += [replace(c, rank=r + 1) for r, c in enumerate(ranked)]
    return out
