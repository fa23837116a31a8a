"""The pipeline's jobs: plain functions that the CLI and the Airflow tasks call.

Each job resolves the versions it needs once (pinning), does its work, and
publishes an immutable version or a complete match run. Reruns are
idempotent: an unchanged input republishes nothing, a repeated batch
updates its run in place.

Order on a fresh system: ``refresh_stats`` (background) -> ``build_reference_index``
-> ``calibrate_labelled`` (optional but recommended) -> ``run_matching``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moderation.calibration import calibrate
from moderation.config import Settings
from moderation.db import Database, FlaggedPair, MatchRunRecord, connect
from moderation.descriptor import resolve_device
from moderation.embedding import (EmbeddingResult, ImageSource, VectorCache, check_failure_rate,
                                  dedupe_ids, embed)
from moderation.errors import NotFoundError, VersionMismatchError
from moderation.images import sha256_hex
from moderation.index import ReferenceIndex, build_index
from moderation.matching import Candidate, MatchParams, candidates_csv, flagged, search
from moderation.metrics import read_ground_truth
from moderation.model_versions import LoadedModel, ensure_current_model, load_model
from moderation.registry import (Calibration, IndexVersion, Kind, ModelVersion, Registry,
                                 StatsVersion, new_version_id)
from moderation.statistics import BackgroundIndex, Postprocessor, fit_postprocessor
from moderation.store import ObjectStore, open_store

log = logging.getLogger(__name__)

# Used only when no calibration exists and MODERATION_THRESHOLD is unset: a
# conservative normalised-score cut that flags little. Calibrate instead.
UNCALIBRATED_THRESHOLD = 0.25


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
                "`moderation stats refresh --images BACKGROUND_DIR` first") from None

    def current_index(self, model: ModelVersion) -> IndexVersion:
        try:
            return self.registry.current(Kind.INDEX, model_version=model.version)
        except NotFoundError:
            raise NotFoundError(
                f"no reference index for model {model.version}: run "
                "`moderation index build --images REFERENCES_DIR` first") from None

    def load_stats(self, stats: StatsVersion) -> tuple[Postprocessor, BackgroundIndex]:
        post = Postprocessor.from_bytes(self.registry.load(Kind.STATS, stats, "stats.npz"))
        bg = BackgroundIndex.from_bytes(self.registry.load(Kind.STATS, stats, "background.npy"))
        return post, bg

    def load_index(self, version: IndexVersion) -> tuple[ReferenceIndex, dict[str, str]]:
        index = ReferenceIndex.deserialise(self.registry.load(Kind.INDEX, version, "index.faiss"),
                                           self.registry.load(Kind.INDEX, version, "ids.json"))
        locations = json.loads(self.registry.load(Kind.INDEX, version, "locations.json"))
        return index, locations

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
    post = fit_postprocessor(result.vectors, p.settings.postprocess, p.settings.whiten_dim)
    bg = BackgroundIndex(post.apply(result.vectors))
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
    vectors = post.apply(result.vectors)
    index = build_index(vectors, result.ids, p.settings.index_factory)
    index_bytes, ids_bytes = index.serialise()
    locations = json.dumps({r.image_id: r.location for r in result.refs}, sort_keys=True).encode()
    content = sha256_hex(stats.version.encode() + p.settings.index_factory.encode()
                         + ids_bytes + locations + vectors.tobytes())
    if current := _current_if_unchanged(p, Kind.INDEX, model, content):
        log.info("reference set unchanged: index %s stays in force", current.version)
        p.db.record_index(current)
        return current
    record = IndexVersion(version=new_version_id(content), model_version=model.version,
                          stats_version=stats.version, count=len(index), dim=index.dim,
                          factory=p.settings.index_factory, content_sha256=content,
                          info={"failures": _failure_summary(result), "cached": result.cached})
    record = p.registry.publish(Kind.INDEX, record, {"index.faiss": index_bytes, "ids.json": ids_bytes,
                                                     "locations.json": locations})
    p.db.record_index(record)
    log.info("published index %s: %d references, factory %s", record.version, record.count, record.factory)
    return record


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


def _candidates(p: Pipeline, pinned: Pinned, source: ImageSource, what: str):
    loaded = p.load(pinned.model)
    post, bg = p.load_stats(pinned.stats)
    index, locations = p.load_index(pinned.index)
    result = p.embed(loaded, source, what)
    check_failure_rate(result, p.settings.max_failure_rate, what)
    params = MatchParams(k=p.settings.topk, beta=p.settings.sn_beta, sn_neighbors=p.settings.sn_neighbors)
    return result, search(result.vectors, result.ids, index, post, bg, params), locations, loaded


def calibrate_labelled(p: Pipeline, source: ImageSource, ground_truth: Path, *,
                       target_precision: float = 0.9, store: bool = True) -> tuple[Calibration, dict]:
    """Evaluate the pinned chain on a labelled query set and (by default) store its threshold.

    Returns the calibration record and the metrics (μAP, μAP with SN, RP90,
    recall@1, threshold). Raises ModerationError on a malformed ground truth.
    """
    gt = read_ground_truth(Path(ground_truth))
    pinned = pin(p)
    result, cands, _, _ = _candidates(p, pinned, source, "labelled queries")
    missing = [q for q in result.ids if q not in gt]
    if missing:
        log.warning("%d embedded queries are not in the ground truth and are ignored (e.g. %s)",
                    len(missing), missing[:3])
        cands = [c for c in cands if c.query_id in gt]
    gt_used = {q: r for q, r in gt.items() if q in set(result.ids)}
    res = calibrate(cands, gt_used, target_precision)
    metrics = {**res.metrics, "threshold": res.threshold, "target_reached": res.reached,
               "n_failed": len(result.failures)}
    record = Calibration(version=new_version_id(), model_version=pinned.model.version,
                         stats_version=pinned.stats.version, threshold=res.threshold,
                         target_precision=target_precision, metrics=metrics,
                         info={"index_version": pinned.index.version,
                               "ground_truth": str(ground_truth)})
    if store:
        record = p.registry.publish(Kind.CALIBRATION, record, {})
        p.db.record_calibration(record)
        p.db.update_model_metrics(pinned.model.version, metrics, metrics.get("rp90_threshold_raw"))
    if not res.reached:
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
    threshold: float
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
    """
    pinned = pin(p)
    threshold, source_name = _threshold(p, pinned)
    run = MatchRunRecord(batch=batch, model_version=pinned.model.version,
                         stats_version=pinned.stats.version, index_version=pinned.index.version,
                         threshold=threshold,
                         calibration_version=pinned.calibration.version if pinned.calibration else None)
    for rec, record_fn in ((pinned.stats, p.db.record_stats), (pinned.index, p.db.record_index)):
        record_fn(rec)
    if pinned.calibration:
        p.db.record_calibration(pinned.calibration)
    run_id = p.db.start_run(run)
    try:
        result, cands, locations, loaded = _candidates(p, pinned, source, "queries")
        csv_text = candidates_csv(cands)
        run_folder = f"runs/{_safe_batch(batch)}"
        p.store.put(f"{run_folder}/candidates.csv", csv_text.encode(), "text/csv")
        p.store.put(f"{run_folder}/failures.json", json.dumps(_failure_summary(result)).encode(),
                    "application/json")
        if candidates_out:
            Path(candidates_out).write_text(csv_text)
        query_keys = {r.image_id: r.location for r in result.refs}
        chosen = flagged(cands, threshold)
        pairs = [FlaggedPair(c.query_id, c.reference_id, c.raw_score, c.score, c.rank,
                             query_key=query_keys.get(c.query_id),
                             reference_key=locations.get(c.reference_id)) for c in chosen]
        if p.settings.evidence and pairs:
            pairs = _with_evidence(p, loaded, pairs, source, run_folder)
        run.n_queries = len(result.refs) + len(result.failures)
        run.n_failed = len(result.failures)
        run.n_candidates = len(cands)
        run.failures = _failure_summary(result)
        run.candidates_key = f"{run_folder}/candidates.csv"
        p.db.finish_run(run, pairs)
    except BaseException as exc:
        try:
            p.db.fail_run(batch, f"{type(exc).__name__}: {exc}")
        except Exception as mark_exc:  # the database may be what failed: keep the original error
            log.error("could not mark batch %s as failed: %s", batch, mark_exc)
        raise
    log.info("batch %s: %d queries, %d candidates, %d flagged at threshold %.4f (%s)", batch,
             run.n_queries, run.n_candidates, len(pairs), threshold, source_name)
    return MatchSummary(run_id, batch, run.n_queries, run.n_failed, run.n_candidates, len(pairs),
                        threshold, source_name, pinned.model.version, pinned.stats.version,
                        pinned.index.version, run.candidates_key)


def _with_evidence(p: Pipeline, loaded: LoadedModel, pairs: list[FlaggedPair], source: ImageSource,
                   run_folder: str) -> list[FlaggedPair]:
    try:
        from moderation.evidence import attach_evidence
    except ImportError:
        return pairs
    return attach_evidence(p, loaded, pairs, source, run_folder)


def _threshold(p: Pipeline, pinned: Pinned) -> tuple[float, str]:
    if p.settings.threshold:
        return p.settings.threshold, "MODERATION_THRESHOLD"
    if pinned.calibration is not None:
        return pinned.calibration.threshold, f"calibration {pinned.calibration.version}"
    log.warning("no calibration for model %s + statistics %s: using the conservative default "
                "threshold %.2f. Run `moderation calibrate` on a labelled set.",
                pinned.model.version, pinned.stats.version, UNCALIBRATED_THRESHOLD)
    return UNCALIBRATED_THRESHOLD, "uncalibrated default"


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

