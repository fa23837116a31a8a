"""A full index build filled by shards (issue 12 item 4), on Postgres and an S3 server on loopback.

The nightly DAG's steps as plain functions (``prepare_index_build``, one
``fill_index_shard`` per range, ``publish_index_build``) publish the index
a single process builds: same ids in the same order, same search results,
same files beside it; an incremental night fills nothing; a missing or stale
fill shard publishes nothing, and ``gc`` sweeps the staging it left only once
the grace period has passed.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from conftest import fast_env, s3_env
from local_images import textured
from store_wrappers import PassThrough
from test_nightly_index import corrupt_jpeg, jpeg

from moderation.config import Settings
from moderation.db import connect
from moderation.embedding import FolderSource, StoreSource
from moderation.jobs import Pipeline, build_reference_index, refresh_stats
from moderation.store import open_store

N_REFS = 12


@pytest.fixture(scope="module")
def pipeline(pg_url, s3_server, tmp_path_factory):
    settings = Settings.from_env({**fast_env(tmp_path_factory.mktemp("fill-home")), **s3_env(s3_server, "index-fill"),
                                  "MODERATION_DATABASE_URL": pg_url, "MODERATION_VERIFY": "false"})
    background = tmp_path_factory.mktemp("fill-background")
    for i in range(12):
        textured(9100 + i, shapes=40 + i).save(background / f"B{i}.jpg", quality=92)
    store = open_store(settings)
    p = Pipeline(settings, store, connect(settings.database_url))
    refresh_stats(p, FolderSource(background))
    # Two nights, the odd references on the second: their vectors lie in two cache parts, interleaved by name.
    for night in (0, 1):
        for i in range(night, N_REFS, 2):
            store.put(f"references/R{i:02d}.jpg", jpeg(9000 + i))
        build_reference_index(p, StoreSource(settings, "references/"))
    yield p
    p.db.engine.dispose()


def _plan(p, **extra) -> dict:
    model = p.current_model()
    return {"model_version": model.version, "stats_version": p.current_stats(model).version,
            "prefix": "references/", "full": False, **extra}


def _sharded(settings, plan, run_id, size, only=None) -> list[dict]:
    from moderation import orchestration

    specs = orchestration.prepare_index_build(settings, plan, None, run_id=run_id, fill_shard_size=size)
    for spec in specs:
        if only is None or spec["index"] in only:
            orchestration.fill_index_shard(settings, spec)
    return specs


def _staging(p) -> set[str]:
    return set(p.store.list("staging/"))


@pytest.mark.parametrize("factory", ["Flat", "IVF2,Flat"])
def test_sharded_full_build_publishes_what_one_process_builds(pipeline, factory):
    from moderation import orchestration
    from moderation.registry import Kind

    settings = replace(pipeline.settings, index_factory=factory)
    p = Pipeline(settings, pipeline.store, pipeline.db)
    single = build_reference_index(p, StoreSource(settings, "references/"), full=True)
    assert single.info["build"] == "full" and single.factory == factory and single.count == N_REFS
    plan = _plan(p, full=True)
    specs = _sharded(settings, plan, "manual__full", 5)
    assert [s["index"] for s in specs] == [0, 1, 2] and {s["count"] for s in specs} == {3}
    assert _staging(p)  # the template, the preparation and three shards
    built = orchestration.publish_index_build(settings, plan, run_id="manual__full")
    assert built["changed"] and built["build"] == "full" and built["previous"] == single.version
    sharded = p.registry.current(Kind.INDEX, model_version=plan["model_version"])
    assert sharded.version == built["index_version"] != single.version
    assert (sharded.content_sha256, sharded.count, sharded.factory) == (single.content_sha256, N_REFS, factory)
    assert _staging(p) == set()

    a, _ = p.load_index(single)
    b, _ = p.load_index(sharded)
    assert b.ids == a.ids and sorted(a.ids) == [f"R{i:02d}" for i in range(N_REFS)]
    # The vectors come from two cache parts, filled part by part: not the listing's order.
    from moderation.vector_cache import Namespace, VectorCache

    where = VectorCache(p.store, plan["model_version"], Namespace.REFERENCES).positions()
    assert len({where[sha][0] for sha in p.index_shas(single).values()}) == 2 and a.ids != sorted(a.ids)
    rng = np.random.default_rng(1)
    queries = np.concatenate([a.index.reconstruct_n(0, len(a)),
                              rng.standard_normal((10, a.dim)).astype(np.float32)])
    sa, ia = a.search(queries, 5)
    sb, ib = b.search(queries, 5)
    assert ib == ia
    # Equal up to float rounding: whitening a chunk of 3 rows and one of 6 may differ in the last bit.
    np.testing.assert_allclose(sb, sa, rtol=0, atol=1e-5)
    for name in ("locations.json", "shas.json", "banks.json", "held_out.json", "references.json"):
        assert p.registry.load(Kind.INDEX, sharded, name) == p.registry.load(Kind.INDEX, single, name), name


def test_incremental_night_maps_no_fill_shards(pipeline):
    from moderation import orchestration

    p = pipeline
    build_reference_index(p, StoreSource(p.settings, "references/"))
    p.store.put("references/R_new.jpg", jpeg(9500))
    plan = _plan(p)
    assert orchestration.prepare_index_build(p.settings, plan, None, run_id="scheduled__inc",
                                             fill_shard_size=2) == []
    built = orchestration.publish_index_build(p.settings, plan, run_id="scheduled__inc")
    assert built["changed"] and built["build"] == "incremental" and built["count"] == N_REFS + 1
    assert _staging(p) == set()
    # Nothing changed: nothing to fill, nothing published.
    assert orchestration.prepare_index_build(p.settings, plan, None, run_id="scheduled__same") == []
    again = orchestration.publish_index_build(p.settings, plan, run_id="scheduled__same")
    assert again["index_version"] == built["index_version"] and not again["changed"]
    p.store.delete("references/R_new.jpg")


def test_a_failed_fill_shard_publishes_nothing_and_gc_sweeps_its_staging_later(pipeline):
    from moderation import orchestration
    from moderation.errors import ModerationError
    from moderation.gc import collect_garbage
    from moderation.registry import Kind

    p = pipeline
    plan = _plan(p, full=True)
    before = p.registry.current(Kind.INDEX, model_version=plan["model_version"])
    specs = _sharded(p.settings, plan, "manual__broken", 4, only={0, 2})  # shard 1's task failed
    assert len(specs) == 3
    with pytest.raises(ModerationError, match="fill shard 1 of this run is missing"):
        orchestration.publish_index_build(p.settings, plan, run_id="manual__broken")
    assert p.registry.current(Kind.INDEX, model_version=plan["model_version"]) == before
    left = _staging(p)
    assert left and all("/manual__broken-" in k for k in left)

    # Prepared again (other ranges) while an old fill task still runs: its shard is refused, not merged.
    orchestration.prepare_index_build(p.settings, plan, None, run_id="manual__broken", fill_shard_size=6)
    with pytest.raises(ModerationError, match="prepared again"):
        orchestration.fill_index_shard(p.settings, specs[1])
    with pytest.raises(ModerationError, match="filled for another preparation"):
        orchestration.publish_index_build(p.settings, plan, run_id="manual__broken")
    assert p.registry.current(Kind.INDEX, model_version=plan["model_version"]) == before

    # A running build's staging is young: gc leaves it; past the grace period it goes.
    assert not [r for r in collect_garbage(p).removals if r.key.startswith("staging/")]
    left = _staging(p)
    later = collect_garbage(p, now=datetime.now(timezone.utc) + timedelta(hours=25))
    assert {r.key for r in later.removals if r.reason == "staging of an index build that never published"} == left
    assert _staging(p) == set()
    assert p.registry.current(Kind.INDEX, model_version=plan["model_version"]) == before


def test_a_retried_publish_after_publishing_only_cleans_up(pipeline):
    from moderation import orchestration
    from moderation.index_fill import FillStaging
    from moderation.registry import Kind

    p = pipeline
    plan = _plan(p, full=True)
    _sharded(p.settings, plan, "manual__retry", 5)
    staging = FillStaging(p.store, plan["model_version"], orchestration.run_slug("manual__retry"))
    prepared = staging.prepared()
    built = orchestration.publish_index_build(p.settings, plan, run_id="manual__retry")
    # The first attempt died while deleting its staging: the preparation (deleted last) is still there.
    staging.put_prepared(prepared)
    again = orchestration.publish_index_build(p.settings, plan, run_id="manual__retry")
    assert again["index_version"] == built["index_version"] and again["changed"]
    assert p.registry.current(Kind.INDEX, model_version=plan["model_version"]).version == built["index_version"]
    assert _staging(p) == set()


class FaissTransfers(PassThrough):
    """The real store, recording how each FAISS file under staging/ moves: whole in memory or as a file."""

    def __init__(self, inner):
        super().__init__(inner)
        self.moves: list[str] = []

    def _note(self, key, how):
        if key.startswith("staging/") and key.endswith(".faiss"):
            self.moves.append(how)

    def get(self, key):
        self._note(key, "get whole")
        return self.inner.get(key)

    def put(self, key, data, content_type="application/octet-stream"):
        self._note(key, "put whole")
        self.inner.put(key, data, content_type)

    def get_file(self, key, path):
        self._note(key, "get file")
        self.inner.get_file(key, path)

    def put_file(self, key, path, content_type="application/octet-stream"):
        self._note(key, "put file")
        self.inner.put_file(key, path, content_type)


def test_staged_template_and_shards_move_through_files(pipeline):
    from moderation.index_fill import FillStaging

    p = pipeline
    watched = FaissTransfers(p.store)
    staging = FillStaging(watched, "mv-files", "manual__files")
    template, _ = p.load_index(p.current_index(p.current_model()))
    sha = staging.put_template(template)
    staging.put_shard(0, template, "b1")
    assert staging.template().ids == template.ids and staging.shard(0, "b1", template.ids).ids == template.ids
    assert watched.moves == ["put file", "put file", "get file", "get file"] and len(sha) == 64
    assert staging.clear() == 5


def test_a_sharded_full_build_carries_the_failed_references_as_one_process_does(pipeline):
    """A reference that failed for a lasting reason stays recorded, unread, through prepare -> fill -> publish."""
    from moderation import orchestration
    from moderation.reference_changes import MANIFEST_FILE, read_manifest
    from moderation.registry import Kind

    p = pipeline
    source = StoreSource(p.settings, "references/")
    p.store.put("references/R_bad.jpg", corrupt_jpeg())
    first = build_reference_index(p, source)
    assert first.info["failures"]["count"] == 1 and first.info["failures"]["not_read"] == 0
    # A factory change makes tonight's build a full one, though not a forced one: the failure is carried.
    settings = replace(p.settings, index_factory="IVF2,Flat")
    plan = _plan(p)
    specs = _sharded(settings, plan, "scheduled__failed", 5)
    assert len(specs) == 3
    built = orchestration.publish_index_build(settings, plan, run_id="scheduled__failed")
    assert built["changed"] and built["build"] == "full"
    sharded = p.registry.current(Kind.INDEX, model_version=plan["model_version"])
    assert sharded.info["failures"]["count"] == 1 and sharded.info["failures"]["not_read"] == 1
    assert sharded.info["read"] == 0 and sharded.info["failures"]["images"][0]["image_id"] == "R_bad"
    failed = read_manifest(p.registry.load(Kind.INDEX, sharded, MANIFEST_FILE)).failed
    assert list(failed) == ["R_bad"] and failed["R_bad"] == read_manifest(
        p.registry.load(Kind.INDEX, first, MANIFEST_FILE)).failed["R_bad"]
    # One process finds the same content (failures included) in force: nothing to publish.
    again = build_reference_index(Pipeline(settings, p.store, p.db), source)
    assert again.version == sharded.version
    p.store.delete("references/R_bad.jpg")
    build_reference_index(p, source)
