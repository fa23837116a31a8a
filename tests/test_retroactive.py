"""Retroactive matching on Postgres and an S3 server: copies uploaded before their reference was indexed.

Day 1's queries hold copies of references that are not in the index. Those
references are added, the index is rebuilt and retroactive matching runs:
the copies are flagged, in the batch's retroactive run; a rerun adds
nothing; a later night searches only the references added since.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

import airflow_harness as h
from conftest import s3_env

TODAY = datetime.now(timezone.utc).date()
DAY = (TODAY - timedelta(days=2)).isoformat()
OLD_DAY = (TODAY - timedelta(days=40)).isoformat()  # outside the default 30-day window
BATCH = f"queries/{DAY}/"


@pytest.fixture(scope="module")
def world(pg_url, s3_server, tmp_path_factory):
    """Statistics, an index without the held-back references, and day 1 matched against it."""
    from moderation import orchestration as orch
    from moderation.config import Settings
    from moderation.store import open_store

    env = {**s3_env(s3_server, f"retro-{uuid.uuid4().hex[:8]}"), "MODERATION_DATABASE_URL": pg_url,
           "MODERATION_HOME": str(tmp_path_factory.mktemp("home")), "MODERATION_IMAGE_SIZE": "96",
           "MODERATION_WORKERS": "0", "MODERATION_PROGRESS": "false", "MODERATION_DEVICE": "cpu",
           "MODERATION_VERIFY_WORKERS": "0", "MODERATION_BATCH_SIZE": "16"}
    settings = Settings.from_env(env)
    data = h.make_dataset([DAY, OLD_DAY], n_refs=12, n_background=16, copies_per_day=6, distractors_per_day=3)
    copied = sorted({data.truth[k.rsplit("/", 1)[-1][:-4]] for k in data.queries[DAY]
                     if k.rsplit("/", 1)[-1][:-4] in data.truth})
    held_back = copied[:3]
    store = open_store(settings)
    h.upload(store, data.background)
    h.upload(store, {k: v for k, v in data.references.items() if _rid(k) not in held_back})
    for day in (DAY, OLD_DAY):
        h.upload(store, data.queries[day])
    sample = orch.sample_background(settings)
    orch.fit_background_stats(settings, sample)
    plan = orch.plan_reference_index(settings)
    first = orch.build_index_version(settings, plan)
    for day in (DAY, OLD_DAY):
        embedded = orch.embed_query_batch(settings, f"queries/{day}/")
        orch.match_batch(settings, f"queries/{day}/", embedded["model_version"])
    return {"settings": settings, "data": data, "held_back": held_back, "first": first, "store": store}


def _rid(key: str) -> str:
    return key.rsplit("/", 1)[-1][:-4]


def _retro_pairs(p, batch=BATCH):
    with p.db.session() as s:
        return s.execute(text(
            "select fp.query_id, fp.reference_id, r.batch, r.retro_of, fp.index_version from flagged_pairs fp "
            "join match_runs r on r.id = fp.run_id where r.retro_of = :b order by fp.id"), {"b": batch}).all()


def test_new_references_are_found_in_past_batches(world):
    from moderation import orchestration as orch

    settings, data, held_back = world["settings"], world["data"], world["held_back"]
    p = orch.open_pipeline(settings)
    daily = p.db.run(BATCH)
    assert daily.status == "complete"
    assert not {x.reference_id for x in p.db.pairs(daily.id)} & set(held_back)
    from moderation.jobs import run_folder_of

    assert p.store.exists(f"{run_folder_of(BATCH)}/queries.json")  # the batch's query list, for later nights

    # tonight: the held-back references arrive and the index is rebuilt
    h.upload(world["store"], {k: v for k, v in data.references.items() if _rid(k) in held_back})
    built = orch.build_index_version(settings, orch.plan_reference_index(settings))
    assert built["changed"] and built["count"] == len(data.references)
    result = orch.retro_match_new_references(settings, built)

    assert result["references_searched"] == len(held_back)  # only the new ones, not the 9 already indexed
    per_batch = {b["batch"]: b for b in result["per_batch"]}
    assert set(per_batch) == {BATCH}, "the batch 40 days old is outside the 30-day window"
    assert per_batch[BATCH]["queries"] == len(data.queries[DAY])
    assert result["skipped"] == {}
    pairs = _retro_pairs(p)
    truth = {(q, r) for q, r in data.truth.items() if r in held_back and q.startswith("Q00")}
    found = {(q, r) for q, r, *_ in pairs}
    assert {r for _, r in found} <= set(held_back)  # retroactive pairs are with new references only
    assert len(found & truth) >= 2, (found, truth)
    assert result["added"] == len(pairs) > 0
    assert {(b, of, iv) for _, _, b, of, iv in pairs} == {(f"retro/{BATCH}", BATCH, built["index_version"])}
    with p.db.session() as s:  # in the review queue like any flagged pair
        queued = s.execute(text("select count(*) from review_queue q join flagged_pairs fp on fp.id = q.pair_id "
                                "join match_runs r on r.id = fp.run_id where r.retro_of = :b"),
                           {"b": BATCH}).scalar()
    assert queued == len(pairs)
    assert p.db.run(BATCH).n_flagged == daily.n_flagged  # the daily run is untouched

    # the same night again: nothing new to search, nothing added, no duplicates
    again = orch.retro_match_new_references(settings, built)
    assert (again["references_searched"], again["added"]) == (0, 0)
    assert _retro_pairs(p) == pairs

    # a later night with one more reference: only that one is searched
    world["store"].put("references/R9999.jpg", data.background["background/B0000.jpg"], "image/jpeg")
    later = orch.build_index_version(settings, orch.plan_reference_index(settings))
    assert later["changed"]
    third = orch.retro_match_new_references(settings, later)
    assert third["references_searched"] == 1
    assert _retro_pairs(p)[:len(pairs)] == pairs  # earlier finds stay
    with p.db.session() as s:
        dupes = s.execute(text("select count(*) from (select 1 from flagged_pairs group by run_id, query_id, "
                               "reference_id having count(*) > 1) d")).scalar()
        retro_runs = s.execute(text("select count(*) from match_runs where retro_of is not null")).scalar()
    assert (dupes, retro_runs) == (0, 1)
    # the spike history of the quality gate counts days, never retroactive runs
    assert all(not b.startswith("retro/") for b, _ in p.db.flagged_counts_by_day(60))


def test_batches_without_cached_vectors_are_skipped_and_retried(world):
    """A batch whose query vectors are not cached (another model, retention) is skipped, then caught up."""
    from moderation import orchestration as orch
    from moderation.jobs import run_folder_of

    settings, store = world["settings"], world["store"]
    p = orch.open_pipeline(settings)
    key = f"{run_folder_of(BATCH)}/queries.json"
    listed = store.get(key)
    doc = json.loads(listed)
    doc["queries"].append(["QX", f"{BATCH}QX.jpg", "0" * 64])  # a query whose vector is not cached
    store.put(key, json.dumps(doc).encode(), "application/json")
    store.put("references/R9998.jpg", world["data"].background["background/B0001.jpg"], "image/jpeg")
    built = orch.build_index_version(settings, orch.plan_reference_index(settings))
    before = len(_retro_pairs(p))
    skipped = orch.retro_match_new_references(settings, built)
    assert list(skipped["skipped"]) == [BATCH] and "not cached" in skipped["skipped"][BATCH]
    assert skipped["added"] == 0 and len(_retro_pairs(p)) == before
    # its baseline did not move: once the vectors are there, the skipped reference is searched
    store.put(key, listed, "application/json")
    caught_up = orch.retro_match_new_references(settings, built)
    assert caught_up["skipped"] == {} and caught_up["references_searched"] == 1
    assert orch.retro_match_new_references(settings, built)["references_searched"] == 0


def test_cli_retro_match_window(world, monkeypatch, capsys):
    from moderation.cli import main

    settings = world["settings"]
    env = {"MODERATION_DATABASE_URL": settings.database_url, "MODERATION_STORE_URL": settings.store_url,
           "MODERATION_S3_ENDPOINT": settings.s3_endpoint, "MODERATION_S3_ACCESS_KEY": "testing",
           "MODERATION_S3_SECRET_KEY": "testing", "MODERATION_S3_REGION": "us-east-1",
           "MODERATION_HOME": str(settings.home), "MODERATION_IMAGE_SIZE": "96", "MODERATION_DEVICE": "cpu",
           "MODERATION_WORKERS": "0", "MODERATION_VERIFY_WORKERS": "0"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["--quiet", "retro-match", "--days", "60"]) == 0
    out = json.loads(capsys.readouterr().out)
    # the old batch enters the 60-day window: it was never searched against the references added since
    per_batch = {b["batch"]: b for b in out["per_batch"]}
    assert set(per_batch) == {BATCH, f"queries/{OLD_DAY}/"}
    assert per_batch[BATCH]["new_references"] == 0
    assert per_batch[f"queries/{OLD_DAY}/"]["new_references"] == out["references_searched"] == 5
