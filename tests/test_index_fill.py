"""A full index build filled by shards (issue 12 item 4), on Postgres and an S3 server on loopback.

The nightly DAG's steps as plain functions (``prepare_index_build``, one
``fill_index_shard`` per range, ``publish_index_build``) publish the index
a single process builds: same ids in the same order, same search results,
same files beside it; an incremental night fills nothing; a missing or stale
fill shard publishes nothing, and ``gc`` sweeps the staging it left only once
the grace period has passed.
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from conftest import fast_env, s3_env
from local_images import textured
from test_nightly_index import jpeg

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


def _next_second():
    # Version ids are stamped to the second: two builds of one content in a second would share one.
    time.sleep(1.05 - (time.time() % 1))


def _staging(p) -> set[str]:
    return set(p.store.list("staging/"))


@pytest.mark.parametrize("factory", ["Flat", "IVF2,Flat"])
def test_sharded_full_build_publishes_what_one_process_builds(pipeline, factory):
    from moderation import orchestration
    from moderation.registry import Kind

    settings = replace(pipeline.settings, index_factory=factory)
    p = Pipeline(settings, pipeline.store, pipeline.db)
    _next_second()
    single = build_reference_index(p, StoreSource(settings, "references/"), full=True)
    assert single.info["build"] == "full" and single.factory == factory and single.count == N_REFS
    _next_second()
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
    _next_second()
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
