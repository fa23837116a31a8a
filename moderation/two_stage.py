"""Two-stage matching: query views -> global search -> local-feature verification -> one fused score.

::

    query -> views (whole, mirror, grid crops, trim, proposals) -> descriptor -> search + SN per view
          -> merge per reference (best view) -> top-k
          -> verify each candidate above the floor (local features, ratio test, MAGSAC, coverage;
             mirrored query too), in worker processes
          -> fused score (the calibration's combiner, or the additive default rule)

:func:`match_queries` is the one implementation used by the match job, the
calibration job and the benchmarks. With ``verify`` off it is the global
stage alone (views still apply, unless the spec is ``full``).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from moderation.config import Settings
from moderation.fusion import DEFAULT_RULE, Combiner, pair_features
from moderation.images import Failure, ImageRef
from moderation.index import ReferenceIndex
from moderation.local_features import Detector, FeatureConfig
from moderation.matching import Candidate, MatchParams
from moderation.pdq import PdqHash
from moderation.query_analysis import QueryAnalysis, analyse_queries
from moderation.statistics import BackgroundIndex, Postprocessor
from moderation.verification import QueryTask, Verification, VerifyConfig, verify_many
from moderation.view_search import search_views
from moderation.views import ViewConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TwoStageConfig:
    """The match job's second-stage settings; recorded with each run and each calibration."""

    views: ViewConfig = ViewConfig()
    verify: bool = True
    features: FeatureConfig = FeatureConfig()
    verifier: VerifyConfig = VerifyConfig()
    k: int = 10  # candidates kept per query (after re-ranking by the final score)
    view_k: int = 10
    crop_penalty: float = 0.0
    verify_topk: int = 10
    verify_floor: float = -1.0
    workers: int = 2

    @classmethod
    def from_settings(cls, s: Settings) -> TwoStageConfig:
        return cls(views=ViewConfig.parse(s.views), verify=s.verify,
                   features=FeatureConfig(Detector(s.local_features.value), s.max_local_features),
                   k=s.topk, view_k=s.view_topk, crop_penalty=s.view_crop_penalty, verify_topk=s.verify_topk,
                   verify_floor=s.verify_floor,
                   workers=s.verify_workers)

    def as_dict(self) -> dict:
        return {"views": self.views.spec, "verify": self.verify, "features": self.features.key(),
                "verifier": {"ratio": self.verifier.ratio, "mutual": self.verifier.mutual,
                             "geometry": self.verifier.geometry.value,
                             "reprojection_px": self.verifier.reprojection_px,
                             "try_mirror": self.verifier.try_mirror},
                "k": self.k, "view_k": self.view_k, "crop_penalty": self.crop_penalty,
                "verify_topk": self.verify_topk,
                "verify_floor": self.verify_floor}


# Queries analysed, searched and verified together: bounds memory (a query's local features,
# plain and mirrored, take about 0.3 MB) whatever the size of the day's batch.
QUERY_CHUNK = 1024


@dataclass
class TwoStageResult:
    """Final candidates (``score`` = fused score, best first per query) and what it took.

    ``refs`` are the queries that decoded (with sha256), ``full`` their
    whole-image vectors in the same order.
    """

    refs: list[ImageRef]
    full: np.ndarray
    candidates: list[Candidate]
    failures: list[Failure]
    seconds: dict[str, float] = field(default_factory=dict)
    n_verified: int = 0
    views_per_query: float = 1.0
    pdq: dict[str, PdqHash] = field(default_factory=dict)  # query id -> PDQ hash, when asked for

    @property
    def ids(self) -> list[str]:
        return [r.image_id for r in self.refs]


def _dedupe(refs: list[ImageRef]) -> tuple[list[ImageRef], list[Failure]]:
    """The first image of each id; the others are failures (two files with one stem would collide)."""
    seen: set[str] = set()
    keep, dup = [], []
    for ref in refs:
        if ref.image_id in seen:
            dup.append(Failure(ref.image_id, ref.location, "duplicate_id", "another file has the same id"))
        else:
            seen.add(ref.image_id)
            keep.append(ref)
    return keep, dup


def match_queries(model: Callable, source, settings: Settings, config: TwoStageConfig, index: ReferenceIndex,
                  postprocessor: Postprocessor | None, background: BackgroundIndex | None, *,
                  reference_features: Callable[[str], object] | None = None, combiner: Combiner | None = None,
                  cache=None, device=None, keep_all: bool = False,
                  chunk: int = QUERY_CHUNK, pdq_cache=None) -> TwoStageResult:
    """Run both stages over ``source``, ``chunk`` queries at a time.

    ``settings`` must carry the model's preprocessing
    (``LoadedModel.settings_for``); ``reference_features(id)`` returns a
    reference's LocalFeatures or None (required when ``config.verify``).
    ``keep_all`` keeps every merged candidate (``max(k, verify_topk)`` per
    query) instead of the top ``k``: the calibration fits on all of them.
    With ``pdq_cache``, each query's PDQ hash (from the same decode) is in
    ``TwoStageResult.pdq``; PDQ matching itself is the caller's.
    Raises ModerationError when verification is on without a feature source.
    """
    from tqdm import tqdm

    from moderation.errors import ModerationError

    if config.verify and reference_features is None:
        raise ModerationError("verification needs the references' local features")
    refs, failures = _dedupe(list(source.refs()))
    out = TwoStageResult([], np.zeros((0, 0), np.float32), [], failures, {"analyse": 0.0, "search": 0.0, "verify": 0.0})
    fulls, n_views = [], 0
    bar = tqdm(total=len(refs), desc="matching queries", unit="img", file=sys.stderr,
               disable=not settings.progress or len(refs) <= chunk, dynamic_ncols=True)
    quiet = replace(settings, progress=settings.progress and len(refs) <= chunk)
    for start in range(0, len(refs), chunk):
        part = refs[start:start + chunk]
        t0 = time.perf_counter()
        analysis = analyse_queries(model, source, quiet, config.views, config.features if config.verify else None,
                                   cache=cache, device=device, refs=part, pdq_cache=pdq_cache)
        out.pdq.update({r.image_id: h for r, h in zip(analysis.refs, analysis.pdq) if h is not None})
        out.seconds["analyse"] += time.perf_counter() - t0
        done = match_analysis(analysis, quiet, config, index, postprocessor, background,
                              reference_features=reference_features, combiner=combiner, keep_all=keep_all)
        out.refs += done.refs
        fulls.append(done.full)
        out.candidates += done.candidates
        out.failures += done.failures
        out.n_verified += done.n_verified
        n_views += len(analysis.view_names)
        for key in ("search", "verify"):
            out.seconds[key] += done.seconds[key]
        bar.update(len(part))
    bar.close()
    out.full = np.concatenate(fulls) if fulls else out.full
    out.views_per_query = n_views / max(1, len(out.refs))
    log.info("two-stage matching: %d queries, %.1f views each, %d pairs verified; analyse %.1fs, search %.1fs, "
             "verify %.1fs", len(out.refs), out.views_per_query, out.n_verified, out.seconds["analyse"],
             out.seconds["search"], out.seconds["verify"])
    return out


def _final_order(c: Candidate):
    """Best final score first; ties by the global score, then by id (deterministic ranks)."""
    return -c.score, -(c.global_score or 0.0), c.reference_id


def _view_kind(name: str) -> str:
    return name.split("_", 1)[0]


def match_analysis(analysis: QueryAnalysis, settings: Settings, config: TwoStageConfig, index: ReferenceIndex,
                   postprocessor: Postprocessor | None, background: BackgroundIndex | None, *,
                   reference_features: Callable[[str], object] | None = None, combiner: Combiner | None = None,
                   keep_all: bool = False,
                   memo: dict[tuple[str, str], Verification] | None = None) -> TwoStageResult:
    """Search, verify and fuse for already analysed queries; only the views ``config.views`` names are used.

    ``memo`` (benchmarks) reuses verifications already made for the same pairs.
    """
    combiner = combiner or DEFAULT_RULE
    if not analysis.refs:  # nothing decoded: nothing to search (the failures are the result)
        return TwoStageResult([], analysis.full, [], list(analysis.failures), {"search": 0.0, "verify": 0.0})
    t1 = time.perf_counter()
    ids = analysis.ids
    wanted = {k.value for k in config.views.kinds}
    mask = np.array([_view_kind(n) in wanted for n in analysis.view_names], bool).reshape(-1)
    pool_k = max(config.k, config.verify_topk if config.verify else 0)
    params = MatchParams(k=pool_k, beta=settings.sn_beta, sn_neighbors=settings.sn_neighbors)
    names = [n for n, m in zip(analysis.view_names, mask) if m]
    cands = search_views(analysis.vectors[mask], analysis.owner[mask], names, ids, index, postprocessor,
                         background, params, k_view=max(config.view_k, 1), crop_penalty=config.crop_penalty)
    t2 = time.perf_counter()
    verifications: dict[tuple[str, str], Verification] = {}
    if config.verify and config.verify_topk > 0:
        verifications = _verify(analysis, cands, config, reference_features, settings.progress, memo)
    t3 = time.perf_counter()
    scored = []
    for c in cands:
        v = verifications.get((c.query_id, c.reference_id))
        final = combiner.score_pair(c.score, v) if config.verify else c.score
        scored.append(replace(c, score=final, global_score=c.score, verification=v))
    by_query: dict[str, list[Candidate]] = {}
    for c in scored:
        by_query.setdefault(c.query_id, []).append(c)
    out: list[Candidate] = []
    for qid in ids:
        ranked = sorted(by_query.get(qid, []), key=_final_order)
        if not keep_all:
            ranked = ranked[:config.k]
        out += [replace(c, rank=r + 1) for r, c in enumerate(ranked)]
    return TwoStageResult(analysis.refs, analysis.full, out, list(analysis.failures),
                          {"search": t2 - t1, "verify": t3 - t2}, len(verifications), analysis.views_per_query())


def _verify(analysis: QueryAnalysis, cands: list[Candidate], config: TwoStageConfig, reference_features,
            progress: bool, memo: dict | None = None) -> dict[tuple[str, str], Verification]:
    pos = {ref.image_id: i for i, ref in enumerate(analysis.refs)}
    per_query: dict[str, list[str]] = {}
    for c in cands:
        if c.rank <= config.verify_topk and c.score >= config.verify_floor:
            if memo is None or (c.query_id, c.reference_id) not in memo:
                per_query.setdefault(c.query_id, []).append(c.reference_id)
    tasks = []
    for qid, rids in per_query.items():
        i = pos[qid]
        q = analysis.features[i]
        if q is None or len(q) == 0:
            continue  # no usable features: nothing to verify, never an error
        tasks.append(QueryTask(qid, q, analysis.mirrored[i] if config.verifier.try_mirror else None,
                               tuple((rid, reference_features(rid)) for rid in rids)))
    done = verify_many(tasks, config.features, config.verifier, workers=config.workers, progress=progress)
    if memo is None:
        return done
    memo.update(done)
    return {(c.query_id, c.reference_id): memo[(c.query_id, c.reference_id)] for c in cands
            if (c.query_id, c.reference_id) in memo and c.rank <= config.verify_topk
            and c.score >= config.verify_floor}


def pair_matrix(candidates: list[Candidate]) -> np.ndarray:
    """The combiner's feature matrix of candidates that went through :func:`match_queries`."""
    return np.array([pair_features(c.global_score if c.global_score is not None else c.score, c.verification)
                     for c in candidates], np.float64).reshape(-1, 5)


def rescore(candidates: list[Candidate], combiner: Combiner, k: int | None = None) -> list[Candidate]:
    """Candidates re-scored by ``combiner`` and re-ranked per query (top ``k`` if given)."""
    scores = combiner.score(pair_matrix(candidates)) if candidates else np.zeros(0)
    by_query: dict[str, list[Candidate]] = {}
    for c, s in zip(candidates, scores):
        by_query.setdefault(c.query_id, []).append(replace(c, score=float(s)))
    out = []
    for qid, cs in by_query.items():
        ranked = sorted(cs, key=_final_order)
        out += [replace(c, rank=r + 1) for r, c in enumerate(ranked[:k] if k else ranked)]
    return out
