"""The evaluation protocol: one implementation for the calibration job, the trainer and the benchmarks.

DISC21 descriptor track, as the production pipeline runs it:

1. statistics (centering / PCA-whitening, and the score-normalisation
   background set) are fitted on *background* images only: fitting them on
   the references would leak the references into their own normalisation
   and make every figure read high. Background and references must not
   share an image (compared by sha256); :func:`fit_space` refuses if they do;
2. the queries go through the pipeline's own matcher
   (:func:`moderation.two_stage.match_queries`): the global stage alone, or
   views and local-feature verification;
3. the metrics (:mod:`moderation.metrics`) pool the top ``k`` candidates of
   every query. N, the number of positives, is the number of ground-truth
   pairs whose query belongs to the evaluated set, *whether or not the query
   could be decoded*: a query that failed is a missed positive, never a
   smaller N;
4. the flagging thresholds are chosen on the same pooled list (the 90 %
   and 99 % precision points), or, with ``fit`` given, a fit made on another
   labelled set is applied and measured (fit on one set, report on another).

Entry points, each built on the next: :func:`evaluate_labelled_set` (a
folder with references, queries, background: the trainer and
``benchmarks/train_bench.py``), :func:`evaluate_queries` (queries against an
existing search space: ``jobs.calibrate_labelled``), :func:`evaluate_matches`
(already matched queries: every caller, and ``benchmarks/two_stage_bench.py``
directly).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from moderation.calibration import calibrate, calibrate_fused
from moderation.config import ResizeMode, Settings
from moderation.embedding import EmbeddingResult, FolderSource, ImageSource, dedupe_ids, embed
from moderation.errors import ModerationError
from moderation.fusion import Combiner
from moderation.images import ImageRef
from moderation.index import ReferenceIndex, build_index
from moderation.matching import Candidate
from moderation.metrics import evaluate as pooled_metrics
from moderation.metrics import precision_at, read_ground_truth, recall_at
from moderation.statistics import BackgroundIndex, Postprocessor, fit_statistics
from moderation.two_stage import TwoStageConfig, TwoStageResult, match_queries, rescore
from moderation.views import ViewConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationSet:
    """A labelled set on disk: ``references/``, ``queries/``, ``background/``, ``ground_truth.csv``."""

    references: Path
    queries: Path
    background: Path
    ground_truth: Path

    @classmethod
    def from_dir(cls, root: str | Path) -> ValidationSet:
        """The bench-dev layout under ``root``; raises ModerationError naming what is missing."""
        root = Path(root)
        vs = cls(root / "references", root / "queries", root / "background", root / "ground_truth.csv")
        missing = [str(p) for p in (vs.references, vs.queries, vs.background, vs.ground_truth) if not p.exists()]
        if missing:
            raise ModerationError(f"validation set {root} lacks {', '.join(missing)}")
        return vs


@dataclass(frozen=True)
class SearchSpace:
    """What queries are matched against: the fitted statistics, the reference index, reference features.

    ``reference_features(id)`` returns a reference's local features (needed
    only when verification is on).
    """

    postprocessor: Postprocessor | None
    background: BackgroundIndex | None
    index: ReferenceIndex
    reference_features: Callable[[str], object] | None = None


@dataclass(frozen=True)
class Fit:
    """What a calibration chooses: the score combiner (two-stage only) and the thresholds."""

    combiner: Combiner | None
    threshold: float
    high_threshold: float | None
    reached: bool


@dataclass
class Evaluation:
    """The outcome of the protocol on one labelled set.

    ``metrics``: μAP / RP90 of the raw cosine (``uap``, ``rp90``) and of the
    score matching flags on (``uap_sn``, ``rp90_sn``; also ``uap_final``,
    ``rp90_final`` with verification), ``recall_at_1``, ``n_queries``,
    ``n_positives`` (N), ``n_failed`` and ``n_failed_positives`` (queries that
    did not decode, counted in N as misses), ``threshold``, ``high_threshold``,
    ``target_reached``, and ``n_flagged`` / ``flagged_precision`` /
    ``flagged_recall`` at ``threshold`` (and ``high_*`` at ``high_threshold``).
    ``candidates`` are the top ``k`` per query with the final score,
    ``ground_truth`` the pairs of the evaluated queries, ``fit`` the thresholds
    (chosen here, or the ``fit`` passed in), ``matched`` the matcher's output.
    """

    metrics: dict[str, Any]
    candidates: list[Candidate]
    ground_truth: dict[str, str | None]
    fit: Fit
    matched: TwoStageResult
    failures: list = field(default_factory=list)


def global_stage(settings: Settings) -> TwoStageConfig:
    """The global stage alone: the whole query's descriptor, no verification (the trainer's protocol)."""
    return replace(TwoStageConfig.from_settings(settings), views=ViewConfig(), verify=False)


def evaluated_queries(matched: TwoStageResult) -> set[str]:
    """Every query of the evaluated set: those that decoded and those that failed."""
    return {r.image_id for r in matched.refs} | {f.image_id for f in matched.failures}


def restrict_ground_truth(ground_truth: Mapping[str, str | None], queries: Iterable[str]) -> dict[str, str | None]:
    """The ground-truth rows whose query is in ``queries`` (linear in both sizes)."""
    wanted = queries if isinstance(queries, (set, frozenset)) else set(queries)
    return {q: r for q, r in ground_truth.items() if q in wanted}


def check_disjoint(background: Iterable[ImageRef], references: Iterable[ImageRef]) -> None:
    """Raise ModerationError if an image (same sha256) is both a background image and a reference.

    A reference among the background images lowers its own copies' normalised
    scores and shapes the whitening around it: the figures would not describe
    a deployment, whose background never holds its references.
    """
    refs_by_sha = {r.sha256: r.image_id for r in references if r.sha256}
    both = [(b.image_id, refs_by_sha[b.sha256]) for b in background if b.sha256 in refs_by_sha]
    if both:
        examples = ", ".join(f"background {b} = reference {r}" for b, r in both[:3])
        raise ModerationError(f"{len(both)} background images are also references ({examples}); "
                              "background statistics must be fitted on images that are not references: "
                              "remove them from the background set")


def fit_space(references: EmbeddingResult, background: EmbeddingResult, settings: Settings) -> SearchSpace:
    """Statistics fitted on the background descriptors, and an exact index of the post-processed references.

    Raises ModerationError if background and references share an image, or
    if there are too few background images to fit the statistics.
    """
    check_disjoint(background.refs, references.refs)
    post, bg = fit_statistics(background.vectors, settings.postprocess, settings.whiten_dim)
    return SearchSpace(post, bg, build_index(post.apply(references.vectors), references.ids, "Flat"))


def evaluate_matches(matched: TwoStageResult, ground_truth: Mapping[str, str | None], config: TwoStageConfig, *,
                     k: int | None = None, target_precision: float = 0.9, high_precision: float = 0.99,
                     fit: Fit | None = None) -> Evaluation:
    """Metrics and thresholds of already matched queries (``match_queries(..., keep_all=True)``).

    ``ground_truth`` may list more queries than were evaluated; only the
    rows of ``evaluated_queries(matched)`` count, failed ones included.
    Queries that are not in the ground truth are left out (with a warning).
    With verification (``config.verify``) the combiner is fitted on every
    candidate and the thresholds chosen on the fused score; without it the
    thresholds are chosen on the normalised score. The top ``k`` (default
    ``config.k``) candidates per query are scored. With ``fit`` nothing is
    fitted: ``fit``'s combiner and thresholds are applied and measured.
    Raises ModerationError if the evaluated queries have no positive.
    """
    k = k or config.k
    queries = evaluated_queries(matched)
    gt = restrict_ground_truth(ground_truth, queries)
    unlabelled = queries - gt.keys()
    if unlabelled:
        log.warning("%d evaluated queries are not in the ground truth and are ignored (e.g. %s)",
                    len(unlabelled), sorted(unlabelled)[:3])
    cands = [c for c in matched.candidates if c.query_id in gt]
    if config.verify and fit is not None and fit.combiner is None:
        raise ModerationError("applying a fit to verified candidates needs its score combiner")
    metrics: dict[str, Any]
    if fit is None and config.verify:
        fused = calibrate_fused(cands, gt, k=k, target_precision=target_precision, high_precision=high_precision)
        fit = Fit(fused.combiner, fused.threshold, fused.high_threshold, fused.reached)
        final = rescore(cands, fused.combiner, k)
        metrics = dict(fused.metrics)
    else:
        final = rescore(cands, fit.combiner, k) if config.verify else [c for c in cands if c.rank <= k]
        own = calibrate(final, gt, target_precision)
        if fit is None:
            high = pooled_metrics([c.prediction() for c in final], gt, high_precision).rp90_threshold
            fit = Fit(None, own.threshold, high, own.reached)
        metrics = dict(own.metrics)
        if config.verify:
            metrics.update(uap_final=metrics["uap_sn"], rp90_final=metrics["rp90_sn"])
    failed = {f.image_id for f in matched.failures} - {r.image_id for r in matched.refs}
    metrics.update(threshold=fit.threshold, high_threshold=fit.high_threshold, target_reached=fit.reached,
                   n_failed=len(failed), n_failed_positives=sum(1 for q in failed if gt.get(q) is not None),
                   **_flagged(final, gt, fit.threshold, ""), **_flagged(final, gt, fit.high_threshold, "high_"))
    return Evaluation(metrics, final, gt, fit, matched, list(matched.failures))


def _flagged(final: list[Candidate], gt: Mapping[str, str | None], threshold: float | None, prefix: str) -> dict:
    """How many pairs a threshold flags, and their precision and recall (None without a threshold)."""
    if threshold is None:
        return {f"{prefix}n_flagged": None, f"{prefix}flagged_precision": None, f"{prefix}flagged_recall": None}
    preds = [c.prediction() for c in final]
    n = sum(1 for p in preds if p.score >= threshold)
    return {f"{prefix}n_flagged": n,
            f"{prefix}flagged_precision": precision_at(preds, gt, threshold) if n else None,
            f"{prefix}flagged_recall": recall_at(preds, gt, threshold)}


def evaluate_queries(model: Callable, queries: ImageSource, ground_truth: Mapping[str, str | None],
                     space: SearchSpace, settings: Settings, config: TwoStageConfig, *,
                     target_precision: float = 0.9, fit: Fit | None = None, cache=None,
                     device=None) -> Evaluation:
    """Match ``queries`` against ``space`` with ``config`` and evaluate them (:func:`evaluate_matches`).

    ``settings`` carry the model's own preprocessing
    (``LoadedModel.settings_for``). Raises ModerationError as
    :func:`evaluate_matches` does, or when verification is on and ``space``
    has no reference features.
    """
    matched = match_queries(model, queries, settings, config, space.index, space.postprocessor, space.background,
                            reference_features=space.reference_features,
                            combiner=fit.combiner if fit is not None else None, cache=cache, device=device,
                            keep_all=True)
    return evaluate_matches(matched, ground_truth, config, target_precision=target_precision, fit=fit)


def evaluate_labelled_set(model: Callable, validation: ValidationSet, settings: Settings, *,
                          image_size: int | None = None, resize_mode: ResizeMode | str | None = None,
                          config: TwoStageConfig | None = None, device=None) -> Evaluation:
    """Embed references and background, fit the statistics on the background, evaluate the queries.

    ``model`` maps an ImageNet-normalised batch (B, 3, S, S) to descriptors
    (B, D). ``image_size`` / ``resize_mode`` override the settings' (the
    model's inference preprocessing). ``config`` defaults to the global stage
    (:func:`global_stage`). Adds ``rp90_threshold_sn`` (None if 90 % precision
    is never reached), ``image_size``, ``resize_mode`` and ``postprocess`` to
    the metrics. Raises ModerationError if references and background share
    an image, or if no reference or no query decodes.
    """
    if image_size:
        settings = replace(settings, image_size=int(image_size))
    if resize_mode:
        settings = replace(settings, resize_mode=ResizeMode(resize_mode))
    config = config or global_stage(settings)
    if config.verify:
        raise ModerationError("a labelled folder is evaluated with the global stage; verification needs the "
                              "pipeline's reference features (use jobs.calibrate_labelled)")
    gt = read_ground_truth(validation.ground_truth)
    refs = dedupe_ids(embed(model, FolderSource(validation.references), settings, device=device, desc="references"))
    background = embed(model, FolderSource(validation.background), settings, device=device, desc="background")
    if not refs.refs:
        raise ModerationError(f"no reference of {validation.references} could be decoded")
    space = fit_space(refs, background, settings)
    result = evaluate_queries(model, FolderSource(validation.queries), gt, space, settings, config, device=device)
    if not result.matched.refs:
        raise ModerationError(f"no query of {validation.queries} could be decoded")
    result.metrics.update(rp90_threshold_sn=result.fit.threshold if result.fit.reached else None,
                          image_size=settings.image_size, resize_mode=ResizeMode(settings.resize_mode).value,
                          postprocess=f"{settings.postprocess.value}-on-background")
    return result
