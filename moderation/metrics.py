"""DISC21 descriptor-track metrics: μAP, RP90 (with its threshold), recall@1.

All predictions of all queries are pooled and ranked by decreasing score;
equal scores rank pessimistically (incorrect before correct). A prediction
is correct when its (query, reference) pair is in the ground truth. N is
the number of queries with a match in the ground truth passed, predicted or
not: a positive without a prediction is a miss. Callers pass the ground
truth of the evaluated set's queries, including those that failed to
decode (:func:`moderation.evaluation.restrict_ground_truth`); dropping those
would shrink N and make μAP and RP90 read high.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from moderation.errors import ModerationError


@dataclass(frozen=True)
class Prediction:
    query_id: str
    reference_id: str
    score: float


@dataclass(frozen=True)
class Metrics:
    uap: float
    rp90: float
    rp90_threshold: float | None
    recall_at_1: float
    n_predictions: int
    n_positives: int

    def as_dict(self) -> dict:
        return asdict(self)


def read_ground_truth(path: Path) -> dict[str, str | None]:
    """``query_id,reference_id`` CSV (header optional); empty reference = no match.

    Raises ModerationError on a malformed file or a duplicated query.
    """
    gt: dict[str, str | None] = {}
    # utf-8-sig: a CSV saved by a spreadsheet starts with a BOM, which must not turn
    # the header into a query with a match.
    with open(path, newline="", encoding="utf-8-sig") as fh:
        for lineno, row in enumerate(csv.reader(fh), 1):
            if not row or (lineno == 1 and row[0].strip() == "query_id"):
                continue
            if len(row) < 1 or len(row) > 2:
                raise ModerationError(f"{path}:{lineno}: expected query_id,reference_id")
            q = row[0].strip()
            r = row[1].strip() if len(row) > 1 else ""
            if q in gt:
                raise ModerationError(f"{path}:{lineno}: query {q} appears twice")
            gt[q] = r or None
    return gt


def _ranked(predictions: Iterable[Prediction], gt: Mapping[str, str | None]):
    preds = list(predictions)
    seen = set()
    for p in preds:
        key = (p.query_id, p.reference_id)
        if key in seen:
            raise ModerationError(f"duplicate prediction for pair {key}")
        seen.add(key)
    scores = np.array([p.score for p in preds], dtype=np.float64)
    correct = np.array([gt.get(p.query_id) is not None and gt.get(p.query_id) == p.reference_id
                        for p in preds], dtype=bool)
    # Sort by score desc; among ties incorrect (0) first: key (-score, correct).
    order = np.lexsort((correct.astype(np.int8), -scores))
    return scores[order], correct[order]


def precision_recall(predictions: Iterable[Prediction], gt: Mapping[str, str | None]):
    """(precision, recall, score) at every rank of the pooled, pessimistically ordered list."""
    scores, correct = _ranked(predictions, gt)
    n_pos = sum(1 for r in gt.values() if r is not None)
    tp = np.cumsum(correct)
    ranks = np.arange(1, len(correct) + 1)
    precision = tp / np.maximum(ranks, 1)
    recall = tp / n_pos if n_pos else np.zeros_like(precision)
    return precision, recall, scores


def micro_ap(predictions: Iterable[Prediction], gt: Mapping[str, str | None]) -> float:
    precision, recall, _ = precision_recall(predictions, gt)
    if len(recall) == 0:
        return 0.0
    deltas = np.diff(np.concatenate([[0.0], recall]))
    return float((deltas * precision).sum())


def recall_at_precision(predictions: Iterable[Prediction], gt: Mapping[str, str | None],
                        target: float = 0.9) -> tuple[float, float | None]:
    """Highest recall at any rank whose precision >= target, and that rank's score.

    Returns (0.0, None) when the target precision is never reached.
    """
    precision, recall, scores = precision_recall(predictions, gt)
    ok = np.nonzero(precision >= target)[0]
    if len(ok) == 0:
        return 0.0, None
    best = ok[np.argmax(recall[ok])]
    # Among ranks with the same best recall, the last one has the lowest score. A
    # threshold flags every prediction scoring >= it, so only a rank that ends its
    # run of equal scores is an operating point (the first best rank always is one).
    same = ok[recall[ok] == recall[best]]
    ends = same[(same == len(scores) - 1) | (scores[np.minimum(same + 1, len(scores) - 1)] < scores[same])]
    best = ends.max()
    return float(recall[best]), float(scores[best])


def recall_at_1(predictions: Iterable[Prediction], gt: Mapping[str, str | None]) -> float:
    """Fraction of matched queries whose true reference strictly outscores all others."""
    best: dict[str, list] = {}
    for p in predictions:
        cur = best.setdefault(p.query_id, [-np.inf, set()])
        if p.score > cur[0]:
            cur[0], cur[1] = p.score, {p.reference_id}
        elif p.score == cur[0]:
            cur[1].add(p.reference_id)
    positives = [q for q, r in gt.items() if r is not None]
    if not positives:
        return 0.0
    hits = sum(1 for q in positives if q in best and best[q][1] == {gt[q]})
    return hits / len(positives)


def evaluate(predictions: Iterable[Prediction], gt: Mapping[str, str | None],
             target_precision: float = 0.9) -> Metrics:
    preds = list(predictions)
    rp, thr = recall_at_precision(preds, gt, target_precision)
    return Metrics(uap=micro_ap(preds, gt), rp90=rp, rp90_threshold=thr,
                   recall_at_1=recall_at_1(preds, gt), n_predictions=len(preds),
                   n_positives=sum(1 for r in gt.values() if r is not None))


def precision_at(predictions: Iterable[Prediction], gt: Mapping[str, str | None], threshold: float) -> float:
    """Fraction of correct predictions among those scoring >= threshold (nan if none)."""
    sel = [p for p in predictions if p.score >= threshold]
    if not sel:
        return float("nan")
    return sum(1 for p in sel if gt.get(p.query_id) == p.reference_id) / len(sel)


def recall_at_k(predictions: Iterable[Prediction], gt: Mapping[str, str | None], k: int) -> float:
    """Fraction of matched queries whose true reference is among their ``k`` best predictions.

    The ceiling any re-scoring of those candidates can reach.
    """
    per_query: dict[str, list[Prediction]] = {}
    for p in predictions:
        per_query.setdefault(p.query_id, []).append(p)
    positives = [q for q, r in gt.items() if r is not None]
    if not positives:
        return 0.0
    hits = 0
    for q in positives:
        top = sorted(per_query.get(q, []), key=lambda p: -p.score)[:k]
        hits += any(p.reference_id == gt[q] for p in top)
    return hits / len(positives)


def recall_at(predictions: Iterable[Prediction], gt: Mapping[str, str | None], threshold: float) -> float:
    """Fraction of matched queries whose true pair scores >= threshold (what flagging finds)."""
    positives = sum(1 for r in gt.values() if r is not None)
    if not positives:
        return 0.0
    hit = {p.query_id for p in predictions if p.score >= threshold and gt.get(p.query_id) == p.reference_id}
    return len(hit) / positives
