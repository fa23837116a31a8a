"""What each Airflow task does, as plain functions (no Airflow import; testable without it).

The DAG files in ``dags/`` only wire these together: they read the Airflow
connections, call one function per task and pass the small dicts these
return through XCom. Every function takes a :class:`Settings` (built from
the connections by :func:`settings_from_connections`) and is safe to run
again: the jobs it calls publish immutable versions and move pointers last,
and a match run of a batch replaces that batch's run.

Model pinning: a task that works for one model version opens the pipeline
with :func:`open_pipeline` ``(settings, model_version)``, so a promotion in
the middle of a DAG run never mixes two models' vectors. Matching serves the
newest model whose reference index exists (:func:`serving_model`): after a
promotion, queries keep being matched with the previous model until the
statistics and index of the new one are published.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from moderation import quality
from moderation.config import Settings
from moderation.embedding import StoreSource
from moderation.errors import (BatchFailedError, ConfigError, EmptyBatchError, MissingPrerequisiteError,
                               ModerationError, NotFoundError, VersionMismatchError)
from moderation.images import IMAGE_SUFFIXES, sha256_hex
from moderation.jobs import (Pipeline, build_reference_index, calibrate_labelled, refresh_stats,
                             run_matching)
# Defined in the import-free layout module so the DAG files can read them at parse time; kept
# importable from here, where the task code and the tests look for them.
from moderation.layout import (BACKGROUND_PREFIX, CALIBRATION_PREFIX, DB_CONN_ID, INDEX_DAG,  # noqa: F401
                               PROFILES_PREFIX, QUERIES_PREFIX, REFERENCES_PREFIX, S3_CONN_ID, STATS_DAG,
                               TRAINING_PREFIX, VALIDATION_PREFIX)
from moderation.registry import Kind, ModelVersion, Registry
from moderation.store import ObjectStore, open_store
from moderation.vector_cache import Namespace

log = logging.getLogger(__name__)


_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


# -- configuration from Airflow connections --------------------------------------------------


def _extra(conn: Mapping[str, Any]) -> dict[str, Any]:
    extra = conn.get("extra") or {}
    if isinstance(extra, str):
        try:
            extra = json.loads(extra) if extra.strip() else {}
        except json.JSONDecodeError:
            raise ConfigError(f"connection {conn.get('conn_id')!r}: extra is not JSON") from None
    return dict(extra)


def database_url_from_connection(conn: Mapping[str, Any]) -> str:
    """A SQLAlchemy URL from an Airflow connection dict (``Connection.to_dict()``).

    ``postgres``/``postgresql`` connections become ``postgresql+psycopg://``;
    an ``sqlalchemy_url`` in extra wins (e.g. ``sqlite:///...`` for a demo).
    """
    from sqlalchemy.engine import URL

    extra = _extra(conn)
    if extra.get("sqlalchemy_url"):
        return str(extra["sqlalchemy_url"])
    kind = (conn.get("conn_type") or "").lower()
    if kind in ("postgres", "postgresql"):
        if not conn.get("host"):
            raise ConfigError(f"connection {conn.get('conn_id')!r} has no host")
        return URL.create("postgresql+psycopg", username=conn.get("login") or None,
                          password=conn.get("password") or None, host=conn.get("host"),
                          port=int(conn["port"]) if conn.get("port") else None,
                          database=conn.get("schema") or None,
                          query={k: str(v) for k, v in extra.items() if k in ("sslmode", "application_name")},
                          ).render_as_string(hide_password=False)
    if kind == "sqlite":
        return f"sqlite:///{conn.get('host') or conn.get('schema')}"
    raise ConfigError(f"connection {conn.get('conn_id')!r}: type {kind!r} is not a review database "
                      "(use a postgres connection, or extra.sqlalchemy_url)")


def store_settings_from_connection(conn: Mapping[str, Any]) -> dict[str, Any]:
    """Settings fields for the object store from an Airflow connection dict.

    An ``aws`` connection (login/password = access/secret key; extra
    ``endpoint_url`` such as ``http://minio:9000``, ``bucket``, optional
    ``prefix`` and ``region_name``) or a ``generic`` one with host/port.
    A ``fs`` connection (extra ``path``) selects a local folder store.
    """
    extra = _extra(conn)
    kind = (conn.get("conn_type") or "").lower()
    if kind in ("fs", "file"):
        path = extra.get("path") or conn.get("host")
        if not path:
            raise ConfigError(f"connection {conn.get('conn_id')!r}: an fs store needs extra.path")
        return {"store_url": f"file://{Path(path).resolve()}"}
    bucket = extra.get("bucket") or extra.get("bucket_name") or conn.get("schema")
    if not bucket:
        raise ConfigError(f"connection {conn.get('conn_id')!r}: name the bucket in extra.bucket")
    endpoint, secure = "", False
    url = extra.get("endpoint_url") or (extra.get("service_config") or {}).get("s3", {}).get("endpoint_url")
    if url:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        endpoint, secure = parts.netloc, parts.scheme == "https"
    elif conn.get("host"):
        endpoint = f"{conn['host']}:{conn['port']}" if conn.get("port") else conn["host"]
        secure = bool(extra.get("secure", False))
    if not endpoint:
        raise ConfigError(f"connection {conn.get('conn_id')!r}: set extra.endpoint_url (e.g. http://minio:9000)")
    prefix = str(extra.get("prefix", "")).strip("/")
    return {"store_url": f"s3://{bucket}" + (f"/{prefix}" if prefix else ""),
            "s3_endpoint": endpoint, "s3_secure": secure,
            "s3_access_key": conn.get("login") or extra.get("aws_access_key_id") or "",
            "s3_secret_key": conn.get("password") or extra.get("aws_secret_access_key") or "",
            "s3_region": extra.get("region_name") or ""}


def settings_from_connections(db_conn: Mapping[str, Any] | None, s3_conn: Mapping[str, Any] | None,
                              env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from ``MODERATION_*`` variables, with the database and store from connections."""
    values: dict[str, Any] = {}
    if db_conn:
        values["database_url"] = database_url_from_connection(db_conn)
    if s3_conn:
        values.update(store_settings_from_connection(s3_conn))
    values.update(overrides)
    return Settings.from_env(env, **values)


# -- pipelines pinned to a model -------------------------------------------------------------


@dataclass
class PinnedPipeline(Pipeline):
    """A pipeline whose ``current_model`` is a fixed version (empty: the pointer, as usual)."""

    model_version: str = ""

    def current_model(self) -> ModelVersion:
        if not self.model_version:
            return super().current_model()
        try:
            record = self.registry.manifest(Kind.MODEL, self.model_version)
        except NotFoundError:
            raise NotFoundError(f"model version {self.model_version} is not in the registry") from None
        self.db.record_model(record)
        return record


def open_pipeline(settings: Settings, model_version: str | None = None) -> PinnedPipeline:
    base = Pipeline.open(settings)
    return PinnedPipeline(base.settings, base.store, base.db, model_version or "")


def current_model_version(settings: Settings) -> str:
    return open_pipeline(settings).current_model().version


def has_index(registry: Registry, model_version: str) -> bool:
    try:
        registry.current(Kind.INDEX, model_version=model_version)
        return True
    except NotFoundError:
        return False


def serving_model(p: Pipeline) -> ModelVersion:
    """The model matching uses: the current one once its index exists, else the newest that has one."""
    current = p.current_model()
    if has_index(p.registry, current.version):
        return current
    for record in reversed(p.registry.versions(Kind.MODEL)):
        if record.version != current.version and has_index(p.registry, record.version):
            log.warning("model %s is current but has no reference index yet; matching keeps serving "
                        "model %s until statistics and index are rebuilt", current.version, record.version)
            return record
    return current  # pin() raises the library's NotFoundError with its hint


def require_serving_index(settings: Settings) -> dict[str, str]:
    """The model and index matching will use; MissingPrerequisiteError when no model has an index.

    Same choice as :func:`serving_model` (the current model if it has an index, else the newest that has
    one) but read from the registry only: it registers no default model and loads nothing. The error's
    ``producer`` is the DAG to run: the index DAG when some model has statistics, else the statistics DAG
    (whose event starts the index DAG).
    """
    registry = Registry(open_store(settings))
    current = _current_version(registry, Kind.MODEL)
    newest_first = [r.version for r in reversed(registry.versions(Kind.MODEL))]
    candidates = ([current] if current else []) + [v for v in newest_first if v != current]
    for version in candidates:
        index = _current_version(registry, Kind.INDEX, model_version=version)
        if index is not None:
            return {"model_version": version, "index_version": index}
    with_stats = [v for v in candidates if _current_version(registry, Kind.STATS, model_version=v)]
    if with_stats:
        raise MissingPrerequisiteError(
            f"no reference index for any model yet (statistics exist for {with_stats[0]}): the DAG {INDEX_DAG} "
            "builds it (nightly, and after every statistics refresh); its event starts matching",
            producer=INDEX_DAG)
    raise MissingPrerequisiteError(
        f"no reference index for any model yet, nor background statistics to build one: run the DAG "
        f"{STATS_DAG} (its event starts {INDEX_DAG}, whose event starts matching)", producer=STATS_DAG)


# -- listing, sampling, sharding -------------------------------------------------------------


def list_images(store: ObjectStore, prefix: str) -> list[str]:
    return [k for k in store.list(prefix) if k.lower().endswith(IMAGE_SUFFIXES)]


def sample_keys(keys: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """A deterministic sample of ``n`` keys (all if fewer): rank by a seeded hash.

    Stable as images are added: a key in today's sample stays in it unless a
    new key ranks above it, so statistics change only with the data.
    """
    if n <= 0 or n >= len(keys):
        return sorted(keys)
    ranked = sorted(keys, key=lambda k: sha256_hex(f"{seed}:{k}".encode()))
    return sorted(ranked[:n])


def shard_of(key: str, count: int) -> int:
    return int(sha256_hex(key.encode())[:8], 16) % count


def shard_count(n_keys: int, keys_per_shard: int, max_shards: int) -> int:
    return max(1, min(max_shards, math.ceil(n_keys / max(1, keys_per_shard))))


def run_slug(run_id: str) -> str:
    """An Airflow run id as one object-key segment."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("._")[:80] or "run"
    return f"{slug}-{sha256_hex(run_id.encode())[:8]}"


# -- background statistics -------------------------------------------------------------------


def sample_background(settings: Settings, *, prefix: str = BACKGROUND_PREFIX, sample_size: int = 5000,
                      seed: int = 0, model_version: str | None = None) -> dict[str, Any]:
    """Resolve the model and sample the background set. Reads: store listing. Writes: nothing."""
    p = open_pipeline(settings, model_version)
    model = p.current_model()
    keys = list_images(p.store, prefix)
    if not keys:
        raise BatchFailedError(f"no background images under {prefix!r} in {p.store.url}")
    chosen = sample_keys(keys, sample_size, seed)
    log.info("sampled %d of %d background images for model %s", len(chosen), len(keys), model.version)
    return {"model_version": model.version, "prefix": prefix, "keys": chosen, "available": len(keys)}


def fit_background_stats(settings: Settings, sample: Mapping[str, Any],
                         limits: quality.QualityLimits | None = None) -> dict[str, Any]:
    """Embed the sample (embeddings gate), fit and publish statistics for the sample's model.

    Writes: vector cache, ``stats/MODEL/STATS/`` and its pointer (only if
    the statistics changed), stats_versions row. Returns the version in force.
    """
    p = open_pipeline(settings, sample["model_version"])
    model = p.current_model()
    source = StoreSource(settings, sample["prefix"], keys=tuple(sample["keys"]))
    result = p.embed(p.load(model), source, "background")
    gate = quality.check_embeddings(result.vectors, model.dim, "background", limits).raise_for_failure()
    before = _version_before(p.registry, Kind.STATS, model_version=model.version)
    stats = refresh_stats(p, source)
    return {"model_version": model.version, "stats_version": stats.version,
            "changed": stats.version != before, "previous": before, "n_background": stats.n_background,
            "embeddings_gate": gate.summary()}


def _current_version(registry: Registry, kind: Kind, **pins: str) -> str | None:
    try:
        return registry.current(kind, **pins).version
    except NotFoundError:
        return None


def _version_before(registry: Registry, kind: Kind, **pins: str) -> str | None:
    """The version in force before a task publishes one; None if none or its pointer is broken (publishing repairs it)."""
    record = registry.replaceable_current(kind, **pins)
    return record.version if record is not None else None


# -- reference index -------------------------------------------------------------------------


def plan_reference_index(settings: Settings, *, prefix: str = REFERENCES_PREFIX, keys_per_shard: int = 2000,
                         max_shards: int = 16, model_version: str | None = None, full: bool = False) -> dict[str, Any]:
    """Pin model + statistics in force, list the references, split the new and changed ones into shards.

    The listing is compared with the manifest of the index version in force
    (:mod:`moderation.reference_changes`; pinned in the plan as
    ``previous_index``), so the shards carry only what must be read; with
    ``full`` (or MODERATION_INDEX_FULL_REBUILD) they carry every reference.
    Raises MissingPrerequisiteError (a NotFoundError) naming the statistics
    DAG when the model has no statistics yet, found from the registry before
    anything is registered or loaded, and BatchFailedError when the prefix is empty.
    """
    p = open_pipeline(settings, model_version)
    pinned = model_version or _current_version(p.registry, Kind.MODEL)
    if pinned is None or _current_version(p.registry, Kind.STATS, model_version=pinned) is None:
        raise MissingPrerequisiteError(
            f"no background statistics for model {pinned or '(none registered yet)'}: the DAG {STATS_DAG} "
            "fits them (weekly, and after every promotion; trigger it once on a new installation), and its "
            "event starts this DAG", producer=STATS_DAG)
    model = p.current_model()
    stats = p.current_stats(model)
    if stats.model_version != model.version:
        raise VersionMismatchError(f"statistics {stats.version} belong to model {stats.model_version}, "
                                   f"not {model.version}")
    full = full or settings.index_full_rebuild
    previous = None if full else _version_before(p.registry, Kind.INDEX, model_version=model.version)
    listed, changed = _changed_references(p, prefix, previous, model.version)
    if not listed:
        raise BatchFailedError(f"no reference images under {prefix!r} in {p.store.url}")
    count = shard_count(len(changed), keys_per_shard, max_shards)
    pins = {"model_version": model.version, "stats_version": stats.version, "prefix": prefix,
            "previous_index": previous, "full": full}
    log.info("%d references, %d new or changed since %s, in %d shards", len(listed), len(changed),
             previous or "(no index)", count)
    return {**pins, "n_keys": len(listed), "n_changed": len(changed),
            "shards": [{**pins, "index": i, "count": count} for i in range(count)]}


def _changed_references(p: Pipeline, prefix: str, previous: str | None, model_version: str):
    """(every listed reference, the ones to read): those ``previous`` (an index version, or None) lacks as they are."""
    from moderation.reference_changes import MANIFEST_FILE, detect_changes, read_manifest

    listed = StoreSource(p.settings, prefix).listed()
    manifest = None
    if previous:
        record = p.registry.manifest(Kind.INDEX, previous, model_version=model_version)
        if MANIFEST_FILE in record.files:
            manifest = read_manifest(p.registry.load(Kind.INDEX, record, MANIFEST_FILE))
    return listed, detect_changes(listed, manifest).to_read


# A shard reads its images this many at a time and holds their bytes until they are profiled,
# embedded and described: each image is fetched once, and memory stays bounded.
READ_CHUNK = 256


@dataclass(frozen=True)
class _FetchedSource:
    """Images already fetched, by key (what one chunk of a shard read); picklable for decode workers."""

    data: Mapping[str, bytes]

    def refs(self):
        from moderation.images import ImageRef, image_id_from

        return [ImageRef(image_id_from(k), k) for k in self.data]

    def read(self, location: str) -> bytes:
        return self.data[location]


def embed_reference_shard(settings: Settings, shard: Mapping[str, Any], *, run_id: str,
                          limits: quality.QualityLimits | None = None) -> dict[str, Any]:
    """Profile, embed and describe one shard of the new or changed references, reading each once.

    The shard's references are those :func:`plan_reference_index` found new or
    changed against the plan's ``previous_index``. Reads: the shard's images,
    once each (profile, sha256, vector, PDQ hash and local features from the
    same bytes). Writes: the shard's quality profile
    (``quality/profiles/references/RUN/shard-N.csv``), the sha256 it read per
    key and fingerprint (``shard-N.refs.json``, for the build task), new
    vectors in ``embeddings/MODEL/references/`` and, with verification on,
    new local features in ``features/CONFIG/``. Fails on non-finite,
    wrong-size or non-unit vectors.
    """
    from moderation.embedding import embed
    from moderation.local_features import FeatureCache
    from moderation.pdq import pdq_cache
    from moderation.two_stage import TwoStageConfig
    from moderation.vector_cache import VectorCache

    p = open_pipeline(settings, shard["model_version"])
    model = p.current_model()
    loaded = p.load(model)
    index, count = int(shard["index"]), int(shard["count"])
    _, changed = _changed_references(p, shard["prefix"], shard.get("previous_index"), model.version)
    refs = [r for r in changed if shard_of(r.location, count) == index]
    slug = f"{PROFILES_PREFIX}references/{run_slug(run_id)}/shard-{index:05d}"
    profile_key, refs_key = f"{slug}.csv", f"{slug}.refs.json"
    embed_settings = loaded.settings_for(settings)
    cache = VectorCache(p.store, model.version, Namespace.REFERENCES)
    hashes = pdq_cache(p.store, Namespace.REFERENCES) if settings.pdq else None
    features = FeatureCache(p.store, TwoStageConfig.from_settings(settings).features) if settings.verify else None
    profiles, hints, vectors = [], [], []
    counts = {"embedded": 0, "cached": 0, "failed": 0, "computed": 0, "features_failed": 0}
    for start in range(0, len(refs), READ_CHUNK):
        chunk = refs[start:start + READ_CHUNK]
        fetched: dict[str, bytes] = {}

        def fetch(key: str) -> bytes:
            fetched[key] = p.store.get(key)
            return fetched[key]

        profile = quality.profile_images(fetch, [r.location for r in chunk], max_pixels=settings.max_image_pixels,
                                         max_bytes=settings.max_file_bytes)
        profiles.append(profile)
        good = set(profile.loc[profile["decoded"], "key"])
        counts["failed"] += len(chunk) - len(good)
        todo = [r for r in chunk if r.location in good]
        if not todo:
            continue
        result = embed(loaded.module, _FetchedSource({r.location: fetched[r.location] for r in todo}),
                       embed_settings, cache=cache, refs=todo, pdq_cache=hashes, feature_cache=features,
                       desc=f"reference shard {index + 1}/{count}")
        vectors.append(result.vectors)
        counts["embedded"] += len(result.refs)
        counts["cached"] += result.cached
        counts["failed"] += len(result.failures)
        if result.features is not None:
            counts["computed"] += result.features["computed"]
            counts["features_failed"] += result.features["failed"]
        hints += [[r.location, r.fingerprint, r.sha256] for r in result.refs if r.fingerprint]
    import pandas as pd

    frame = pd.concat(profiles, ignore_index=True) if profiles else quality.profile_images(p.store.get, [])
    p.store.put(profile_key, quality.profile_to_csv(frame), "text/csv")
    p.store.put(refs_key, json.dumps({"model_version": model.version, "refs": hints}).encode(), "application/json")
    if vectors:
        quality.check_embeddings(np.concatenate(vectors), model.dim, "references", limits).raise_for_failure()
    out = {"model_version": model.version, "index": index, "keys": len(refs), "embedded": counts["embedded"],
           "cached": counts["cached"], "failed": counts["failed"], "profile_key": profile_key, "refs_key": refs_key}
    if features is not None:
        out["local_features"] = {"total": counts["embedded"], "computed": counts["computed"],
                                 "failed": counts["features_failed"],
                                 "cached": counts["embedded"] - counts["computed"] - counts["features_failed"]}
    return out


def check_reference_batch(settings: Settings, plan: Mapping[str, Any], shards: Sequence[Mapping[str, Any]],
                          limits: quality.QualityLimits | None = None) -> dict[str, Any]:
    """The batch gate over the references the shards read (the new and changed ones); refuses mixed models.

    With nothing new or changed there is nothing to gate: passes with 0 images.
    Passes on the shards' ``refs_keys`` for the build task.
    """
    import pandas as pd

    mixed = sorted({s["model_version"] for s in shards} - {plan["model_version"]})
    if mixed:
        raise VersionMismatchError(f"shards were embedded with {mixed}, the plan pinned {plan['model_version']}")
    store = open_store(settings)
    frames = [quality.profile_from_csv(store.get(s["profile_key"])) for s in shards]
    frame = pd.concat(frames, ignore_index=True) if frames else quality.profile_from_csv(b"")
    refs_keys = [s["refs_key"] for s in shards if s.get("refs_key")]
    if not len(frame):
        return {"what": "references", "images": 0, "decoded": 0, "duplicates": 0, "reasons": {},
                "summary": "no new or changed references: nothing to gate", "refs_keys": refs_keys}
    result = quality.check_image_batch(frame, "references", limits).raise_for_failure()
    return {**result.info, "summary": result.summary(), "refs_keys": refs_keys}


def build_index_version(settings: Settings, plan: Mapping[str, Any],
                        checked: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Build and publish the index for the plan's model with the plan's statistics, in this process.

    Reads: the reference listing, the previous index version's manifest, the
    shas the shards read (``checked["refs_keys"]``), vectors, PDQ hashes and
    local features from their caches, ``stats/MODEL/STATS``; an image only
    if a cache lacks it. Writes: ``indexes/MODEL/INDEX/`` then its pointer
    (only if the reference set or statistics changed), index_versions row.
    Raises VersionMismatchError if the statistics in force changed since planning.
    The nightly DAG runs the same steps split across tasks
    (:func:`prepare_index_build`, :func:`fill_index_shard`, :func:`publish_index_build`).
    """
    p, model = _pinned_for_index(settings, plan)
    before = _version_before(p.registry, Kind.INDEX, model_version=model.version)
    index = build_reference_index(p, StoreSource(settings, plan["prefix"]), full=bool(plan.get("full")),
                                  hints=_shard_hints(p, model.version, checked))
    return _built(plan, index, before)


def _pinned_for_index(settings: Settings, plan: Mapping[str, Any]):
    """(pipeline, model) pinned by the plan; VersionMismatchError if its statistics are no longer in force."""
    p = open_pipeline(settings, plan["model_version"])
    model = p.current_model()
    stats = p.current_stats(model)
    if stats.version != plan["stats_version"]:
        raise VersionMismatchError(f"statistics for model {model.version} moved from {plan['stats_version']} "
                                   f"to {stats.version} during this run; rerun the index DAG")
    return p, model


def _shard_hints(p: Pipeline, model_version: str, checked: Mapping[str, Any] | None) -> dict[str, tuple[str, str]]:
    """location -> (fingerprint, sha256) the embedding shards of this run read (for the model only)."""
    hints: dict[str, tuple[str, str]] = {}
    for key in (checked or {}).get("refs_keys", []):
        shard_refs = json.loads(p.store.get(key))
        if shard_refs["model_version"] == model_version:
            hints.update((loc, (fp, sha)) for loc, fp, sha in shard_refs["refs"])
    return hints


def _built(plan: Mapping[str, Any], index, before: str | None) -> dict[str, Any]:
    if (index.model_version, index.stats_version) != (plan["model_version"], plan["stats_version"]):
        raise VersionMismatchError(f"index {index.version} pins {index.model_version}/{index.stats_version}, "
                                   f"expected {plan['model_version']}/{plan['stats_version']}")
    return {"model_version": index.model_version, "stats_version": index.stats_version,
            "index_version": index.version, "count": index.count, "changed": index.version != before,
            "previous": before, "read": index.info.get("read"), "build": index.info.get("build")}


def _staging(p: Pipeline, model_version: str, run_id: str):
    from moderation.index_fill import FillStaging

    return FillStaging(p.store, model_version, run_slug(run_id))


def prepare_index_build(settings: Settings, plan: Mapping[str, Any], checked: Mapping[str, Any] | None = None, *,
                        run_id: str, fill_shard_size: int = 0, max_fill_shards: int | None = None
                        ) -> list[dict[str, Any]]:
    """Decide tonight's index build and, for a full one, train its template; returns the fill shards to map.

    :func:`moderation.jobs.prepare_reference_index` (change detection, the
    reads a cache lacks, mode, content), staged as
    ``staging/index-fill/MODEL/RUN/prepared.json``. A full build (first
    build, ``full``, factory or statistics changed, retrain due) also trains
    the empty index on a sample streamed from the vector cache and stages it
    (``template.*``); it returns one spec per range of the fill order
    (``fill_shard_size`` references each, default
    MODERATION_INDEX_FILL_SHARD_SIZE; at most ``max_fill_shards``). An
    incremental or unchanged night returns ``[]``: nothing to fill. Reruns
    stage again under the same keys. Publishes nothing. Raises as
    :func:`build_index_version` does.
    """
    from moderation.jobs import prepare_reference_index, train_fill_template

    p, model = _pinned_for_index(settings, plan)
    source = StoreSource(settings, plan["prefix"])
    prepared, reader = prepare_reference_index(p, source, full=bool(plan.get("full")),
                                               hints=_shard_hints(p, model.version, checked),
                                               fill_shard_size=fill_shard_size or None,
                                               max_fill_shards=max_fill_shards)
    staging = _staging(p, model.version, run_id)
    if prepared.mode == "full":
        stats = p.registry.manifest(Kind.STATS, prepared.stats_version, model_version=model.version)
        post, _ = p.load_stats(stats)
        template = train_fill_template(p, prepared, post, reader.vectors)
        prepared.template_sha = staging.put_template(template)
        for i, (start, stop) in enumerate(prepared.ranges):
            staging.put_range(i, prepared.fill_refs(start, stop), prepared.build_id)
    staging.put_prepared(prepared.to_dict())
    log.info("index build for %s: %s, %d references, %d fill shards staged under %s", model.version,
             prepared.mode, len(prepared.kept), len(prepared.ranges), staging.prefix)
    return [{"model_version": model.version, "stats_version": prepared.stats_version, "prefix": plan["prefix"],
             "run_id": run_id, "index": i, "count": len(prepared.ranges), "build_id": prepared.build_id}
            for i in range(len(prepared.ranges))]


def fill_index_shard(settings: Settings, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Fill one range of a staged full build: a copy of the template with that range's vectors; stage it.

    Reads: the range's references and the template from staging, their
    vectors from the vector cache a part at a time (an image only if its
    cached vector was lost), the pinned statistics. Writes:
    ``staging/index-fill/MODEL/RUN/shard-N.*``. Raises ModerationError if
    the build was prepared again since ``spec`` was mapped (rerun from
    ``prepare_build``), or the range's vectors fall short.
    """
    from moderation.jobs import fill_range
    from moderation.reference_reader import ReferenceReader

    p = open_pipeline(settings, spec["model_version"])
    staging = _staging(p, spec["model_version"], spec["run_id"])
    i = int(spec["index"])
    refs = staging.range_refs(i, spec["build_id"])
    stats = p.registry.manifest(Kind.STATS, spec["stats_version"], model_version=spec["model_version"])
    post, _ = p.load_stats(stats)
    readers: list = []

    def read_again(lost):  # the model is loaded only if the cache lost a vector
        if not readers:
            readers.append(ReferenceReader(p, p.load(p.current_model()), StoreSource(settings, spec["prefix"])))
        return readers[0].vectors(lost)

    shard = fill_range(p, spec["model_version"], staging.template(), refs, post, read_again)
    staging.put_shard(i, shard, spec["build_id"])
    return {"index": i, "count": len(shard)}


def publish_index_build(settings: Settings, plan: Mapping[str, Any], *, run_id: str) -> dict[str, Any]:
    """Publish the build :func:`prepare_index_build` staged for this run; then delete its staging objects.

    A full build merges the fill shards in range order
    (:func:`moderation.index_shards.merge_shards`); an incremental one
    updates the previous index in place; an unchanged one keeps the version
    in force. Files, manifest and pointer as :func:`build_index_version`
    writes them. A retry after this run already published finds it in force
    and only cleans up. Raises ModerationError when the staged preparation
    or a fill shard is missing or was filled for another preparation (the
    previous index stays in force), VersionMismatchError when the statistics
    moved since planning.
    """
    from moderation.index_shards import merge_shards
    from moderation.jobs import PreparedIndex, keep_current_index, publish_reference_index
    from moderation.reference_reader import ReferenceReader

    p, model = _pinned_for_index(settings, plan)
    staging = _staging(p, model.version, run_id)
    try:
        prepared = PreparedIndex.from_dict(staging.prepared())
    except NotFoundError:
        raise ModerationError(f"no prepared index build under {staging.prefix}: run the DAG run's prepare_build "
                              "task again") from None
    if prepared.stats_version != plan["stats_version"]:
        raise VersionMismatchError(f"the staged build pins statistics {prepared.stats_version}, the plan "
                                   f"{plan['stats_version']}: clear the run's prepare_build task and after")
    before = prepared.previous
    current = p.registry.replaceable_current(Kind.INDEX, model_version=model.version)
    if prepared.mode == "unchanged":
        index = keep_current_index(p, prepared)
    elif current is not None and current.version != before and current.content_sha256 == prepared.content:
        log.info("index %s of this build is already in force (an earlier attempt published it)", current.version)
        p.db.record_index(current)
        index = current
    else:
        merged = None
        if prepared.mode == "full":
            merged = merge_shards([staging.shard(i, prepared.build_id, prepared.fill[start:stop])
                                   for i, (start, stop) in enumerate(prepared.ranges)])
        reader = ReferenceReader(p, p.load(model), StoreSource(settings, plan["prefix"]))
        index = publish_reference_index(p, prepared, reader, merged)
    removed = staging.clear()
    log.info("removed %d staging objects under %s", removed, staging.prefix)
    return _built(plan, index, before)


def calibrate_if_labelled(settings: Settings, built: Mapping[str, Any], *,
                          prefix: str = CALIBRATION_PREFIX, target_precision: float = 0.9) -> dict[str, Any]:
    """Calibrate the threshold of the new (model, statistics) pair on the labelled set, if one exists.

    Reads: ``calibration/ground_truth.csv`` and ``calibration/queries/``.
    Writes: ``calibrations/MODEL/STATS/CAL`` and a calibrations row. A pair
    that already has a calibration is left alone unless its index changed.
    """
    p = open_pipeline(settings, built["model_version"])
    gt_key = f"{prefix}ground_truth.csv"
    if not p.store.exists(gt_key):
        return {"calibrated": False, "reason": f"no labelled set at {gt_key}"}
    model = p.current_model()
    stats = p.registry.manifest(Kind.STATS, built["stats_version"], model_version=model.version)
    if p.current_calibration(model, stats, replacing=True) is not None and not built.get("changed"):
        return {"calibrated": False, "reason": "this model/statistics pair is already calibrated"}
    with tempfile.TemporaryDirectory() as tmp:
        gt = Path(tmp) / "ground_truth.csv"
        gt.write_bytes(p.store.get(gt_key))
        record, metrics = calibrate_labelled(p, StoreSource(settings, f"{prefix}queries/"), gt,
                                             target_precision=target_precision)
    return {"calibrated": True, "calibration_version": record.version, "threshold": record.threshold,
            "metrics": quality._jsonable(metrics)}


def retro_match_new_references(settings: Settings, built: Mapping[str, Any], *,
                               days: int | None = None) -> dict[str, Any]:
    """Search the recent query batches for copies of the references the built index added; flag them.

    :func:`moderation.retroactive.retro_match` for the build's model, after
    its index and calibration are published. Reads: the two index versions'
    id -> sha lists, ``runs/BATCH/queries.json`` and cached query vectors of
    the window's batches, the images of plausible copies. Writes: each
    batch's retroactive run (``retro/BATCH``) and its pairs, add-only.
    Returns the result's summary (skipped batches with their reasons).
    """
    from moderation.retroactive import retro_match

    return retro_match(open_pipeline(settings, built["model_version"]), days=days).summary()


def collect_garbage(settings: Settings) -> dict[str, Any]:
    """Sweep the store (:func:`moderation.gc.collect_garbage` with the settings' grace period); returns its summary.

    Reads: registry pointers and manifests, ``embeddings/``, ``runs/``, match_runs and flagged_pairs.
    Writes: deletions only, each past ``MODERATION_GC_GRACE_HOURS`` or a retention period.
    """
    from moderation.gc import collect_garbage as sweep

    return sweep(open_pipeline(settings)).summary()


# -- daily matching --------------------------------------------------------------------------


def batch_date(requested: str | None, logical_date: datetime | str | None) -> str:
    """The day to match: ``requested`` (YYYY-MM-DD, for late data) or the day before the run's date."""
    if requested:
        requested = str(requested).strip()
        if not _DATE.match(requested):
            raise ConfigError(f"date {requested!r} is not YYYY-MM-DD")
        date.fromisoformat(requested)
        return requested
    if isinstance(logical_date, str):
        logical_date = datetime.fromisoformat(logical_date)
    when = logical_date or datetime.now(timezone.utc)
    return (when.date() - timedelta(days=1)).isoformat()


def batch_prefix(day: str) -> str:
    """The object prefix (and match-run batch name) of a day's queries: ``queries/YYYY-MM-DD/``."""
    if not _DATE.match(day):
        raise ConfigError(f"date {day!r} is not YYYY-MM-DD")
    return f"{QUERIES_PREFIX}{day}/"


def check_query_batch(settings: Settings, batch: str,
                      limits: quality.QualityLimits | None = None) -> dict[str, Any]:
    """Profile the day's queries and run the batch gate. Writes the profile under ``quality/profiles/``."""
    store = open_store(settings)
    keys = list_images(store, batch)
    if not keys:
        raise EmptyBatchError(f"no query images under {batch!r} in {store.url}: has the day been "
                              "uploaded? Rerun with the date parameter when late data arrives.")
    profile = quality.profile_images(store.get, keys, max_pixels=settings.max_image_pixels,
                                     max_bytes=settings.max_file_bytes)
    store.put(f"{PROFILES_PREFIX}{batch.rstrip('/')}.csv", quality.profile_to_csv(profile), "text/csv")
    result = quality.check_image_batch(profile, "queries", limits).raise_for_failure()
    return {**result.info, "batch": batch, "summary": result.summary()}


def embed_query_batch(settings: Settings, batch: str,
                      limits: quality.QualityLimits | None = None) -> dict[str, Any]:
    """Embed the day's queries with the serving model into the cache; embeddings gate.

    Returns the model version the matching task must use. Raises
    MissingPrerequisiteError before embedding anything when no model has an
    index to match against.
    """
    require_serving_index(settings)
    p = open_pipeline(settings)
    model = serving_model(p)
    result = p.embed(p.load(model), StoreSource(settings, batch), "queries", Namespace.QUERIES)
    gate = quality.check_embeddings(result.vectors, model.dim, "queries", limits).raise_for_failure()
    return {"batch": batch, "model_version": model.version, "embedded": len(result.refs),
            "cached": result.cached, "failed": len(result.failures), "embeddings_gate": gate.summary()}


def match_batch(settings: Settings, batch: str, model_version: str) -> dict[str, Any]:
    """Match the batch against the pinned chain; publish its pairs held back for the quality gate.

    Writes: ``runs/BATCH/`` artifacts, the batch's match_runs row, and on
    completion, in one transaction, its flagged_pairs (replacing an earlier
    run of the batch) and a ``pending`` hold. Pairs an earlier run published
    stay in review until then: a rerun that fails or dies hides nothing.
    """
    p = open_pipeline(settings, model_version)
    summary = run_matching(p, StoreSource(settings, batch), batch,
                           hold="awaiting the flagged-pairs quality gate")
    return asdict(summary)


def gate_flagged_batch(settings: Settings, batch: str, *, release: bool = False, released_by: str = "",
                       limits: quality.QualityLimits | None = None) -> dict[str, Any]:
    """Check the batch's flagged pairs; release the hold, or keep it (``held``) and raise.

    ``release`` (an operator's decision, e.g. the DAG parameter) lets the
    pairs through even when the gate fails, recording who released them.
    """
    limits = limits or quality.QualityLimits.from_env()
    p = open_pipeline(settings)
    run = p.db.run(batch)
    if run is None or run.status != "complete":
        raise NotFoundError(f"batch {batch!r} has no complete match run")
    pairs = p.db.pairs(run.id)
    held = set(quality.held_batches(p.db))
    history = [n for b, n in p.db.flagged_counts_by_day(limits.spike_window + len(held) + 1)
               if b != batch and b not in held][-limits.spike_window:]
    result = quality.check_flagged_pairs(pairs, threshold=run.threshold, beta=settings.sn_beta,
                                         topk=settings.topk, history=history, limits=limits)
    out = {"batch": batch, "run_id": run.id, "flagged": len(pairs), "passed": result.success,
           "summary": result.summary(), **{k: result.info.get(k) for k in ("trailing_mean", "max_count", "spike")}}
    if result.success:
        quality.release_hold(p.db, batch, "quality-gate")
        return {**out, "hold": quality.HOLD_RELEASED}
    if release:
        quality.release_hold(p.db, batch, released_by or "operator", note=result.summary())
        log.warning("gate failed but the operator released batch %s:\n%s", batch, result.summary())
        return {**out, "hold": quality.HOLD_RELEASED, "released_by": released_by or "operator"}
    quality.place_hold(p.db, batch, result.summary(), status=quality.HOLD_HELD, details=result.to_dict())
    raise quality.QualityGateError(result)


# -- retraining ------------------------------------------------------------------------------


TRAIN_PARAM_DEFAULTS: dict[str, Any] = {
    "backbone": "auto", "epochs": 1.0, "max_steps": 0, "batch_size": 32, "learning_rate": 1e-3,
    "entropy_weight": 10.0, "augmentation": "wide", "images_prefix": TRAINING_PREFIX,
    "validation_prefix": VALIDATION_PREFIX, "generated_images": 1000, "crop_size": 224,
    "projection_init": "pca", "promote": True, "force_promote": False, "image_size": 0,
}


def plan_training(settings: Settings, params: Mapping[str, Any], *, run_id: str = "manual") -> dict[str, Any]:
    """Turn the DAG parameters into a TrainConfig dict (steps from epochs over the image pool)."""
    from trainer.config import TrainConfig

    prm = {**TRAIN_PARAM_DEFAULTS, **{k: v for k, v in params.items() if v is not None}}
    store = open_store(settings)
    prefix = str(prm["images_prefix"] or "")
    n_images = len(list_images(store, prefix)) if prefix else 0
    pool = n_images + int(prm["generated_images"])
    if pool == 0:
        raise BatchFailedError(f"no training images under {prefix!r} and generated_images is 0")
    val = str(prm["validation_prefix"] or "")
    if prm["force_promote"] and prm["promote"] and not (val and store.exists(f"{val}ground_truth.csv")):
        raise ConfigError(f"force_promote needs a labelled validation set ({val or 'validation_prefix'}"
                          "ground_truth.csv with references/, queries/, background/): a model in force must "
                          "carry metrics and a 90%-precision threshold. Upload one, or retrain with "
                          "promote=false and promote the version by hand after checking it.")
    steps = max(1, math.ceil(float(prm["epochs"]) * pool / int(prm["batch_size"])))
    if int(prm["max_steps"]) > 0:
        steps = min(steps, int(prm["max_steps"]))
    config = TrainConfig(
        images_prefix=(prefix,) if n_images else (), generated=int(prm["generated_images"]),
        backbone=str(prm["backbone"]), preset=str(prm["augmentation"]), crop_size=int(prm["crop_size"]),
        projection_init=str(prm["projection_init"]),
        entropy_weight=float(prm["entropy_weight"]), batch_size=int(prm["batch_size"]), steps=steps,
        lr=float(prm["learning_rate"]), warmup_steps=min(50, max(0, steps // 10)),
        workers=settings.workers, progress=False, publish=True,
        force_promote=bool(prm["force_promote"]), eval_size=int(prm["image_size"] or 0),
        out_dir=str(settings.home / "train" / run_slug(run_id)),
        checkpoint_every=max(1, min(100, steps)), log_every=max(1, min(10, steps)),
        command=f"airflow dag sscd_retrain run {run_id}")
    return {"config": config.to_dict(), "promote": bool(prm["promote"]),
            "validation_prefix": val, "n_images": n_images, "steps": steps}


class _NoPromoteRegistry(Registry):
    """Publishes versions but never moves a pointer (a retrain asked not to promote)."""

    def publish(self, kind, record, files, *, make_current: bool = True):
        return super().publish(kind, record, files, make_current=False)


def train_and_publish_model(settings: Settings, plan: Mapping[str, Any]) -> dict[str, Any]:
    """Train, evaluate (raw 90%-precision threshold), publish a model version, maybe promote it.

    The one place that calls the trainer. Reads: training images, the
    validation set under ``validation/`` (downloaded when present).
    Writes: ``models/MODEL/`` and, when promoted, ``models/CURRENT``.
    Promotion: ``promote`` and (the new model beats the incumbent on the
    validation set, or ``force_promote``).
    """
    from trainer import TrainConfig, train_and_publish

    config = TrainConfig.from_dict(plan["config"])
    store = open_store(settings)
    registry = Registry(store) if plan.get("promote", True) else _NoPromoteRegistry(store)
    before = _version_before(registry, Kind.MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        val = plan.get("validation_prefix") or ""
        if val and store.exists(f"{val}ground_truth.csv"):
            for key in store.list(val):
                target = Path(tmp) / key[len(val):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(store.get(key))
            config = replace(config, val_dir=tmp)
        result = train_and_publish(config, settings, registry=registry)
    after = _current_version(registry, Kind.MODEL)
    if result is None or result.record is None:
        raise ModerationError("training finished without publishing a model version")
    record = result.record
    Pipeline.open(settings).db.record_model(record)
    return {"model_version": record.version, "promoted": after == record.version and after != before,
            "previous": before, "metrics": quality._jsonable(result.metrics),
            "incumbent": quality._jsonable(result.incumbent), "threshold": record.threshold,
            "backbone": record.backbone, "dim": record.dim}
