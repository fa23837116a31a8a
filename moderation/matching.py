"""Matching: search the reference index, normalise scores, apply the threshold.

Input descriptors are raw model outputs; they are post-processed with the
*same* statistics version the index was built with (the caller passes the
pinned ``Postprocessor``), searched top-k, and score-normalised against the
background set (SSCD defaults: beta = 1, neighbours 1..3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moderation.index import ReferenceIndex
from moderation.metrics import Prediction
from moderation.statistics import BackgroundIndex, Postprocessor, normalise_scores


@dataclass(frozen=True)
class Candidate:
    """One (query, reference) candidate; ``score`` is the score used for ranking and flagging.

    After the global stage ``score`` is the normalised score (SN) and
    ``global_score`` is None. After two-stage matching ``score`` is the fused
    final score, ``global_score`` the best normalised score over the query's
    views, ``view`` the view that gave it, and ``verification`` the
    geometric evidence (a :class:`moderation.verification.Verification`,
    or None when the pair was not verified).
    """

    query_id: str
    reference_id: str
    raw_score: float
    score: float
    rank: int
    view: str = "full"
    global_score: float | None = None
    verification: Any = None

    def prediction(self) -> Prediction:
        return Prediction(self.query_id, self.reference_id, self.score)


@dataclass(frozen=True)
class MatchParams:
    k: int = 10
    beta: float = 1.0
    sn_neighbors: int = 3
    use_sn: bool = True


def search(query_vectors: np.ndarray, query_ids: list[str], index: ReferenceIndex,
           postprocessor: Postprocessor | None, background: BackgroundIndex | None,
           params: MatchParams = MatchParams(), chunk: int = 65536) -> list[Candidate]:
    """All top-k candidates for the queries, with raw and normalised scores.

    ``query_vectors`` are raw descriptors (n, d). Without a background set
    (or with ``use_sn`` off) the normalised score equals the raw score.
    """
    out: list[Candidate] = []
    for start in range(0, len(query_ids), chunk):
        q = query_vectors[start:start + chunk]
        qids = query_ids[start:start + chunk]
        if postprocessor is not None:
            q = postprocessor.apply(q)
        scores, ids = index.search(q, params.k)
        if background is not None and params.use_sn:
            bg = background.neighbour_scores(q, params.sn_neighbors)
            normed = normalise_scores(scores, bg, params.beta, 1, params.sn_neighbors)
        else:
            normed = scores
        for row, qid in enumerate(qids):
            for rank, rid in enumerate(ids[row]):
                out.append(Candidate(qid, rid, float(scores[row, rank]), float(normed[row, rank]), rank + 1))
    return out


def flagged(candidates: list[Candidate], threshold: float) -> list[Candidate]:
    """Candidates whose normalised score is at or above ``threshold``, best first."""
    return sorted((c for c in candidates if c.score >= threshold), key=lambda c: -c.score)


def candidates_csv(candidates: list[Candidate]) -> str:
    """DISC21 prediction format: ``query_id,reference_id,score`` (normalised score).

    Ids holding a comma, quote or newline are quoted per RFC 4180.
    """
    return _csv_text(["query_id", "reference_id", "score"],
                     ((c.query_id, c.reference_id, f"{c.score:.6f}") for c in candidates))


def _csv_text(header, rows) -> str:
    """RFC 4180 text with "\\n" line ends; a field holding a carriage return is quoted too.

    (The csv module quotes only the characters of its line terminator, so
    with "\\n" endings a bare "\\r" in an id would otherwise split the row
    for readers that treat it as a line break.)
    """
    import csv
    import io

    buf = io.StringIO()
    plain = csv.writer(buf, lineterminator="\n")
    quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    plain.writerow(header)
    for row in rows:
        (quoted if any("\r" in str(v) for v in row) else plain).writerow(row)
    return buf.getvalue()


VERIFICATION_COLUMNS = ("query_id", "reference_id", "rank", "score", "global_score", "raw_score", "view",
                        "verified", "matches", "inliers", "inlier_ratio", "query_coverage",
                        "reference_coverage", "mirrored")


def verification_csv(candidates: list[Candidate]) -> str:
    """Every candidate with its global score, best view and verification features (a run artifact).

    ``verified`` is empty for a pair that was not verified (outside the
    budget, below the floor, or no usable features).
    """
    def row(c: Candidate) -> list:
        v = c.verification
        feats = v.features() if v is not None else {}
        return [c.query_id, c.reference_id, c.rank, f"{c.score:.6f}",
                "" if c.global_score is None else f"{c.global_score:.6f}", f"{c.raw_score:.6f}",
                c.view, "" if v is None else int(v.verified), *(feats.get(k, "") for k in VERIFICATION_COLUMNS[8:])]

    return _csv_text(VERIFICATION_COLUMNS, (row(c) for c in candidates))
