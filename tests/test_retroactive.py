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


# -- the operators' controls apply to retroactive pairs as to daily ones ---------------------------
#
# Near-duplicate copies (a light brightness change) so that every held-back reference would be
# flagged retroactively without its control: the control is then the only reason a pair is missing.

CTL_DAY = (TODAY - timedelta(days=3)).isoformat()
CTL_BATCH = f"queries/{CTL_DAY}/"
CTL_LATER = f"queries/{(TODAY - timedelta(days=1)).isoformat()}/"  # matched after the index caught up
# role -> reference id; all held back from the first index, all copied on CTL_DAY
HELD = {"rejected": "R0100", "disabled": "R0101", "bank_off": "R0102", "suppress": "R0103",
        "strict": "R0104", "plain": "R0105"}
PARTNER_KEY = "references/partner/"  # bank "partner" (its folder)


def _near_copy(img) -> bytes:
    from PIL import ImageEnhance

    return h._jpeg(ImageEnhance.Brightness(img).enhance(1.08))


@pytest.fixture(scope="module")
def controlled(s3_server, tmp_path_factory):
    """A world of its own (database and bucket) where one retroactive pass meets every kind of control.

    Night 1 indexes the references without HELD; CTL_DAY, holding a near copy of each HELD
    reference, is matched against it. Night 2 indexes HELD too, but its retroactive pass does not
    run (a missed night). During the day: CTL_LATER holds the bytes of the copy of HELD["rejected"]
    under another name, is matched against night 2's index and a moderator rejects that pair.
    The operator disables HELD["disabled"] (before night 2's build: the build holds it out) and the
    bank "partner" of HELD["bank_off"] (after the build), gives HELD["suppress"] the suppress policy
    and HELD["strict"] a bar no pair reaches. Then the retroactive pass catches CTL_DAY up.
    """
    import random

    from conftest import create_pg_database, drop_pg_database

    from moderation import orchestration as orch
    from moderation import reference_controls as rc
    from moderation import review
    from moderation.config import Settings
    from moderation.store import open_store

    url = create_pg_database("retro_ctl")
    env = {**s3_env(s3_server, f"retro-ctl-{uuid.uuid4().hex[:8]}"), "MODERATION_DATABASE_URL": url,
           "MODERATION_HOME": str(tmp_path_factory.mktemp("home")), "MODERATION_IMAGE_SIZE": "96",
           "MODERATION_WORKERS": "0", "MODERATION_PROGRESS": "false", "MODERATION_DEVICE": "cpu",
           "MODERATION_VERIFY_WORKERS": "0", "MODERATION_BATCH_SIZE": "16"}
    settings = Settings.from_env(env)
    rng = random.Random(11)
    images = {f"R{i:04d}": h._shape_image(rng) for i in list(range(6)) + list(range(100, 106))}
    keys = {rid: f"{PARTNER_KEY if rid in ('R0005', HELD['bank_off']) else 'references/'}{rid}.jpg"
            for rid in images}
    copies = {f"Q{j:03d}": rid for j, rid in enumerate(HELD.values())}
    store = open_store(settings)
    h.upload(store, {f"background/B{i:04d}.jpg": h._jpeg(h._shape_image(rng)) for i in range(16)})
    h.upload(store, {keys[rid]: h._jpeg(img) for rid, img in images.items() if rid not in HELD.values()})
    day = {f"{CTL_BATCH}{qid}.jpg": _near_copy(images[rid]) for qid, rid in copies.items()}
    day[f"{CTL_BATCH}Q900.jpg"] = h._jpeg(h._shape_image(rng))  # a distractor
    h.upload(store, day)
    p = orch.open_pipeline(settings)
    try:
        orch.fit_background_stats(settings, orch.sample_background(settings))
        orch.build_index_version(settings, orch.plan_reference_index(settings))
        model = orch.embed_query_batch(settings, CTL_BATCH)["model_version"]
        orch.match_batch(settings, CTL_BATCH, model)
        assert not {x.reference_id for x in p.db.pairs(p.db.run(CTL_BATCH).id)} & set(HELD.values())

        rc.set_reference_enabled(p.db, HELD["disabled"], False, "takedown request", by="ops")
        h.upload(store, {keys[rid]: h._jpeg(images[rid]) for rid in HELD.values()})
        built = orch.build_index_version(settings, orch.plan_reference_index(settings))
        assert built["changed"]
        rejected_q = next(q for q, r in copies.items() if r == HELD["rejected"])
        store.put(f"{CTL_LATER}renamed-{rejected_q}.jpg", day[f"{CTL_BATCH}{rejected_q}.jpg"], "image/jpeg")
        orch.embed_query_batch(settings, CTL_LATER)
        orch.match_batch(settings, CTL_LATER, model)
        [pair] = [x for x in p.db.pairs(p.db.run(CTL_LATER).id) if x.reference_id == HELD["rejected"]]
        review.claim_pair(p.db, "mo", pair.id)
        review.decide(p.db, pair.id, "mo", "rejected", note="same layout, different picture")

        rc.set_bank_enabled(p.db, "partner", False, "licence expired", by="ops")
        rc.set_reference_policy(p.db, HELD["suppress"], rc.Policy.SUPPRESS, "a meme frame", by="ops")
        rc.set_reference_policy(p.db, HELD["strict"], rc.Policy.STRICT, "a template", min_inliers=100_000,
                                by="ops")
        result = orch.retro_match_new_references(settings, built)
        yield {"p": p, "result": result, "built": built, "copies": copies, "settings": settings}
    finally:
        p.db.engine.dispose()
        drop_pg_database(url)


def _retro_rows(p, batch):
    with p.db.session() as s:
        return s.execute(text(
            "select fp.query_id, fp.reference_id, fp.bank, fp.query_sha256 from flagged_pairs fp "
            "join match_runs r on r.id = fp.run_id where r.retro_of = :b order by fp.id"), {"b": batch}).all()


def _retro_suppressed(w) -> dict[tuple[str, str], tuple[str, str]]:
    import csv
    import io

    from moderation.retroactive import suppressed_key

    data = w["p"].store.get(suppressed_key(CTL_BATCH, w["built"]["index_version"])).decode()
    return {(r["query_id"], r["reference_id"]): (r["reason"], r["bank"]) for r in csv.DictReader(io.StringIO(data))}


def test_retro_pairs_carry_bank_and_query_sha_like_daily_pairs(controlled):
    p, copies = controlled["p"], controlled["copies"]
    plain_q = next(q for q, r in copies.items() if r == HELD["plain"])
    rows = {(q, r): (bank, sha) for q, r, bank, sha in _retro_rows(p, CTL_BATCH)}
    assert (plain_q, HELD["plain"]) in rows, rows  # the control case: the pass found a copy it may flag
    daily_sha = {x.query_id: x.query_sha256 for x in p.db.pairs(p.db.run(CTL_BATCH).id)}
    listed = {q: sha for q, _, sha in json.loads(p.store.get(f"{_folder(CTL_BATCH)}/queries.json"))["queries"]}
    bank, sha = rows[(plain_q, HELD["plain"])]
    assert bank == "default" and sha == listed[plain_q] and len(sha) == 64
    assert all(q not in daily_sha or daily_sha[q] == listed[q] for q in listed)


def test_retro_does_not_flag_again_a_pair_a_moderator_rejected(controlled):
    p, copies = controlled["p"], controlled["copies"]
    rejected_q = next(q for q, r in copies.items() if r == HELD["rejected"])
    assert (rejected_q, HELD["rejected"]) not in {(q, r) for q, r, *_ in _retro_rows(p, CTL_BATCH)}
    assert _retro_suppressed(controlled)[(rejected_q, HELD["rejected"])] == ("rejected_before", "default")


def test_retro_searches_no_disabled_reference_or_bank(controlled):
    p, result = controlled["p"], controlled["result"]
    off = {HELD["disabled"], HELD["bank_off"]}
    assert not off & {r for _, r, *_ in _retro_rows(p, CTL_BATCH)}
    assert not off & {r for _, r in _retro_suppressed(controlled)}  # not even as suppressed candidates
    candidates = p.store.get(f"{_folder(f'retro/{CTL_BATCH}')}/{controlled['built']['index_version']}.csv")
    assert not any(rid in candidates.decode() for rid in off)
    [outcome] = [b for b in result["per_batch"] if b["batch"] == CTL_BATCH]
    assert outcome["disabled_references"] == 2
    assert outcome["new_references"] == len(HELD) - 2


def test_retro_lists_policy_suppressed_pairs_with_their_reason(controlled):
    p, copies, result = controlled["p"], controlled["copies"], controlled["result"]
    q_of = {r: q for q, r in copies.items()}
    flagged = {(q, r) for q, r, *_ in _retro_rows(p, CTL_BATCH)}
    suppressed = _retro_suppressed(controlled)
    for role, reason in (("suppress", "reference_suppressed"), ("strict", "strict_reference")):
        pair = (q_of[HELD[role]], HELD[role])
        assert pair not in flagged
        assert suppressed[pair] == (reason, "default")
    assert result["suppressed"] == len(suppressed) == 3  # with the rejected pair


def _folder(batch: str) -> str:
    from moderation.jobs import run_folder_of

    return run_folder_of(batch)
