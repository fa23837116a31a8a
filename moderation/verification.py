"""Geometric verification of (query, reference) candidate pairs with local features.

For each pair: match descriptors (nearest neighbour with Lowe's ratio test,
optionally mutual), fit a robust geometric model from the reference to the
query (a homography with MAGSAC++ by default, or a partial affine transform
with RANSAC), and measure the evidence: the inlier count, the inlier ratio,
and the area that the inliers span in each image (their convex hull as a
fraction of the image). A shared logo, watermark or caption gives inliers
packed into a small area of the reference; a real copy spreads them over
most of it, so coverage is what separates the two.

The mirrored query is tried too (its own features: SIFT is not
mirror-invariant), and the better of the two is kept.

Contract: :func:`verify_pair` never raises on image content; too few
features or matches, or a degenerate model, give a result with
``inliers == 0``. It imports no torch, so :func:`verify_many` can run pairs
in worker processes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from moderation.local_features import FeatureConfig, LocalFeatures, root_sift

log = logging.getLogger(__name__)


class GeometryModel(str, Enum):
    HOMOGRAPHY = "homography"  # perspective, crops, scaling, rotation (default)
    AFFINE = "affine"  # partial affine (rotation, uniform scale, translation): fewer false fits


@dataclass(frozen=True)
class VerifyConfig:
    ratio: float = 0.8  # Lowe's ratio test
    mutual: bool = False  # also require the match to be mutual nearest neighbours
    geometry: GeometryModel = GeometryModel.HOMOGRAPHY
    reprojection_px: float = 6.0  # inlier threshold, in detection-image pixels (long side max_side)
    max_iters: int = 2000
    confidence: float = 0.999
    try_mirror: bool = True
    min_matches: int = 6  # fewer tentative matches: no model is fitted
    keep_points: int = 60  # inlier correspondences kept per pair for the evidence image
    # What "verified" means for a yes/no answer (evidence, the run artifact); the fused
    # score uses the continuous evidence instead.
    min_inliers: int = 8
    min_coverage: float = 0.1  # of the reference's area (a shared logo covers little of it)


@dataclass(frozen=True)
class Verification:
    """The geometric evidence of one pair. ``inliers == 0`` means nothing verified.

    ``homography`` maps reference detection-image pixels to query
    detection-image pixels (of the mirrored query when ``mirrored``);
    ``query_points``/``reference_points`` are up to ``keep_points`` inlier
    correspondences in those pixels.
    """

    matches: int = 0
    inliers: int = 0
    verified: bool = False
    inlier_ratio: float = 0.0
    query_coverage: float = 0.0
    reference_coverage: float = 0.0
    mirrored: bool = False
    homography: tuple[float, ...] | None = None
    query_size: tuple[int, int] = (0, 0)
    reference_size: tuple[int, int] = (0, 0)
    query_points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32), repr=False)
    reference_points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32), repr=False)

    def features(self) -> dict[str, float]:
        """The numbers the fused score uses and the run artifact keeps."""
        return {"verified": self.verified, "matches": self.matches, "inliers": self.inliers, "inlier_ratio": round(self.inlier_ratio, 4),
                "query_coverage": round(self.query_coverage, 4),
                "reference_coverage": round(self.reference_coverage, 4), "mirrored": self.mirrored}


NOT_VERIFIED = Verification()


def _matches(q: LocalFeatures, r: LocalFeatures, binary: bool, cfg: VerifyConfig) -> tuple[np.ndarray, np.ndarray]:
    """Tentative correspondences (query points, reference points) after the ratio test."""
    import cv2

    if len(q) < 2 or len(r) < 2:
        return np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)
    if binary:
        qd, rd, norm = q.descriptors, r.descriptors, cv2.NORM_HAMMING
    else:
        qd, rd, norm = root_sift(q.descriptors), root_sift(r.descriptors), cv2.NORM_L2
    matcher = cv2.BFMatcher(norm)
    knn = matcher.knnMatch(qd, rd, k=2)
    pairs = [(m.queryIdx, m.trainIdx) for m, *rest in (x for x in knn if x)
             if not rest or m.distance < cfg.ratio * rest[0].distance]
    if cfg.mutual and pairs:
        back = {m.queryIdx: m.trainIdx for m in matcher.match(rd, qd)}
        pairs = [(qi, ri) for qi, ri in pairs if back.get(ri) == qi]
    # One reference point may take several query points; keep each reference point once.
    seen: set[int] = set()
    unique = []
    for qi, ri in pairs:
        if ri not in seen:
            seen.add(ri)
            unique.append((qi, ri))
    if not unique:
        return np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)
    idx = np.array(unique)
    return q.points[idx[:, 0]], r.points[idx[:, 1]]


def _hull_fraction(points: np.ndarray, width: int, height: int) -> float:
    import cv2

    if len(points) < 3 or width <= 0 or height <= 0:
        return 0.0
    hull = cv2.convexHull(points.astype(np.float32))
    return float(min(1.0, cv2.contourArea(hull) / float(width * height)))


def _plausible(h: np.ndarray, r_size: tuple[int, int]) -> bool:
    """Reject degenerate fits: collapsed, mirrored-by-projection or absurdly scaled mappings."""
    import cv2

    w, hh = r_size
    corners = np.array([[0, 0], [w, 0], [w, hh], [0, hh]], np.float32).reshape(-1, 1, 2)
    try:
        proj = cv2.perspectiveTransform(corners, h).reshape(-1, 2)
    except cv2.error:
        return False
    if not np.all(np.isfinite(proj)):
        return False
    area = abs(cv2.contourArea(proj.astype(np.float32)))
    scale = area / float(max(1, w * hh))
    if not 1e-3 < scale < 1e3:
        return False
    # The projected outline must stay a convex quadrilateral with the same orientation.
    cross = []
    for i in range(4):
        a, b, c = proj[i], proj[(i + 1) % 4], proj[(i + 2) % 4]
        cross.append((b[0] - a[0]) * (c[1] - b[1]) - (b[1] - a[1]) * (c[0] - b[0]))
    # A reflection is refused: the mirrored query is tried explicitly instead.
    return all(x > 0 for x in cross)


def _fit(qp: np.ndarray, rp: np.ndarray, r_size: tuple[int, int], cfg: VerifyConfig):
    """(3x3 model reference->query or None, inlier mask)."""
    import cv2

    try:
        if cfg.geometry == GeometryModel.HOMOGRAPHY:
            method = getattr(cv2, "USAC_MAGSAC", cv2.RANSAC)
            h, mask = cv2.findHomography(rp, qp, method, cfg.reprojection_px, maxIters=cfg.max_iters,
                                         confidence=cfg.confidence)
        else:
            a, mask = cv2.estimateAffinePartial2D(rp, qp, method=cv2.RANSAC,
                                                  ransacReprojThreshold=cfg.reprojection_px,
                                                  maxIters=cfg.max_iters, confidence=cfg.confidence)
            h = None if a is None else np.vstack([a, [0.0, 0.0, 1.0]])
    except cv2.error:
        return None, None
    if h is None or mask is None or not _plausible(h, r_size):
        return None, None
    return h, mask.ravel().astype(bool)


def verify_one(q: LocalFeatures, r: LocalFeatures, binary: bool, cfg: VerifyConfig,
               mirrored: bool = False) -> Verification:
    """Verify one orientation of the query against the reference."""
    qp, rp = _matches(q, r, binary, cfg)
    base = dict(matches=len(qp), mirrored=mirrored, query_size=(q.width, q.height),
                reference_size=(r.width, r.height))
    if len(qp) < max(cfg.min_matches, 4):
        return Verification(**base)
    h, mask = _fit(qp, rp, (r.width, r.height), cfg)
    if h is None:
        return Verification(**base)
    qi, ri = qp[mask], rp[mask]
    n = int(mask.sum())
    if n < 4:
        return Verification(**base)
    keep = np.linspace(0, n - 1, min(n, cfg.keep_points)).astype(int)
    # A handful of chance inliers can span half an image: below min_inliers there is no area to speak of.
    credible = n >= cfg.min_inliers
    q_cov = _hull_fraction(qi, q.width, q.height) if credible else 0.0
    r_cov = _hull_fraction(ri, r.width, r.height) if credible else 0.0
    return Verification(inliers=n, inlier_ratio=n / len(qp), query_coverage=q_cov, reference_coverage=r_cov,
                        verified=n >= cfg.min_inliers and r_cov >= cfg.min_coverage,
                        homography=tuple(float(x) for x in np.asarray(h).ravel()),
                        query_points=qi[keep], reference_points=ri[keep], **base)


def verify_pair(query: LocalFeatures, reference: LocalFeatures, *, mirrored_query: LocalFeatures | None = None,
                features: FeatureConfig = FeatureConfig(), config: VerifyConfig = VerifyConfig()) -> Verification:
    """The geometric evidence that ``reference`` is copied in ``query`` (best of plain and mirrored)."""
    best = verify_one(query, reference, features.binary, config)
    if config.try_mirror and mirrored_query is not None:
        flipped = verify_one(mirrored_query, reference, features.binary, config, mirrored=True)
        if (flipped.inliers, flipped.reference_coverage) > (best.inliers, best.reference_coverage):
            best = flipped
    return best


@dataclass(frozen=True)
class QueryTask:
    """All the verification work of one query: its features and its candidates' features."""

    query_id: str
    query: LocalFeatures
    mirrored: LocalFeatures | None
    references: tuple[tuple[str, LocalFeatures | None], ...]


def _run_task(args: tuple[QueryTask, FeatureConfig, VerifyConfig]) -> list[tuple[str, str, Verification]]:
    task, features, config = args
    out = []
    for rid, ref in task.references:
        v = NOT_VERIFIED if ref is None else verify_pair(task.query, ref, mirrored_query=task.mirrored,
                                                        features=features, config=config)
        out.append((task.query_id, rid, v))
    return out


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)


def verify_many(tasks: Sequence[QueryTask], features: FeatureConfig, config: VerifyConfig, *,
                workers: int = 0, progress: bool = False) -> dict[tuple[str, str], Verification]:
    """Verify every candidate of every task; ``workers`` > 0 runs queries in that many processes.

    Returns {(query_id, reference_id): Verification}; a candidate whose
    reference features are None gets ``NOT_VERIFIED``.
    """
    import sys

    from tqdm import tqdm

    results: dict[tuple[str, str], Verification] = {}
    n_pairs = sum(len(t.references) for t in tasks)
    bar = tqdm(total=n_pairs, desc="verifying", unit="pair", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    jobs = [(t, features, config) for t in tasks]
    if workers > 0 and len(tasks) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn: the parent holds torch's thread pools, which must not be forked into the workers.
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                 initializer=_init_worker) as pool:
            for out in pool.map(_run_task, jobs, chunksize=max(1, min(16, len(jobs) // (4 * workers) or 1))):
                for qid, rid, v in out:
                    results[(qid, rid)] = v
                bar.update(len(out))
    else:
        for job in jobs:
            out = _run_task(job)
            for qid, rid, v in out:
                results[(qid, rid)] = v
            bar.update(len(out))
    bar.close()
    return results
