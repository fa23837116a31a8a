"""Choosing the flagging threshold from a labelled query set.

The threshold is the lowest normalised score at which the pooled
predictions still reach the target precision (0.90): the RP90 operating
point. It belongs to a (model, statistics) pair because whitening and SN
change the score scale.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from moderation.errors import ModerationError
from moderation.fusion import Combiner
from moderation.matching import Candidate
from moderation.metrics import Metrics, evaluate


@dataclass(frozen=True)
class CalibrationResult:
    threshold: float
    target_precision: float
    metrics: dict  # uap, uap_sn, rp90, recall_at_1, ...
    reached: bool  # False: the target precision was never reached; threshold flags almost nothing


def calibrate(candidates: list[Candidate], gt: Mapping[str, str | None],
              target_precision: float = 0.9) -> CalibrationResult:
    """Metrics on raw and normalised scores, and the threshold for ``target_precision``.

    Raises ModerationError if the labelled set has no positive query.
    """
    if not any(r is not None for r in gt.values()):
        raise ModerationError("the ground truth has no query with a reference; cannot calibrate")
    unknown = {c.query_id for c in candidates} - set(gt)
    if unknown:
        raise ModerationError(f"{len(unknown)} queries are missing from the ground truth "
                              f"(e.g. {sorted(unknown)[:3]})")
    raw: Metrics = evaluate([_raw(c) for c in candidates], gt, target_precision)
    sn: Metrics = evaluate([c.prediction() for c in candidates], gt, target_precision)
    metrics = {
        "uap": raw.uap, "uap_sn": sn.uap,
        "rp90": raw.rp90, "rp90_sn": sn.rp90,
        "recall_at_1": sn.recall_at_1,
        "rp90_threshold_raw": raw.rp90_threshold,
        "n_queries": len(gt), "n_positives": sn.n_positives, "n_predictions": sn.n_predictions,
    }
    if sn.rp90_threshold is None:
        top = max((c.score for c in candidates), default=0.0)
        return CalibrationResult(top + 1e-6, target_precision, metrics, reached=False)
    return CalibrationResult(sn.rp90_threshold, target_precision, metrics, reached=True)


def _raw(c: Candidate):
    from moderation.metrics import Prediction

    return Prediction(c.query_id, c.reference_id, c.raw_score)


@dataclass(frozen=True)
class FusedCalibration:
    """A fitted score combiner and the thresholds chosen on its fused scores."""

    combiner: Combiner
    threshold: float  # target precision (0.90): the review queue
    reached: bool
    high_threshold: float | None  # high precision (0.99): automatic action; None if never reached
    high_precision: float
    metrics: dict


def calibrate_fused(candidates: list[Candidate], gt: Mapping[str, str | None], *, k: int = 10,
                    target_precision: float = 0.9, high_precision: float = 0.99) -> FusedCalibration:
    """Fit the combiner on every two-stage candidate of a labelled set, then choose its thresholds.

    ``candidates`` come from :func:`moderation.two_stage.match_queries` with
    ``keep_all``; the combiner sees all of them, the thresholds and metrics
    the top ``k`` per query after re-scoring, as matching will produce them.
    Raises ModerationError if the set has no positive query or no positive pair.
    """
    from moderation.fusion import fit_combiner
    from moderation.two_stage import pair_matrix, rescore

    labels = [gt.get(c.query_id) is not None and gt.get(c.query_id) == c.reference_id for c in candidates]
    combiner = fit_combiner(pair_matrix(candidates), labels)
    final = rescore(candidates, combiner, k)
    res = calibrate(final, gt, target_precision)
    high = evaluate([c.prediction() for c in final], gt, high_precision)
    # calibrate() names the final score's figures *_sn (the score matching flags on); say so plainly.
    metrics = {**res.metrics, "uap_final": res.metrics["uap_sn"], "rp90_final": res.metrics["rp90_sn"],
               "threshold": res.threshold, "high_threshold": high.rp90_threshold,
               f"recall_at_{round(high_precision * 100)}": high.rp90,
               "combiner_fit": combiner.info}
    return FusedCalibration(combiner, res.threshold, res.reached, high.rp90_threshold, high_precision, metrics)
