"""The pipeline's jobs: plain functions that the CLI and the Airflow tasks call.

Each job resolves the versions it needs once (pinning), does its work, and
publishes an immutable version or a complete match run. Reruns are
idempotent: an unchanged input republishes nothing, a repeated batch
updates its run in place.

Order on a fresh system: ``refresh_stats`` (background) -> ``build_reference_index``
-> ``calibrate_labelled`` -> ``run_matching``. Without a calibration, matching flags
only at a threshold that ships with the model for its matching settings, and
otherwise flags nothing (:mod:`moderation.thresholds`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moderation.config import Settings
from moderation.db import Database, FlaggedPair, MatchRunRecord, connect
from moderation.descriptor import resolve_device
from moderation.embedding import (EmbeddingResult, ImageSource, VectorCache, check_failure_rate,
                                  dedupe_ids, embed)
from moderation.errors import NotFoundError, VersionMismatchError
from moderation.images import sha256_hex
from moderation.layout import INDEX_DAG, STATS_DAG
from moderation.index import ReferenceIndex, build_index
from moderation.matching import candidates_csv, flagged, verification_csv
from moderation.metrics import read_ground_truth
from moderation.model_versions import LoadedModel, ensure_current_model, load_model
from moderation.registry import (Calibration, IndexVersion, Kind, ModelVersion, Registry,
                                 StatsVersion, new_version_id)
from moderation.statistics import BackgroundIndex, Postprocessor, fit_statistics
from moderation.store import ObjectStore, open_store

log = logging.getLogger(__name__)


@dataclass
class Pipeline:
    """Everything a job needs: settings, object store, registry and review database."""

    settings: Settings
    store: ObjectStore
    db: Database
    registry: Registry = field(init=False)

    def __post_init__(self):
        self.registry = Registry(self.store)

    @classmethod
    def open(cls, settings: Settings, *, migrate: bool = True) -> Pipeline:
        """Open the store and database named by ``settings`` (ConfigError/StoreError if unreachable)."""
        settings.home.mkdir(parents=True, exist_ok=True)
        store = open_store(settings)
        db = connect(settings.database_url, migrate=migrate)
        return cls(settings, store, db)

    # -- version resolution ---------------------------------------------------------------

    def current_model(self) -> ModelVersion:
        record = ensure_current_model(self.registry, self.settings)
        self.db.record_model(record)
        return record

    def load(self, record: ModelVersion) -> LoadedModel:
        return load_model(self.registry, record, resolve_device(self.settings.device.value))

    def current_stats(self, model: ModelVersion) -> StatsVersion:
        try:
            return self.registry.current(Kind.STATS, model_version=model.version)
        except NotFoundError:
            raise NotFoundError(
                f"no background statistics for model {model.version}: run "
                "`moderation stats refresh --images BACKGROUND_DIR` (on Airflow: the DAG "
                f"{STATS_DAG}) first") from None

    def current_index(self, model: ModelVersion) -> IndexVersion:
        try:
            return self.registry.current(Kind.INDEX, model_version=model.version)
        except NotFoundError:
            raise NotFoundError(
                f"no reference index for model {model.version}: run "
                "`moderation index build --images REFERENCES_DIR` (on Airflow: the DAG "
                f"{INDEX_DAG}) first") from None

    def load_stats(self, stats: StatsVersion) -> tuple[Postprocessor, BackgroundIndex]:
        post = Postprocessor.from_bytes(self.registry.load(Kind.STATS, stats, "stats.npz"))
        bg = BackgroundIndex.from_bytes(self.registry.load(Kind.STATS, stats, "background.npy"))
        return post, bg

    def load_index(self, version: IndexVersion) -> tuple[ReferenceIndex, dict[str, str]]:
        index = ReferenceIndex.deserialise(self.registry.load(Kind.INDEX, version, "index.faiss"),
                                           self.registry.load(Kind.INDEX, version, "ids.json"))
        locations = json.loads(self.registry.load(Kind.INDEX, version, "locations.json"))
        return index, locations

    def index_shas(self, version: IndexVersion) -> dict[str, str]:
        """Reference id -> sha256 of an index version ({} for an index built before it was kept)."""
        if "shas.json" not in version.files:
            return {}
        return json.loads(self.registry.load(Kind.INDEX, version, "shas.json"))

    def current_calibration(self, model: ModelVersion, stats: StatsVersion) -> Calibration | None:
        try:
            return self.registry.current(Kind.CALIBRATION, model_version=model.version,
                                         stats_version=stats.version)
        except NotFoundError:
            return None

    def embed(self, loaded: LoadedModel, source: ImageSource, what: str) -> EmbeddingResult:
        settings = loaded.settings_for(self.settings)
        cache = VectorCache(self.store, loaded.version)
        result = embed(loaded.module, source, settings, cache=cache,
                       device=resolve_device(settings.device.value), desc=f"embedding {what}")
        log.info("embedded %d %s (%d from cache, %d failed)", len(result.refs), what,
                 result.cached, len(result.failures))
        return dedupe_ids(result)


def _failure_summary(result: EmbeddingResult) -> dict:
    return {"count": len(result.failures),
            "images": [asdict(f) for f in result.failures[:1000]]}


def _current_if_unchanged(p: Pipeline, kind: Kind, model: ModelVersion, content: str):
    """The version in force for ``model`` if its content hash is ``content`` (a no-op rerun)."""
    try:
        current = p.registry.current(kind, model_version=model.version)
    except NotFoundError:
        return None
    return current if current.content_sha256 == content else None


# -- jobs ----------------------------------------------------------------------------------


def refresh_stats(p: Pipeline, source: ImageSource) -> StatsVersion:
    """Fit centering/whitening and the SN background set on background images; publish them.

    Returns the statistics version in force afterwards. If the fitted
    statistics equal the current version's, nothing new is published.
    Raises BatchFailedError when too many images fail to decode.
    """
    model = p.current_model()
    loaded = p.load(model)
    result = p.embed(loaded, source, "background")
    check_failure_rate(result, p.settings.max_failure_rate, "background set")
    post, bg = fit_statistics(result.vectors, p.settings.postprocess, p.settings.whiten_dim)
    stats_bytes, bg_bytes = post.to_bytes(), bg.to_bytes()
    content = sha256_hex(stats_bytes + bg_bytes)
    if current := _current_if_unchanged(p, Kind.STATS, model, content):
        log.info("background statistics unchanged: %s stays in force", current.version)
        p.db.record_stats(current)
        return current
    record = StatsVersion(version=new_version_id(content), model_version=model.version,
                          postprocess=post.kind.value, in_dim=post.in_dim, out_dim=post.out_dim,
                          n_background=len(result.refs), content_sha256=content,
                          info={"failures": _failure_summary(result)})
    record = p.registry.publish(Kind.STATS, record, {"stats.npz": stats_bytes, "background.npy": bg_bytes})
    p.db.record_stats(record)
    log.info("published statistics %s (%s, %d -> %d dims, %d background images)", record.version,
             record.postprocess, record.in_dim, record.out_dim, record.n_background)
    return record


def build_reference_index(p: Pipeline, source: ImageSource) -> IndexVersion:
    """Embed the references (new or changed ones only) and publish an index version.

    The index holds reference vectors post-processed by the statistics
    version in force for the current model. Returns the index version in
    force afterwards; an unchanged reference set republishes nothing.
    """
    model = p.current_model()
    stats = p.current_stats(model)
    post, _ = p.load_stats(stats)
    loaded = p.load(model)
    result = p.embed(loaded, source, "references")
    check_failure_rate(result, p.settings.max_failure_rate, "reference set")
    features = reference_features(p, source, result)
    vectors = post.apply(result.vectors)
    index = build_index(vectors, result.ids, p.settings.index_factory)
    index_bytes, ids_bytes = index.serialise()
    locations = json.dumps({r.image_id: r.location for r in result.refs}, sort_keys=True).encode()
    shas = json.dumps({r.image_id: r.sha256 for r in result.refs}, sort_keys=True).encode()
    content = sha256_hex(stats.version.encode() + p.settings.index_factory.encode()
                         + ids_bytes + locations + vectors.tobytes())
    if current := _current_if_unchanged(p, Kind.INDEX, model, content):
        log.info("reference set unchanged: index %s stays in force", current.version)
        p.db.record_index(current)
        return current
    record = IndexVersion(version=new_version_id(content), model_version=model.version,
                          stats_version=stats.version, count=len(index), dim=index.dim,
                          factory=p.settings.index_factory, content_sha256=content,
                          info={"failures": _failure_summary(result), "cached": result.cached,
                                "local_features": features})
    record = p.registry.publish(Kind.INDEX, record, {"index.faiss": index_bytes, "ids.json": ids_bytes,
                                                     "locations.json": locations, "shas.json": shas})
    p.db.record_index(record)
    log.info("published index %s: %d references, factory %s", record.version, record.count, record.factory)
    return record


def reference_features(p: Pipeline, source: ImageSource, result: EmbeddingResult) -> dict | None:
    """Compute the local features of new or changed references (verification); None if verification is off.

    Returns the counts of :func:`moderation.reference_features.ensure_reference_features`.
    """
    if not p.settings.verify:
        return None
    from moderation.local_features import FeatureCache
    from moderation.reference_features import ensure_reference_features
    from moderation.two_stage import TwoStageConfig

    config = TwoStageConfig.from_settings(p.settings)
    return ensure_reference_features(source, result.refs, FeatureCache(p.store, config.features),
                                     workers=p.settings.verify_workers, max_pixels=p.settings.max_image_pixels,
                                     max_bytes=p.settings.max_file_bytes, progress=p.settings.progress)


@dataclass
class Pinned:
    """The version chain a matching or calibration run uses, resolved once."""

    model: ModelVersion
    stats: StatsVersion
    index: IndexVersion
    calibration: Calibration | None


def pin(p: Pipeline) -> Pinned:
    """Resolve model -> index -> the index's own statistics version, and the calibration.

    The statistics come from the index's manifest, not the stats pointer, so
    a statistics refresh that has not yet been followed by an index rebuild
    never mixes spaces. Raises VersionMismatchError on an inconsistent chain.
    """
    model = p.current_model()
    index = p.current_index(model)
    if index.model_version != model.version:
        raise VersionMismatchError(f"index {index.version} was built for model {index.model_version}, "
                                   f"not {model.version}")
    stats = p.registry.manifest(Kind.STATS, index.stats_version, model_version=model.version)
    return Pinned(model, stats, index, p.current_calibration(model, stats))


def search_space(p: Pipeline, pinned: Pinned):
    """What matching and calibration search with the pinned chain.

    Returns (:class:`moderation.evaluation.SearchSpace`, the matching
    settings of ``p.settings`` as a TwoStageConfig, reference id -> location,
    the loaded model, the reference-feature reader or None without
    verification). Raises IntegrityError if an artifact fails its sha256.
    """
    from moderation.evaluation import SearchSpace
    from moderation.local_features import FeatureCache
    from moderation.reference_features import ReferenceFeatures
    from moderation.two_stage import TwoStageConfig

    loaded = p.load(pinned.model)
    post, bg = p.load_stats(pinned.stats)
    index, locations = p.load_index(pinned.index)
    config = TwoStageConfig.from_settings(p.settings)
    refs = None
    if config.verify:
        refs = ReferenceFeatures(FeatureCache(p.store, config.features), p.index_shas(pinned.index), locations,
                                 max_pixels=p.settings.max_image_pixels, max_bytes=p.settings.max_file_bytes)
    space = SearchSpace(post, bg, index, refs.get if refs else None)
    return space, config, locations, loaded, refs


def _warn_uncached_features(refs) -> None:
    if refs is not None and refs.computed:
        log.warning("%d references had no cached local features and were described during matching; "
                    "rebuild the index (reference_index_nightly / `moderation index build`) to precompute "
                    "them", refs.computed)


def _check_batch(result, limit: float, what: str) -> None:
    check_failure_rate(EmbeddingResult(result.refs, result.full, result.failures), limit, what)


def calibrate_labelled(p: Pipeline, source: ImageSource, ground_truth: Path, *,
                       target_precision: float = 0.9, store: bool = True) -> tuple[Calibration, dict]:
    """Evaluate the pinned chain on a labelled query set and (by default) store its calibration.

    The evaluation is :func:`moderation.evaluation.evaluate_queries` (the
    protocol the trainer and the benchmarks use too): every query of
    ``source`` counts, and a labelled query that fails to decode is a missed
    positive. With verification on (the default), the score combiner is
    fitted on the set's candidates and the thresholds (``target_precision``,
    and 0.99 where the set reaches it) are chosen on the fused score; both
    are stored with the views and verifier settings they were fitted for.
    Returns the calibration record and the metrics (μAP, μAP with SN, RP90,
    recall@1, thresholds, counts). Raises ModerationError on a malformed
    ground truth or one without a positive among the set's queries, and
    BatchFailedError when too many queries fail to decode.
    """
    from moderation.evaluation import evaluate_queries

    gt = read_ground_truth(Path(ground_truth))
    pinned = pin(p)
    space, config, _, loaded, refs = search_space(p, pinned)
    evaluation = evaluate_queries(loaded.module, source, gt, space, loaded.settings_for(p.settings), config,
                                  target_precision=target_precision, cache=VectorCache(p.store, loaded.version),
                                  device=resolve_device(p.settings.device.value))
    _warn_uncached_features(refs)
    _check_batch(evaluation.matched, p.settings.max_failure_rate, "labelled queries")
    fit, metrics = evaluation.fit, dict(evaluation.metrics)
    record = Calibration(version=new_version_id(), model_version=pinned.model.version,
                         stats_version=pinned.stats.version, threshold=fit.threshold,
                         target_precision=target_precision, metrics=metrics,
                         combiner=fit.combiner.to_dict() if fit.combiner else {},
                         matching=config.as_dict(), high_threshold=fit.high_threshold,
                         info={"index_version": pinned.index.version,
                               "ground_truth": str(ground_truth)})
    if store:
        record = p.registry.publish(Kind.CALIBRATION, record, {})
        p.db.record_calibration(record)
        p.db.update_model_metrics(pinned.model.version, metrics, metrics.get("rp90_threshold_raw"))
    if not fit.reached:
        log.warning("precision %.2f was never reached on this labelled set; the stored threshold "
                    "flags almost nothing. Check the model and statistics.", target_precision)
    return record, metrics


@dataclass
class MatchSummary:
    run_id: int
    batch: str
    n_queries: int
    n_failed: int
    n_candidates: int
    n_flagged: int
    threshold: float | None  # None: no threshold applied, nothing flagged (threshold_source says why)
    threshold_source: str
    model_version: str
    stats_version: str
    index_version: str
    candidates_key: str


def run_matching(p: Pipeline, source: ImageSource, batch: str, *,
                 candidates_out: Path | None = None, evidence_source: ImageSource | None = None) -> MatchSummary:
    """Match a query batch, keep every candidate as a run artifact, flag pairs above the threshold.

    The run is recorded per ``batch``: running it again replaces that run's
    results (no duplicate pairs). On failure the run is marked failed with
    the error and the exception propagates. Raises NotFoundError if the
    index or statistics are missing.

    The threshold is chosen by :func:`moderation.thresholds.choose`; when
    none applies the run flags nothing, records an infinite threshold and
    says why in ``threshold_source`` (summary, ``matching.json``, log).
    """
    pinned = pin(p)
    choice = flag_threshold(p, pinned)
    threshold, source_name, combiner = choice.value, choice.source, choice.combiner
    run = MatchRunRecord(batch=batch, model_version=pinned.model.version,
                         stats_version=pinned.stats.version, index_version=pinned.index.version,
                         # match_runs.threshold is NOT NULL; no score reaches +inf, which is what "flag nothing" means
                         threshold=threshold if choice.flags else math.inf,
                         calibration_version=pinned.calibration.version if pinned.calibration else None)
    for rec, record_fn in ((pinned.stats, p.db.record_stats), (pinned.index, p.db.record_index)):
        record_fn(rec)
    if pinned.calibration:
        p.db.record_calibration(pinned.calibration)
    run_id = p.db.start_run(run)
    failures = None
    try:
        result, config, locations, loaded = _match(p, pinned, source, combiner)
        failures = _failure_summary(result)
        run_folder = f"runs/{_safe_batch(batch)}"
        p.store.put(f"{run_folder}/failures.json", json.dumps(failures).encode(), "application/json")
        _check_batch(result, p.settings.max_failure_rate, "queries")
        cands = result.candidates
        csv_text = candidates_csv(cands)
        p.store.put(f"{run_folder}/candidates.csv", csv_text.encode(), "text/csv")
        p.store.put(f"{run_folder}/verification.csv", verification_csv(cands).encode(), "text/csv")
        p.store.put(f"{run_folder}/matching.json", json.dumps(
            {"matching": config.as_dict(), "threshold": threshold, "threshold_source": source_name,
             "high_threshold": choice.high,
             "combiner": combiner.to_dict(), "seconds": result.seconds, "n_verified": result.n_verified},
            indent=2, default=str).encode(), "application/json")
        if candidates_out:
            Path(candidates_out).write_text(csv_text)
        query_keys = {r.image_id: r.location for r in result.refs}
        chosen = flagged(cands, threshold) if choice.flags else []
        pairs = [FlaggedPair(c.query_id, c.reference_id, c.raw_score, c.score, c.rank,
                             query_key=query_keys.get(c.query_id),
                             reference_key=locations.get(c.reference_id)) for c in chosen]
        if p.settings.evidence and pairs:
            geometry = {(c.query_id, c.reference_id): c.verification for c in chosen}
            pairs = _with_evidence(p, loaded, pairs, source, run_folder, geometry)
        run.n_queries = len(result.refs) + len(result.failures)
        run.n_failed = len(result.failures)
        run.n_candidates = len(cands)
        run.failures = failures
        run.candidates_key = f"{run_folder}/candidates.csv"
        p.db.finish_run(run, pairs)
    except BaseException as exc:
        try:
            p.db.fail_run(batch, f"{type(exc).__name__}: {exc}", failures)
        except Exception as mark_exc:  # the database may be what failed: keep the original error
            log.error("could not mark batch %s as failed: %s", batch, mark_exc)
        raise
    log.info("batch %s: %d queries, %d candidates, %d flagged at threshold %s (%s)", batch,
             run.n_queries, run.n_candidates, len(pairs), "none" if threshold is None else f"{threshold:.4f}",
             source_name)
    return MatchSummary(run_id, batch, run.n_queries, run.n_failed, run.n_candidates, len(pairs),
                        threshold, source_name, pinned.model.version, pinned.stats.version,
                        pinned.index.version, run.candidates_key)


def _with_evidence(p: Pipeline, loaded: LoadedModel, pairs: list[FlaggedPair], source: ImageSource,
                   run_folder: str, geometry: dict | None = None) -> list[FlaggedPair]:
    from moderation.evidence import attach_evidence

    return attach_evidence(p, loaded, pairs, source, run_folder, geometry=geometry)


def flag_threshold(p: Pipeline, pinned: Pinned):
    """The :class:`moderation.thresholds.FlagThreshold` of a match run with this pipeline's settings."""
    from moderation.thresholds import choose
    from moderation.two_stage import TwoStageConfig

    return choose(p.settings.threshold, TwoStageConfig.from_settings(p.settings).as_dict(), pinned.model,
                  pinned.stats, pinned.calibration)


def _match(p: Pipeline, pinned: Pinned, source: ImageSource, combiner):
    """Both matching stages over ``source`` with the pinned chain: (result, config, locations, loaded)."""
    from moderation.two_stage import match_queries

    space, config, locations, loaded, refs = search_space(p, pinned)
    result = match_queries(loaded.module, source, loaded.settings_for(p.settings), config, space.index,
                           space.postprocessor, space.background, reference_features=space.reference_features,
                           combiner=combiner, cache=VectorCache(p.store, loaded.version),
                           device=resolve_device(p.settings.device.value))
    _warn_uncached_features(refs)
    return result, config, locations, loaded


def _safe_batch(batch: str) -> str:
    """A batch name as one object-key segment (a folder path becomes a readable slug)."""
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in batch.strip("/"))[-120:]
    return f"{slug.strip('._') or 'batch'}-{sha256_hex(batch.encode())[:8]}"


def embed_shard(p: Pipeline, source: ImageSource, what: str = "shard") -> dict:
    """Embed a shard of images into the shared vector cache (Airflow mapped tasks); returns counts."""
    model = p.current_model()
    result = p.embed(p.load(model), source, what)
    return {"model_version": model.version, "embedded": len(result.refs), "cached": result.cached,
            "failed": len(result.failures)}

