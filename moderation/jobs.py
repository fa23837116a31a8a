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

import io
import json
import logging
import math
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moderation.banks import DEFAULT_BANK, assign_banks
from moderation.config import Settings
from moderation.db import Database, FlaggedPair, MatchRunRecord, connect
from moderation.descriptor import resolve_device
from moderation.embedding import EmbeddingResult, ImageSource, check_failure_rate, dedupe_ids, embed
from moderation.errors import ModerationError, NotFoundError, VersionMismatchError
from moderation.images import ImageRef, sha256_hex
from moderation.layout import INDEX_DAG, STATS_DAG
from moderation.index import ReferenceIndex, build_index
from moderation.index_config import IndexOptions, plan_index
from moderation.matching import Candidate, candidates_csv, flagged, verification_csv
from moderation.metrics import read_ground_truth
from moderation.model_versions import LoadedModel, ensure_current_model, load_model
from moderation.pdq import BYTES as PDQ_BYTES
from moderation.pdq import PdqConfig, PdqIndex, codes_from_rows, pdq_cache
from moderation.pdq_matching import PDQ_FILE, merge_pairs
from moderation.reference_controls import Controls, read_controls, register_banks
from moderation.registry import (Calibration, IndexVersion, Kind, ModelVersion, Registry,
                                 StatsVersion, new_version_id)
from moderation.statistics import BackgroundIndex, Postprocessor, fit_statistics
from moderation.store import ObjectStore, open_store
from moderation.suppression import rejected_pairs, split_suppressed, suppressed_csv
from moderation.vector_cache import Namespace, VectorCache

if TYPE_CHECKING:
    from moderation.reference_changes import FailedReference
    from moderation.reference_reader import ReferenceReader

log = logging.getLogger(__name__)


@dataclass
class Pipeline:
    """Everything a job needs: settings, object store, registry and review database."""

    settings: Settings
    store: ObjectStore
    db: Database
    registry: Registry = field(init=False)
    # Index versions are immutable: their bank maps are read once per pipeline (large at scale).
    _banks: dict[str, dict[str, str]] = field(init=False, default_factory=dict, repr=False)

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
        index = self.read_index(version)
        locations = json.loads(self.registry.load(Kind.INDEX, version, "locations.json"))
        return index, locations

    def read_index(self, version: IndexVersion) -> ReferenceIndex:
        """The version's FAISS index, read through a temporary local file so that only the index is in memory.

        (Its bytes beside the index would double the peak: 5 GB more at 10M
        references.) Raises IntegrityError when the file's sha256 disagrees
        with the version's manifest, ModerationError when it is no index.
        """
        ids = self.registry.load(Kind.INDEX, version, "ids.json")
        with tempfile.TemporaryDirectory(prefix="moderation-index-") as tmp:
            path = self.registry.load_file(Kind.INDEX, version, "index.faiss", Path(tmp) / "index.faiss")
            return ReferenceIndex.load(path, ids)

    def index_banks(self, version: IndexVersion, locations: dict[str, str]) -> dict[str, str]:
        """Reference id -> bank of an index version (all ``default`` for an index built before banks)."""
        if "banks.json" not in version.files:
            return {rid: DEFAULT_BANK for rid in locations}
        if version.version not in self._banks:
            self._banks[version.version] = json.loads(self.registry.load(Kind.INDEX, version, "banks.json"))
        return self._banks[version.version]

    def index_held_out(self, version: IndexVersion) -> tuple[np.ndarray, list[str]]:
        """(vectors, ids) of references the build left out of the index because they were disabled."""
        if "held_out.json" not in version.files:
            return np.zeros((0, version.dim), np.float32), []
        ids = json.loads(self.registry.load(Kind.INDEX, version, "held_out.json"))
        vectors = np.load(io.BytesIO(self.registry.load(Kind.INDEX, version, "held_out.npy")), allow_pickle=False)
        return vectors, ids

    def index_shas(self, version: IndexVersion) -> dict[str, str]:
        """Reference id -> sha256 of an index version ({} for an index built before it was kept)."""
        if "shas.json" not in version.files:
            return {}
        return json.loads(self.registry.load(Kind.INDEX, version, "shas.json"))

    def current_calibration(self, model: ModelVersion, stats: StatsVersion, *,
                            replacing: bool = False) -> Calibration | None:
        """The calibration in force for the pair, or None.

        A broken pointer raises CorruptPointerError, unless ``replacing`` (the
        caller is about to publish a calibration, which repairs it).
        """
        pins = {"model_version": model.version, "stats_version": stats.version}
        if replacing:
            return self.registry.replaceable_current(Kind.CALIBRATION, **pins)
        try:
            return self.registry.current(Kind.CALIBRATION, **pins)
        except NotFoundError:
            return None

    def embed(self, loaded: LoadedModel, source: ImageSource, what: str,
              namespace: Namespace = Namespace.REFERENCES, *, pdq: bool = False) -> EmbeddingResult:
        """Embed ``source`` through the model's vector cache in ``namespace`` (queries expire, references stay).

        With ``pdq`` (and MODERATION_PDQ on), PDQ hashes missing from the PDQ
        cache of ``namespace`` are computed from the same decoded images.
        """
        settings = loaded.settings_for(self.settings)
        cache = VectorCache(self.store, loaded.version, namespace)
        hashes = pdq_cache(self.store, namespace) if pdq and self.settings.pdq else None
        result = embed(loaded.module, source, settings, cache=cache,
                       device=resolve_device(settings.device.value), desc=f"embedding {what}", pdq_cache=hashes)
        log.info("embedded %d %s (%d from cache, %d failed)", len(result.refs), what,
                 result.cached, len(result.failures))
        return dedupe_ids(result)


def _failure_summary(result: EmbeddingResult) -> dict:
    return {"count": len(result.failures),
            "images": [asdict(f) for f in result.failures[:1000]]}


def _current_if_unchanged(p: Pipeline, kind: Kind, model: ModelVersion, content: str):
    """The version in force for ``model`` if its content hash is ``content`` (a no-op rerun).

    None too when the pointer is broken: the job then publishes, which repairs it.
    """
    current = p.registry.replaceable_current(kind, model_version=model.version)
    return current if current is not None and current.content_sha256 == content else None


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


@dataclass
class PreparedIndex:
    """An index build decided before any vector is added (:func:`prepare_reference_index`).

    ``mode``: ``unchanged`` (``previous``, the version in force, already holds
    this content), ``incremental`` (``base`` is updated in place) or ``full``
    (trained and filled from every kept vector: ``fill`` lists the kept ids
    in fill order (:mod:`moderation.index_fill`), cut into ``ranges``).
    ``refs`` are every reference of the version, in location order; ``held``
    the disabled ones left out of the index; ``stale`` the ids whose content
    changed (removed from a base and added again); ``failed`` the lasting
    failures the version's manifest records (not read again while
    unchanged). ``forced``: a forced full build, published under a fresh
    version id even when its content is in force. ``info`` holds what the
    preparation counted (failures, reads, cache hits). JSON round trip:
    :meth:`to_dict` / :meth:`from_dict`, for a sharded build's staging.
    """

    model_version: str
    stats_version: str
    factory: str
    content: str
    mode: str
    forced: bool
    previous: str | None
    base: str | None
    refs: list[ImageRef]
    banks: dict[str, str]
    held: list[str]
    stale: list[str]
    fill: list[str] = field(default_factory=list)
    ranges: list[tuple[int, int]] = field(default_factory=list)
    template_sha: str = ""  # of the staged template a sharded fill copies ("" until staged)
    info: dict = field(default_factory=dict)
    failed: list[FailedReference] = field(default_factory=list)

    @property
    def kept(self) -> list[str]:
        """The ids the index holds, in location order."""
        held = set(self.held)
        return [r.image_id for r in self.refs if r.image_id not in held]

    @property
    def build_id(self) -> str:
        """What a fill shard must have been filled for: content, fill order, ranges and template."""
        return sha256_hex(json.dumps([self.content, self.fill, self.ranges, self.template_sha]).encode())

    def fill_refs(self, start: int = 0, stop: int | None = None) -> list[ImageRef]:
        """The refs of ``fill[start:stop]``, in fill order."""
        return [self.ref_by_id[i] for i in self.fill[start:stop]]

    @cached_property
    def ref_by_id(self) -> dict[str, ImageRef]:
        """Id -> ref, built once (``refs`` do not change after preparation; at 10M the map costs a gigabyte)."""
        return {r.image_id: r for r in self.refs}

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}  # not asdict: no deep copy of every ref
        out["refs"] = [[r.image_id, r.location, r.sha256, r.fingerprint] for r in self.refs]
        out["failed"] = [[f.image_id, f.location, f.fingerprint, f.reason, f.detail] for f in self.failed]
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> PreparedIndex:
        from moderation.reference_changes import FailedReference

        values = dict(data)
        values["refs"] = [ImageRef(*row) for row in values["refs"]]
        values["ranges"] = [tuple(r) for r in values["ranges"]]
        values["failed"] = [FailedReference(*row) for row in values.get("failed", [])]
        return cls(**values)


def build_reference_index(p: Pipeline, source: ImageSource, *, full: bool | None = None,
                          hints: Mapping[str, tuple[str, str]] | None = None) -> IndexVersion:
    """Publish an index version of ``source``, reading only the references that are new or changed.

    Change detection (:mod:`moderation.reference_changes`): the source's
    listing is compared with the manifest of the index version in force; a
    reference with the same location and fingerprint keeps its sha256, and
    its vector, PDQ hash and local features come from their caches by sha.
    The rest are read once each (hash, decode, embed, PDQ and local features
    from the same bytes). An unchanged reference missing from a cache is read
    after all (logged). ``hints`` (location -> (fingerprint, sha256)) are shas
    learned this run by the DAG's shards. A reference that failed for a
    lasting reason is recorded in the manifest with its fingerprint; while
    that is unchanged it is not read again, stays out of the index, and is
    listed and counted as a failure (``info.failures``, ``not_read`` of them
    carried over) so that the failure-rate gate sees the same set every night.
    Reading keeps at most :data:`moderation.reference_reader.FRESH_VECTORS_MAX`
    computed vectors in memory; beyond that they come back from the vector cache.

    Incremental index (:mod:`moderation.incremental_index`): with the same
    statistics version and factory, the previous index is updated (deleted
    and changed ids removed, new vectors added); otherwise, or with ``full``
    (default MODERATION_INDEX_FULL_REBUILD), it is built from every vector.
    ``full`` also reads every reference again and publishes even an
    unchanged set; otherwise an unchanged set republishes nothing. Both give
    the same search results. Returns the version in force afterwards. Raises
    BatchFailedError when too many references fail to decode,
    ModerationError when none is left or the previous manifest is unreadable.

    The steps, in one process: :func:`prepare_reference_index`, then
    :func:`publish_reference_index` (which fills a full build's ranges
    itself); the nightly DAG runs the same steps in separate tasks, filling
    the ranges in mapped tasks (:mod:`moderation.index_fill`).
    """
    prepared, reader = prepare_reference_index(p, source, full=full, hints=hints)
    if prepared.mode == "unchanged":
        return keep_current_index(p, prepared)
    return publish_reference_index(p, prepared, reader)


def prepare_reference_index(p: Pipeline, source: ImageSource, *, full: bool | None = None,
                            hints: Mapping[str, tuple[str, str]] | None = None,
                            fill_shard_size: int | None = None,
                            max_fill_shards: int | None = None) -> tuple[PreparedIndex, ReferenceReader]:
    """Detect the changes, read what must be read, and decide the build (see :func:`build_reference_index`).

    Every vector the build needs is in the vector cache afterwards. A full
    build's kept references are put in fill order and cut into ranges of
    ``fill_shard_size`` (default MODERATION_INDEX_FILL_SHARD_SIZE), at most
    ``max_fill_shards``. Returns the decision and the reader that holds what
    was read (for :func:`publish_reference_index` in the same process).
    Raises as :func:`build_reference_index` does; publishes nothing.
    """
    from moderation.incremental_index import can_update, content_hash
    from moderation.reference_changes import MANIFEST_FILE, detect_changes, listed_refs, read_manifest
    from moderation.reference_reader import ReferenceReader

    full = p.settings.index_full_rebuild if full is None else full
    model = p.current_model()
    stats = p.current_stats(model)
    p.db.record_stats(stats)  # the index row refers to it, and this database may not have seen it yet
    loaded = p.load(model)
    previous = p.registry.replaceable_current(Kind.INDEX, model_version=model.version)
    manifest = None
    if previous is not None and not full and MANIFEST_FILE in previous.files:
        manifest = read_manifest(p.registry.load(Kind.INDEX, previous, MANIFEST_FILE))
    changes = detect_changes(listed_refs(source), manifest, hints)
    incremental_possible = manifest is not None
    del manifest  # an entry per reference: at 10M, gigabytes the rest of the build does not need
    # `auto` resolves by size (Flat, IVF with more lists as the set grows): an update in place needs the
    # previous version's resolved factory to be the one this size calls for.
    options = IndexOptions.from_settings(p.settings)
    factory = plan_index(len(changes.unchanged) + len(changes.added), p.settings.index_factory, options).factory
    base = None
    if incremental_possible:
        ok, why = can_update(previous, stats.version, factory, len(changes.unchanged) + len(changes.added),
                             p.settings.index_retrain_growth)
        base = previous if ok else None
        if not ok:
            log.info("building the index in full: %s", why)
    log.info("reference changes since %s: %s", previous.version if incremental_possible else "(none)",
             changes.summary())
    reader = ReferenceReader(p, loaded, source)
    # An unchanged reference's vector is needed only when the index is built from every vector;
    # one whose sha a shard gave (hinted) is added, so its vector is always needed.
    hinted = [r for r in changes.added if r.sha256]
    fresh = reader.read(changes.to_read + reader.missing_from_caches(changes.unchanged, need_vectors=base is None)
                        + reader.missing_from_caches(hinted, need_vectors=True))
    # A reference that failed with bytes unchanged since is failed still: listed and gated, not read again.
    failures = changes.duplicates + reader.failures + [f.failure() for f in changes.still_failed]
    failed = changes.still_failed + reader.lasting
    # A reference read this run counts as read: one that no longer decodes is a failure, not its old sha.
    known = {r.image_id: r for r in changes.unchanged + hinted if r.image_id not in reader.attempted}
    refs = [fresh.get(r.image_id) or known[r.image_id] for r in changes.unchanged + changes.added
            if r.image_id in fresh or r.image_id in known]
    refs.sort(key=lambda r: r.location)  # the listing's order, as a full build has always used
    check_failure_rate(EmbeddingResult(refs, np.zeros((0, 0), np.float32), failures), p.settings.max_failure_rate,
                       "reference set")
    banks = assign_banks(source, refs)
    held = _held_out(p, banks)
    content = content_hash(stats.version, factory, ((r.image_id, r.location, r.sha256, banks[r.image_id])
                                                    for r in refs), held,
                           failed=((f.image_id, f.location, f.fingerprint, f.reason) for f in failed))
    features = None if reader.features is None else {
        "total": len(refs), "computed": reader.features["computed"], "failed": reader.features["failed"],
        "cached": len(refs) - reader.features["computed"] - reader.features["failed"],
        "config": reader.features["config"]}
    # A forced full build publishes what it built, even when the content is the same (a repair).
    unchanged = not full and _current_if_unchanged(p, Kind.INDEX, model, content) is not None
    prepared = PreparedIndex(
        model_version=model.version, stats_version=stats.version, factory=factory, content=content,
        mode="unchanged" if unchanged else "incremental" if base is not None else "full", forced=full,
        previous=previous.version if previous is not None else None, base=base.version if base else None,
        refs=refs, banks=banks, held=[r.image_id for r in refs if r.image_id in held],
        # A reference whose bytes were read this run may differ from the indexed one even under its old id.
        stale=sorted(set(changes.replaced) | set(fresh)),
        failed=failed,
        info={"failures": {"count": len(failures), "images": [asdict(f) for f in failures[:1000]],
                           "not_read": len(changes.still_failed)},
              "cached": len(refs) - len(fresh) + reader.cached, "local_features": features,
              "changes": changes.summary(), "read": len(reader.attempted)})
    if prepared.mode == "full":
        plan_fill(p, prepared, fill_shard_size, max_fill_shards)
    return prepared, reader


def plan_fill(p: Pipeline, prepared: PreparedIndex, fill_shard_size: int | None = None,
              max_fill_shards: int | None = None) -> None:
    """Set ``prepared``'s fill order and ranges (reads the vector cache's manifests; no vector)."""
    from moderation.index_fill import fill_order, fill_ranges

    cache = VectorCache(p.store, prepared.model_version, Namespace.REFERENCES)
    prepared.fill = [r.image_id for r in fill_order(cache, [prepared.ref_by_id[i] for i in prepared.kept])]
    prepared.ranges = fill_ranges(len(prepared.fill), fill_shard_size or p.settings.index_fill_shard_size,
                                  max_fill_shards)


def train_fill_template(p: Pipeline, prepared: PreparedIndex, post: Postprocessor, read_again,
                        cache: VectorCache | None = None) -> ReferenceIndex:
    """The trained, empty index every range of a full build fills a copy of.

    Trained on the planned sample of every kept vector, streamed from the
    vector cache in fill order (``read_again(refs)``: raw vectors of refs
    the cache lost). ``cache``: an instance holding nothing in memory to
    stream from (default: a fresh one). Raises ModerationError when nothing is kept.
    """
    from moderation.index_fill import ordered_chunks
    from moderation.index_stream import train_empty_index

    if not prepared.fill:
        raise ModerationError("no reference vectors to index")
    refs = prepared.fill_refs()
    cache = cache if cache is not None else VectorCache(p.store, prepared.model_version, Namespace.REFERENCES)
    return train_empty_index(lambda: ordered_chunks(cache, refs, post.apply, read_again),
                             len(refs), prepared.factory, IndexOptions.from_settings(p.settings))


def fill_range(p: Pipeline, model_version: str, template: ReferenceIndex, refs: list[ImageRef],
               post: Postprocessor, read_again, cache: VectorCache | None = None) -> ReferenceIndex:
    """A copy of ``template`` holding ``refs`` (one range of the fill order), streamed from the vector cache.

    See :func:`moderation.index_shards.build_shard`. Raises ModerationError
    when the cache and ``read_again`` give fewer vectors than ``refs`` (the
    source changed: build again).
    """
    from moderation.index_fill import ordered_chunks
    from moderation.index_shards import build_shard

    cache = cache if cache is not None else VectorCache(p.store, model_version, Namespace.REFERENCES)
    shard = build_shard(template, ordered_chunks(cache, refs, post.apply, read_again))
    if len(shard) != len(refs):
        raise ModerationError(f"a fill range yielded {len(shard)} vectors for {len(refs)} references; "
                              "the vector cache changed during the build: build again")
    return shard


def fill_index(p: Pipeline, prepared: PreparedIndex, post: Postprocessor, read_again) -> ReferenceIndex:
    """A full build's index in one process: the template, every range filled in turn, merged in range order."""
    from moderation.index_shards import merge_shards

    # One cache instance for every pass: streaming keeps nothing in it, and at 10M references each new
    # instance would parse every part's manifest again.
    cache = VectorCache(p.store, prepared.model_version, Namespace.REFERENCES)
    template = train_fill_template(p, prepared, post, read_again, cache)
    return merge_shards([fill_range(p, prepared.model_version, template, prepared.fill_refs(start, stop), post,
                                    read_again, cache) for start, stop in prepared.ranges])


def keep_current_index(p: Pipeline, prepared: PreparedIndex) -> IndexVersion:
    """The version in force, recorded again, for a preparation that found nothing changed."""
    current = p.registry.manifest(Kind.INDEX, prepared.previous, model_version=prepared.model_version)
    log.info("reference set unchanged: index %s stays in force", current.version)
    p.db.record_index(current)
    register_banks(p.db, Counter(prepared.banks.values()), current.version)
    return current


def publish_reference_index(p: Pipeline, prepared: PreparedIndex, reader: ReferenceReader,
                            index: ReferenceIndex | None = None) -> IndexVersion:
    """Build what ``prepared`` decided and publish it: files, manifest, then the pointer.

    ``index`` is a full build's index when it was filled elsewhere (the
    merged fill shards); otherwise an incremental build updates its base in
    place (falling back to a full build when FAISS cannot) and a full build
    fills its ranges here. ``reader`` serves vectors (held-out references,
    added ones) from what it read, else the cache, else the images.
    Returns the new version, in force. Raises ModerationError when nothing
    is left to index.
    """
    from moderation.incremental_index import held_vectors, update_index
    from moderation.reference_changes import MANIFEST_FILE, manifest_bytes

    stats = p.registry.manifest(Kind.STATS, prepared.stats_version, model_version=prepared.model_version)
    post, _ = p.load_stats(stats)
    refs, banks, by_id = prepared.refs, prepared.banks, prepared.ref_by_id
    kept, held_ids = prepared.kept, prepared.held
    base_held: dict[str, np.ndarray] = {}

    def vectors_of(ids: list[str]) -> np.ndarray:
        return post.apply(reader.vectors([by_id[i] for i in ids]))

    mode, base = "full", None
    if index is None and prepared.mode == "incremental":
        base = p.registry.manifest(Kind.INDEX, prepared.base, model_version=prepared.model_version)
        index = p.read_index(base)
        prev_held, prev_held_ids = p.index_held_out(base)
        stale = set(prepared.stale)
        base_held = {rid: v for rid, v in zip(prev_held_ids, prev_held) if rid not in stale and rid in by_id}
        try:
            # Re-enabled references come back from the held-out file, not the cache.
            counts = update_index(index, kept, stale,
                                  lambda ids: held_vectors(ids, base_held, vectors_of, index.dim))
            mode = "incremental"
            log.info("updated index %s in place: %s", base.version, counts)
        except ModerationError as exc:
            log.info("building the index in full: %s", exc)
            index, base_held = None, {}
    if index is None:
        if not kept:
            raise ModerationError("no reference vectors to index")
        if not prepared.fill:
            plan_fill(p, prepared)
        # Streamed: a part of the vector cache at a time, never every vector at once (beyond the index itself).
        index = fill_index(p, prepared, post, reader.vectors)
    if len(index) != len(kept):
        raise ModerationError(f"the index holds {len(index)} references, {len(kept)} were prepared; build again")
    trained = (base.info.get("trained_count") if mode == "incremental" else _trained_count(index))
    held_vecs = held_vectors(held_ids, base_held, vectors_of, index.dim)
    pdq_index = reference_pdq(p, refs, reader.pdq)
    spool = tempfile.TemporaryDirectory(prefix="moderation-index-")
    index_path = Path(spool.name) / "index.faiss"
    ids_bytes = index.save(index_path)  # uploaded from the file: the index is never in memory twice
    held_buf = io.BytesIO()
    np.save(held_buf, np.ascontiguousarray(held_vecs, np.float32), allow_pickle=False)
    info = prepared.info
    # A forced full build must publish even the content in force, also within the second that published it.
    record = IndexVersion(version=new_version_id("" if prepared.forced else prepared.content),
                          model_version=prepared.model_version, stats_version=prepared.stats_version,
                          count=len(index), dim=index.dim,
                          factory=index.factory, content_sha256=prepared.content,
                          info={"failures": info["failures"], "cached": info["cached"],
                                "local_features": info["local_features"], "banks": dict(Counter(banks.values())),
                                "held_out": len(held_ids), "build": mode, "changes": info["changes"],
                                "read": info["read"], "previous": prepared.previous,
                                "trained_count": trained, "retrain_growth": p.settings.index_retrain_growth,
                                "pdq": None if pdq_index is None else {"hashes": len(pdq_index)}})
    files = {"index.faiss": index_path, "ids.json": ids_bytes,
             "locations.json": json.dumps({r.image_id: r.location for r in refs}, sort_keys=True).encode(),
             "shas.json": json.dumps({r.image_id: r.sha256 for r in refs}, sort_keys=True).encode(),
             "banks.json": json.dumps(banks, sort_keys=True).encode(),
             "held_out.json": json.dumps(held_ids).encode(), "held_out.npy": held_buf.getvalue(),
             MANIFEST_FILE: manifest_bytes(refs, prepared.failed)}
    if pdq_index is not None:
        files[PDQ_FILE] = pdq_index.to_bytes()
    with spool:
        record = p.registry.publish(Kind.INDEX, record, files)
    p.db.record_index(record)
    register_banks(p.db, Counter(banks.values()), record.version)
    log.info("published index %s (%s): %d references, factory %s, %d read", record.version, mode, record.count,
             record.factory, info["read"])
    return record


def _trained_count(index: ReferenceIndex) -> int | None:
    from moderation.incremental_index import trained_count

    return trained_count(index)


def _held_out(p: Pipeline, banks: dict[str, str]) -> set[str]:
    """References the build leaves out of the index (disabled now); none if that would leave it empty.

    Their vectors are kept beside the index (held_out.npy) so that
    re-enabling one brings it back at the next matching run, not the next build.
    """
    held = read_controls(p.db).removed(banks)
    return held if len(held) < len(banks) else set()


def reference_pdq(p: Pipeline, refs: list[ImageRef], cache: VectorCache | None = None) -> PdqIndex | None:
    """The references' PDQ hashes in ``refs`` order, from the PDQ cache the embedding filled (None: PDQ off).

    The cache is streamed a part at a time into one array (no object per
    hash: 10M references hold 330 MB, not gigabytes). ``cache`` is the
    build's own PDQ cache when it has one (its manifests already read). A
    reference whose hash could not be computed is left out (logged).
    """
    if not p.settings.pdq:
        return None
    cache = cache if cache is not None else pdq_cache(p.store, Namespace.REFERENCES)
    position: dict[str, list[int]] = {}
    for i, r in enumerate(refs):
        position.setdefault(r.sha256, []).append(i)
    codes = np.zeros((len(refs), PDQ_BYTES), np.uint8)
    quality = np.full(len(refs), -1, np.int16)
    found = np.zeros(len(refs), bool)
    for shas, rows in cache.stream(list(position)):
        try:
            part_codes, part_quality = codes_from_rows(rows)
        except ValueError:  # not PDQ rows: as if uncached
            continue
        at = [position[sha] for sha in shas]
        rows_of = np.repeat(np.arange(len(shas)), [len(a) for a in at])
        where = np.fromiter((i for a in at for i in a), np.int64, count=len(rows_of))
        codes[where], quality[where], found[where] = part_codes[rows_of], part_quality[rows_of], True
    if not found.all():
        log.warning("%d of %d references have no PDQ hash", int((~found).sum()), len(refs))
    keep = np.flatnonzero(found)
    return PdqIndex([refs[i].image_id for i in keep], codes[keep], quality[keep])


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


def pin(p: Pipeline, *, calibrating: bool = False) -> Pinned:
    """Resolve model -> index -> the index's own statistics version, and the calibration.

    The statistics come from the index's manifest, not the stats pointer, so
    a statistics refresh that has not yet been followed by an index rebuild
    never mixes spaces. Raises VersionMismatchError on an inconsistent chain,
    CorruptPointerError on a broken pointer (a broken calibration pointer
    only when not ``calibrating``: calibrating replaces it).
    """
    model = p.current_model()
    index = p.current_index(model)
    if index.model_version != model.version:
        raise VersionMismatchError(f"index {index.version} was built for model {index.model_version}, "
                                   f"not {model.version}")
    stats = p.registry.manifest(Kind.STATS, index.stats_version, model_version=model.version)
    return Pinned(model, stats, index, p.current_calibration(model, stats, replacing=calibrating))


def search_space(p: Pipeline, pinned: Pinned, controls: Controls | None = None):
    """What matching and calibration search with the pinned chain.

    With ``controls``, the references they disable are not searched; the
    ones the index build held out and that are enabled again are added back
    to this run's copy of the index. Without (calibration, benchmarks), every
    reference is searched. Returns (:class:`moderation.evaluation.SearchSpace`,
    the matching settings of ``p.settings`` as a TwoStageConfig, reference id
    -> location, the loaded model, the reference-feature reader or None
    without verification). Raises IntegrityError if an artifact fails its sha256.
    """
    from moderation.evaluation import SearchSpace
    from moderation.local_features import FeatureCache
    from moderation.reference_features import ReferenceFeatures
    from moderation.two_stage import TwoStageConfig

    loaded = p.load(pinned.model)
    post, bg = p.load_stats(pinned.stats)
    index, locations = p.load_index(pinned.index)
    banks = p.index_banks(pinned.index, locations)
    removed = (controls or Controls()).removed(banks)
    held_vectors, held_ids = p.index_held_out(pinned.index)
    back = [i for i, rid in enumerate(held_ids) if rid not in removed]
    index.add(held_vectors[back], [held_ids[i] for i in back])
    if removed:
        index = index.without(removed)
        log.info("%d references are disabled (banks off: %s) and are not searched", len(removed),
                 ", ".join(sorted(controls.disabled_banks)) or "none")
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
    pinned = pin(p, calibrating=store)
    space, config, _, loaded, refs = search_space(p, pinned)
    evaluation = evaluate_queries(loaded.module, source, gt, space, loaded.settings_for(p.settings), config,
                                  target_precision=target_precision, cache=VectorCache(p.store, loaded.version, Namespace.QUERIES),
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
    n_suppressed: int = 0  # above the threshold but not flagged (runs/BATCH/suppressed.csv says why)
    n_removed_references: int = 0  # disabled references (and banks) not searched


def run_matching(p: Pipeline, source: ImageSource, batch: str, *,
                 candidates_out: Path | None = None, evidence_source: ImageSource | None = None,
                 hold: str | None = None) -> MatchSummary:
    """Match a query batch, keep every candidate as a run artifact, flag pairs above the threshold.

    The operators' controls are read at the start: disabled banks and
    references are not searched, and pairs above the threshold that the
    allow-list suppresses (a standing rejection of the same query content
    and reference, a reference's ``strict`` or ``suppress`` policy) are not
    flagged but written to ``runs/BATCH/suppressed.csv`` with the reason.
    Flagged pairs carry their reference's bank and the query's sha256.

    The run is recorded per ``batch``: running it again replaces that run's
    results (no duplicate pairs) when it completes; until then the pairs of
    the batch's last complete run stay in review. With ``hold`` (a reason),
    the new pairs are published under a ``pending`` quality hold, in the
    same transaction. On failure the run is marked failed with
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
        # Read once per run: a change made while the run is under way applies from the next run.
        controls = read_controls(p.db)
        result, config, locations, loaded, banks = _match(p, pinned, source, combiner, controls)
        failures = _failure_summary(result)
        run_folder = run_folder_of(batch)
        p.store.put(f"{run_folder}/failures.json", json.dumps(failures).encode(), "application/json")
        _check_batch(result, p.settings.max_failure_rate, "queries")
        cands = result.candidates
        csv_text = candidates_csv(cands)
        p.store.put(f"{run_folder}/candidates.csv", csv_text.encode(), "text/csv")
        p.store.put(f"{run_folder}/verification.csv", verification_csv(cands).encode(), "text/csv")
        query_keys = {r.image_id: r.location for r in result.refs}
        query_shas = {r.image_id: r.sha256 for r in result.refs}
        rejected = rejected_pairs(p.db, query_shas.values())
        chosen, suppressed = split_suppressed(flagged(cands, threshold) if choice.flags else [], query_shas,
                                              rejected, controls,
                                              p.settings.strict_min_inliers)
        pdq_hits, pdq_suppressed = _pdq_allowed(_pdq_matches(p, pinned, result, run_folder), cands, banks,
                                                query_shas, controls, rejected, p.settings.strict_min_inliers)
        seen = {(x.candidate.query_id, x.candidate.reference_id) for x in suppressed}
        suppressed += [x for x in pdq_suppressed if (x.candidate.query_id, x.candidate.reference_id) not in seen]
        p.store.put(f"{run_folder}/suppressed.csv", suppressed_csv(suppressed, banks).encode(), "text/csv")
        p.store.put(f"{run_folder}/matching.json", json.dumps(
            {"matching": config.as_dict(), "threshold": threshold, "threshold_source": source_name,
             "high_threshold": choice.high,
             "combiner": combiner.to_dict(), "seconds": result.seconds, "n_verified": result.n_verified,
             "controls": controls.summary(), "n_removed_references": len(controls.removed(banks)),
             "suppressed": dict(Counter(s.reason.value for s in suppressed))},
            indent=2, default=str).encode(), "application/json")
        if candidates_out:
            Path(candidates_out).write_text(csv_text)
        # What retroactive matching reads to find this batch's cached vectors without reading its images.
        p.store.put(f"{run_folder}/queries.json", queries_json(pinned.model.version, result.refs),
                    "application/json")
        pairs = [replace(fp, bank=bank_of(fp.reference_id, banks),
                         query_sha256=query_shas.get(fp.query_id) or None)
                 for fp in merge_pairs(chosen, cands, pdq_hits, query_keys, locations)]
        if p.settings.evidence and pairs:
            geometry = {(c.query_id, c.reference_id): c.verification for c in cands}
            pairs = _with_evidence(p, loaded, pairs, source, run_folder, geometry)
        run.n_queries = len(result.refs) + len(result.failures)
        run.n_failed = len(result.failures)
        run.n_candidates = len(cands)
        run.failures = failures
        run.candidates_key = f"{run_folder}/candidates.csv"
        p.db.finish_run(run, pairs, hold=hold)
    except BaseException as exc:
        try:
            p.db.fail_run(batch, f"{type(exc).__name__}: {exc}", failures)
        except Exception as mark_exc:  # the database may be what failed: keep the original error
            log.error("could not mark batch %s as failed: %s", batch, mark_exc)
        raise
    log.info("batch %s: %d queries, %d candidates, %d flagged at threshold %s (%s), %d suppressed", batch,
             run.n_queries, run.n_candidates, len(pairs), f"{threshold:.4f}" if choice.flags else "none",
             source_name, len(suppressed))
    return MatchSummary(run_id, batch, run.n_queries, run.n_failed, run.n_candidates, len(pairs),
                        threshold, source_name, pinned.model.version, pinned.stats.version,
                        pinned.index.version, run.candidates_key, n_suppressed=len(suppressed),
                        n_removed_references=len(controls.removed(banks)))


def _pdq_matches(p: Pipeline, pinned: Pinned, result, run_folder: str) -> list:
    """The run's PDQ matches (none with MODERATION_PDQ off); what was searched goes to ``pdq.json``."""
    if not p.settings.pdq:
        return []
    from moderation import pdq_matching

    config = PdqConfig.from_settings(p.settings)
    index, info = pdq_matching.run_index(p, pinned.index)
    hits = pdq_matching.match(index, result.pdq, config)
    p.store.put(f"{run_folder}/pdq.json", json.dumps(
        {**info, **config.as_dict(), "queries_hashed": len(result.pdq), "matches": len(hits)},
        indent=2).encode(), "application/json")
    log.info("PDQ: %d matches of %d hashed queries against %d reference and %d bank hashes", len(hits),
             len(result.pdq), info["references"], info["bank_hashes"])
    return hits


def _pdq_allowed(hits: list, cands: list[Candidate], banks: Mapping[str, str], query_shas: Mapping[str, str],
                 controls: Controls, rejected: set[tuple[str, str]], strict_min_inliers: int) -> tuple[list, list]:
    """PDQ matches under the operators' controls, as the descriptor's pairs are: (kept, suppressed).

    A disabled reference is dropped; a standing rejection or a reference policy suppresses the match
    (``strict`` asks for geometric evidence a hash match alone does not give). Hash-bank entries
    (no image in the index) follow only the rejection rule.
    """
    removed = controls.removed(banks)
    scored = {(c.query_id, c.reference_id): c for c in cands}
    kept, dropped = [], []
    for m in hits:
        if m.reference_id in removed:
            continue
        c = scored.get((m.query_id, m.reference_id)) or Candidate(m.query_id, m.reference_id, 0.0, 0.0, 0)
        ok, why = split_suppressed([c], query_shas, rejected, controls, strict_min_inliers)
        if ok:
            kept.append(m)
        else:
            dropped += why
    return kept, dropped


def bank_of(reference_id: str, banks: Mapping[str, str]) -> str:
    """The bank a flagged reference belongs to (daily and retroactive pairs); an imported hash bank's entries
    are named by it; a reference missing from ``banks`` is in ``default``."""
    if reference_id in banks:
        return banks[reference_id]
    if reference_id.startswith("hashbank:"):
        return "hashbank:" + reference_id.split(":", 2)[1]
    return DEFAULT_BANK


def queries_json(model_version: str, refs) -> bytes:
    """A batch's query list (``runs/BATCH/queries.json``): id, object key, sha256 of each decoded query."""
    return json.dumps({"model_version": model_version,
                       "queries": [[r.image_id, r.location, r.sha256] for r in refs]}).encode()


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


def _match(p: Pipeline, pinned: Pinned, source: ImageSource, combiner, controls: Controls):
    """Both matching stages over ``source`` with the pinned chain, honouring the operators' ``controls``.

    Returns (result, config, locations, loaded model, reference id -> bank).
    """
    from moderation.two_stage import match_queries

    space, config, locations, loaded, refs = search_space(p, pinned, controls)
    result = match_queries(loaded.module, source, loaded.settings_for(p.settings), config, space.index,
                           space.postprocessor, space.background, reference_features=space.reference_features,
                           combiner=combiner, cache=VectorCache(p.store, loaded.version, Namespace.QUERIES),
                           device=resolve_device(p.settings.device.value),
                           pdq_cache=pdq_cache(p.store, Namespace.QUERIES) if p.settings.pdq else None)
    _warn_uncached_features(refs)
    return result, config, locations, loaded, p.index_banks(pinned.index, locations)


def run_folder_of(batch: str) -> str:
    """The object folder of a batch's run artifacts (``runs/SLUG``), the same for every rerun."""
    return f"runs/{_safe_batch(batch)}"


def _safe_batch(batch: str) -> str:
    """A batch name as one object-key segment (a folder path becomes a readable slug)."""
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in batch.strip("/"))[-120:]
    return f"{slug.strip('._') or 'batch'}-{sha256_hex(batch.encode())[:8]}"


def embed_shard(p: Pipeline, source: ImageSource, what: str = "shard",
                namespace: Namespace = Namespace.REFERENCES) -> dict:
    """Embed a shard of images into the shared vector cache (Airflow mapped tasks); returns counts.

    Reference shards also fill the PDQ cache, so the index build decodes nothing again.
    """
    model = p.current_model()
    result = p.embed(p.load(model), source, what, namespace, pdq=namespace is Namespace.REFERENCES)
    return {"model_version": model.version, "embedded": len(result.refs), "cached": result.cached,
            "failed": len(result.failures)}

