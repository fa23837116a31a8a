"""Closing the loop: moderators' decisions measure the threshold's real precision.

``calibrate_from_decisions`` estimates the precision of flagged pairs by
score band from the decisions so far and proposes (optionally stores) a
new threshold for the pinned (model, statistics) pair that keeps precision
at or above the target (0.90). ``export_labels`` turns confirmed pairs into
labelled positives and rejected pairs into hard negatives for the next
evaluation and training run.

How the estimate works, and why:

- Only ``confirmed`` and ``rejected`` decisions count (``unsure`` and
  undone decisions do not), and only pairs of runs made with the pinned
  model and statistics versions: another model or whitening has another
  score scale.
- Moderators work the queue best-first, so high scores are reviewed more
  completely than low ones. Pooling decisions would over-weight the top.
  Instead decided pairs are cut into score bands of about equal numbers of
  decisions; each band's precision (confirmed / decided, with a Wilson
  interval) is weighted by the number of pairs *flagged* in that band
  (stratified estimate). The precision above a cut is that weighted mean;
  its interval is a Wilson interval at the Kish effective sample size.
- Decisions exist only above the thresholds that were in force, so nothing
  can be said about lowering the threshold below the lowest decided score.
- Decision rule (asymmetric, conservative): *raise* the threshold only when
  the precision at the current one is significantly below target (upper
  bound < target), to the lowest cut whose estimate reaches the target;
  *lower* it only to a cut whose lower bound is at or above target; else
  keep it. Refuse to move it at all with fewer than ``min_decisions``
  decisions, or when a cut would rest on fewer than ``min_per_band``.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from moderation.errors import ModerationError

TARGET_PRECISION = 0.90
MIN_DECISIONS = 100
MIN_PER_BAND = 20
MAX_BANDS = 20
Z95 = 1.959963984540054


def wilson(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when ``n`` is 0.

    ``successes`` and ``n`` may be fractional (an effective sample size).
    """
    if n <= 0:
        return 0.0, 1.0
    p = min(1.0, max(0.0, successes / n))
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    # Exact at the edges (the closed form leaves 1e-17 crumbs there).
    return (0.0 if p == 0.0 else lo), (1.0 if p == 1.0 else hi)


@dataclass(frozen=True)
class Band:
    """Pairs with ``lo <= score < hi`` (``hi`` None: no upper bound)."""

    lo: float
    hi: float | None
    flagged: int  # every flagged pair in the band, decided or not
    decided: int  # confirmed + rejected
    confirmed: int
    rejected: int
    unsure: int
    precision: float | None
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class Estimate:
    """Precision of the pairs at or above ``threshold`` (stratified over bands)."""

    threshold: float
    precision: float | None
    ci_low: float
    ci_high: float
    decided: int
    flagged: int
    effective_n: float


@dataclass
class Proposal:
    model_version: str | None
    stats_version: str | None
    target_precision: float
    current_threshold: float | None  # None: no threshold in force (see calibrate_from_decisions)
    proposed_threshold: float | None
    action: str  # raise | lower | keep | refuse
    reason: str
    n_decisions: int
    n_confirmed: int
    n_rejected: int
    n_unsure: int
    at_current: Estimate | None
    at_proposed: Estimate | None
    bands: list[Band] = field(default_factory=list)
    calibration_version: str | None = None
    stored: bool = False

    @property
    def moved(self) -> bool:
        return self.action in ("raise", "lower")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["moved"] = self.moved
        return d


def score_bands(rows: Sequence[dict[str, Any]], *, min_per_band: int = MIN_PER_BAND,
                max_bands: int = MAX_BANDS, extra_edges: Sequence[float] = ()) -> list[Band]:
    """Cut pairs into score bands of about ``min_per_band`` decisions each, best first.

    ``rows`` need ``score`` and ``state``. Band edges are scores of decided
    pairs (equal scores never straddle an edge) plus ``extra_edges`` (e.g.
    the current threshold) where decisions lie above them. The lowest band
    reaches down to the lowest decided score; flagged pairs below it are in
    no band (nothing is known about them).
    """
    scores = np.fromiter((r["score"] for r in rows), dtype=np.float64, count=len(rows))
    states = np.array([r["state"] for r in rows], dtype=object)
    is_c, is_r, is_u = states == "confirmed", states == "rejected", states == "unsure"
    decided = np.sort(scores[is_c | is_r])[::-1]
    if decided.size == 0:
        return []
    n_bands = max(1, min(max_bands, decided.size // max(1, min_per_band)))
    per = decided.size / n_bands
    edges = {float(decided[min(decided.size - 1, int(round(per * (k + 1))) - 1)]) for k in range(n_bands)}
    edges.add(float(decided[-1]))
    edges.update(float(e) for e in extra_edges if decided[-1] <= e <= decided[0])
    los = sorted(edges, reverse=True)
    # An extra edge can cut off a slice with no decision in it: it joins the band above,
    # so that every band has a measured precision.
    merged: list[float] = []
    for k, lo in enumerate(los):
        hi = los[k - 1] if k else math.inf
        if merged and not np.any((decided >= lo) & (decided < hi)):
            merged[-1] = lo
        else:
            merged.append(lo)
    bands = []
    for k, lo in enumerate(merged):
        hi = merged[k - 1] if k else None
        inside = (scores >= lo) & (scores < (math.inf if hi is None else hi))
        c, j, u = int(np.sum(inside & is_c)), int(np.sum(inside & is_r)), int(np.sum(inside & is_u))
        lo_ci, hi_ci = wilson(c, c + j)
        bands.append(Band(lo=lo, hi=hi, flagged=int(np.sum(inside)), decided=c + j, confirmed=c, rejected=j,
                          unsure=u, precision=c / (c + j) if c + j else None, ci_low=lo_ci, ci_high=hi_ci))
    return bands


def estimate_at(bands: Sequence[Band], threshold: float) -> Estimate | None:
    """Stratified precision of pairs scoring at or above ``threshold`` (a band's ``lo``).

    None if some band above the cut has flagged pairs but no decision (its
    precision is unknown) or if there is no band at or above the cut.
    """
    used = [b for b in bands if b.lo >= threshold]
    if not used or any(b.decided == 0 and b.flagged > 0 for b in used):
        return None
    used = [b for b in used if b.flagged > 0]
    total = sum(b.flagged for b in used)
    p = sum(b.flagged * b.precision for b in used) / total  # type: ignore[operator]
    n_eff = total * total / sum(b.flagged * b.flagged / b.decided for b in used)
    lo, hi = wilson(p * n_eff, n_eff)
    return Estimate(threshold, p, lo, hi, sum(b.decided for b in used), total, n_eff)


def propose_threshold(rows: Sequence[dict[str, Any]], current_threshold: float, *,
                      target: float = TARGET_PRECISION, min_decisions: int = MIN_DECISIONS,
                      min_per_band: int = MIN_PER_BAND, model_version: str | None = None,
                      stats_version: str | None = None) -> Proposal:
    """Apply the decision rule of this module's docstring to ``rows`` (``score`` and ``state`` each)."""
    if not 0 < target < 1:
        raise ValueError("target precision must be between 0 and 1")
    n_c = sum(r["state"] == "confirmed" for r in rows)
    n_r = sum(r["state"] == "rejected" for r in rows)
    n_u = sum(r["state"] == "unsure" for r in rows)
    bands = score_bands(rows, min_per_band=min_per_band, extra_edges=[current_threshold])
    cur = estimate_at(bands, current_threshold) if bands else None

    def result(action: str, proposed: float, reason: str, at: Estimate | None) -> Proposal:
        return Proposal(model_version, stats_version, target, current_threshold, proposed, action, reason,
                        n_c + n_r, n_c, n_r, n_u, cur, at, bands)

    if n_c + n_r < min_decisions:
        return result("refuse", current_threshold,
                      f"only {n_c + n_r} confirmed/rejected decisions; at least {min_decisions} are "
                      "needed before the threshold is moved", None)
    if cur is None:
        return result("refuse", current_threshold,
                      "no decisions on pairs at or above the current threshold", None)
    cuts = [e for e in (estimate_at(bands, b.lo) for b in bands)
            if e is not None and e.decided >= min_per_band]
    if cur.ci_high < target:
        up = sorted((e for e in cuts if e.threshold > current_threshold and e.precision >= target),
                    key=lambda e: e.threshold)
        if not up:
            return result("keep", current_threshold,
                          f"precision at the current threshold is {cur.precision:.3f} (95% CI "
                          f"{cur.ci_low:.3f}-{cur.ci_high:.3f}), below target, but no higher cut with "
                          f"{min_per_band}+ decisions reaches {target:.2f}: check the model and statistics, "
                          "or collect more decisions", None)
        e = up[0]
        return result("raise", e.threshold,
                      f"precision at the current threshold is {cur.precision:.3f} (95% CI "
                      f"{cur.ci_low:.3f}-{cur.ci_high:.3f}), significantly below {target:.2f}; the lowest "
                      f"cut reaching it is {e.threshold:.4f} ({e.precision:.3f}, CI {e.ci_low:.3f}-"
                      f"{e.ci_high:.3f})", e)
    down = sorted((e for e in cuts if e.threshold < current_threshold and e.ci_low >= target),
                  key=lambda e: e.threshold)
    if down:
        e = down[0]
        return result("lower", e.threshold,
                      f"pairs down to {e.threshold:.4f} have precision {e.precision:.3f} with 95% CI lower "
                      f"bound {e.ci_low:.3f} >= {target:.2f}", e)
    return result("keep", current_threshold,
                  f"precision at the current threshold is {cur.precision:.3f} (95% CI {cur.ci_low:.3f}-"
                  f"{cur.ci_high:.3f}): not significantly below {target:.2f}, and no decisions support a "
                  "lower threshold", cur)


def calibrate_from_decisions(p, *, store: bool = False, target_precision: float = TARGET_PRECISION,
                             min_decisions: int = MIN_DECISIONS,
                             min_per_band: int = MIN_PER_BAND) -> dict[str, Any]:
    """``moderation calibrate --from-decisions [--store]``: propose (and optionally store) a threshold.

    Uses the pinned chain (current model, its index's statistics) and the
    threshold in force for it. With ``store`` and a proposal that moves the
    threshold, publishes a calibration version (source ``decisions``) that
    the next matching run uses. Returns the proposal as a JSON-able dict
    (``action``: raise | lower | keep | refuse; ``bands``; estimates with
    95% intervals; ``calibration_version`` when stored). With no threshold
    in force (``moderation.thresholds``: nothing is flagged) the action is
    ``refuse`` and the thresholds are None: decisions can move a threshold,
    not set the first one.
    """
    from moderation import review
    from moderation.jobs import flag_threshold, pin
    from moderation.registry import Calibration, Kind, new_version_id

    from moderation.two_stage import TwoStageConfig

    pinned = pin(p)
    choice = flag_threshold(p, pinned)
    current, source, combiner = choice.value, choice.source, choice.combiner
    rows = review.pair_states(p.db, model_version=pinned.model.version, stats_version=pinned.stats.version)
    # A pair only PDQ flagged was not chosen by the threshold: its decision says nothing about where it lies.
    rows = [r for r in rows if r.get("match_source", "sscd") != "pdq"]
    proposal = propose_threshold(rows, current if choice.flags else math.inf, target=target_precision,
                                 min_decisions=min_decisions, min_per_band=min_per_band,
                                 model_version=pinned.model.version, stats_version=pinned.stats.version)
    if not choice.flags:
        proposal = replace(proposal, action="refuse", current_threshold=None, proposed_threshold=None,
                           at_proposed=None, reason=f"{source}: calibrate on a labelled set first "
                           "(`moderation calibrate --images DIR --ground-truth gt.csv`)")
    out_note = None
    if store and proposal.moved:
        at = proposal.at_proposed
        record = Calibration(
            version=new_version_id(), model_version=pinned.model.version, stats_version=pinned.stats.version,
            threshold=proposal.proposed_threshold, target_precision=target_precision, source="decisions",
            metrics={"precision": at.precision, "ci_low": at.ci_low, "ci_high": at.ci_high,
                     "decided": at.decided, "flagged": at.flagged, "n_decisions": proposal.n_decisions,
                     "previous_threshold": current, "action": proposal.action},
            info={"index_version": pinned.index.version, "previous_source": source,
                  "reason": proposal.reason},
            # Decisions move the threshold on the score matching flags on: keep the combiner in
            # force and the matching settings it belongs to, so the new threshold stays on that scale.
            combiner=combiner.to_dict() if combiner.kind != "rule" else {},
            matching=TwoStageConfig.from_settings(p.settings).as_dict())
        record = p.registry.publish(Kind.CALIBRATION, record, {})
        p.db.record_calibration(record)
        proposal.calibration_version = record.version
        proposal.stored = True
        if p.settings.threshold:
            out_note = ("stored, but MODERATION_THRESHOLD is set and overrides calibrations; unset it "
                        "for the new threshold to take effect")
    elif store:
        out_note = "nothing stored: the threshold does not move"
    d = proposal.to_dict()
    d["threshold_source"] = source
    if out_note:
        d["note"] = out_note
    return d


# -- labels for the next evaluation and training run -------------------------------------------

LABEL_COLUMNS = ("query_id", "reference_id", "score", "raw_score", "query_key", "reference_key",
                 "pair_id", "run_id", "batch", "model_version", "decided_by", "decided_at")


def export_labels(db, out_dir: Path | None = None, *, store=None,
                  prefix: str | None = None) -> dict[str, Any]:
    """Write decisions as labels: ``positives.csv``, ``hard_negatives.csv``, ``ground_truth.csv``.

    - positives: confirmed pairs (labelled copies, for evaluation and as
      training positives);
    - hard_negatives: rejected pairs (look-alikes the model scored high);
    - ground_truth: ``query_id,reference_id`` (the DISC21 format
      ``moderation calibrate --ground-truth`` reads): each query with a
      confirmed pair names its best-scoring confirmed reference; a query
      whose flagged pairs were all rejected gets an empty reference (no
      known match).

    Undone and ``unsure`` decisions are left out. Ids are written verbatim
    (CSV-quoted). Writes to ``out_dir`` and/or to the object store under
    ``prefix`` (default ``labels/decisions/<UTC timestamp>``). Returns
    counts and where the files went.
    """
    from moderation import review
    from moderation.hash_banks import ID_PREFIX

    rows = review.pair_states(db, states=("confirmed", "rejected"))
    # A hash-bank entry has no image to train on.
    rows = [r for r in rows if not str(r["reference_id"]).startswith(ID_PREFIX)]
    pos = [r for r in rows if r["state"] == "confirmed"]
    neg = [r for r in rows if r["state"] == "rejected"]
    best: dict[str, dict[str, Any]] = {}
    for r in pos:
        if r["query_id"] not in best or r["score"] > best[r["query_id"]]["score"]:
            best[r["query_id"]] = r
    negative_queries = sorted({r["query_id"] for r in neg} - set(best))
    files = {"positives.csv": _csv(LABEL_COLUMNS, pos), "hard_negatives.csv": _csv(LABEL_COLUMNS, neg),
             "ground_truth.csv": _csv(("query_id", "reference_id"),
                                      [{"query_id": q, "reference_id": best[q]["reference_id"]}
                                       for q in sorted(best)]
                                      + [{"query_id": q, "reference_id": ""} for q in negative_queries])}
    where: dict[str, Any] = {}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (out / name).write_bytes(data)
        where["folder"] = str(out)
    if store is not None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        base = (prefix or f"labels/decisions/{stamp}").strip("/")
        for name, data in files.items():
            store.put(f"{base}/{name}", data, "text/csv")
        where["prefix"] = base
    if not where:
        raise ModerationError("export_labels needs out_dir or store")
    return {"positives": len(pos), "hard_negatives": len(neg), "queries_with_match": len(best),
            "queries_without_match": len(negative_queries),
            "multi_match_queries": len(pos) - len(best), **where}


def _csv(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r.get(c) is None else _cell(r.get(c)) for c in columns])
    # surrogateescape: ids that came from undecodable file names round-trip byte for byte.
    return buf.getvalue().encode("utf-8", "surrogateescape")


def _cell(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


__all__ = ["wilson", "score_bands", "estimate_at", "propose_threshold", "calibrate_from_decisions",
           "export_labels", "Band", "Estimate", "Proposal"]
