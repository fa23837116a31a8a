"""Hostile ids, names and keys: rejected, or stored safely and verbatim.

A real matching run over query files whose names carry SQL metacharacters,
path-traversal spellings, format placeholders, non-ASCII, very long names
and a batch name that tries to climb out of the store. (Review-API inputs:
test_review_queue; evidence keys from any id: test_evidence.)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from review_support import (fresh_pg_database, local_pipeline, settings_from,
                            torch_single_thread)  # noqa: F401 (autouse)

from fault_ledger import record
from moderation import review
from moderation.store import validate_key

HOSTILE_NAMES = [
    "'; DROP TABLE flagged_pairs; --",
    "..\\..\\windows\\system32",
    "..",
    "%s %(x)s {0} $1 :name",
    "ünïcødé 😀 spaces",
    'comma, "quote"',
    "x" * 240,
]
HOSTILE_BATCH = "../../../etc/passwd"


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    from moderation.embedding import FolderSource
    from moderation.jobs import Pipeline, run_matching

    tmp = tmp_path_factory.mktemp("hostile")
    with fresh_pg_database() as url:
        env, samples = local_pipeline(tmp / "home", url, MODERATION_THRESHOLD="-10")  # flag every candidate
        queries = tmp / "queries"
        queries.mkdir()
        sources = sorted(samples.queries.glob("*.jpg"))
        for src, name in zip(sources, HOSTILE_NAMES):
            shutil.copy(src, queries / f"{name}.jpg")
        p = Pipeline.open(settings_from(env))
        summary = run_matching(p, FolderSource(queries), HOSTILE_BATCH)
        yield p, summary, tmp
        p.db.engine.dispose()


def test_hostile_file_names_are_stored_verbatim(hostile_run):
    p, summary, _ = hostile_run
    stored = {row.query_id for row in p.db.pairs(summary.run_id)}
    record("hostile input", "query names with SQL, traversal, placeholders, non-ASCII, 240 chars; batch '../../..'",
           tried=len(HOSTILE_NAMES), survived=len(stored & set(HOSTILE_NAMES)),
           lost=len(set(HOSTILE_NAMES) - stored))
    assert p.db.run(HOSTILE_BATCH).status == "complete"
    assert summary.n_failed == 0
    assert stored == set(HOSTILE_NAMES)
    claimed = {c["query_id"] for c in review.claim(p.db, "mod", 1000)}
    assert claimed == set(HOSTILE_NAMES)
    for row in p.db.pairs(summary.run_id):
        assert review.pair_details(p.db, row.id)["query_id"] == row.query_id


def test_no_key_leaves_the_store(hostile_run):
    p, summary, tmp = hostile_run
    root = Path(p.store.root)
    for row in p.db.pairs(summary.run_id):
        for key in (row.evidence_key, row.heatmap_key):
            assert validate_key(key) == key and key.startswith("runs/")
            assert root in Path(p.store.locate(key)).resolve().parents
    assert summary.candidates_key.startswith("runs/") and ".." not in summary.candidates_key.split("/")
    # Nothing was written next to or above the store.
    assert sorted(x.name for x in root.parent.iterdir()) == sorted(
        x.name for x in root.parent.iterdir() if x.name in ("store", "moderation.db", "cache"))
    assert not (tmp / "etc").exists()


def test_non_utf8_file_name_does_not_fail_the_run(tmp_path):
    from moderation.embedding import FolderSource
    from moderation.jobs import Pipeline, run_matching

    with fresh_pg_database() as url:
        env, samples = local_pipeline(tmp_path / "home", url, MODERATION_THRESHOLD="-10")
        queries = tmp_path / "q"
        queries.mkdir()
        src = sorted(samples.queries.glob("*.jpg"))
        shutil.copy(src[0], queries / "fine.jpg")
        for k, extra in enumerate(src[2:7]):  # enough good images to stay under the failure limit
            shutil.copy(extra, queries / f"ok{k}.jpg")
        with open(os.fsencode(queries) + b"/bad-\xff\xfe.jpg", "wb") as fh:
            fh.write(src[1].read_bytes())
        p = Pipeline.open(settings_from(env))
        try:
            run_matching(p, FolderSource(queries), "non-utf8")
            run = p.db.run("non-utf8")
            assert run.status == "complete" and run.n_failed == 1
            assert [f["reason"] for f in run.failures["images"]] == ["bad_name"]
            assert "fine" in {r.query_id for r in p.db.pairs()}
        finally:
            p.db.engine.dispose()


def test_very_long_object_keys_are_refused_or_stored_whole(tmp_path):
    """Ids are key stems; the store caps a segment at 255 bytes, so an id always fits the database."""
    from moderation.embedding import StoreSource
    from moderation.jobs import Pipeline, run_matching

    with fresh_pg_database() as url:
        env, samples = local_pipeline(tmp_path / "home", url, MODERATION_THRESHOLD="-10")
        p = Pipeline.open(settings_from(env))
        src = sorted(samples.queries.glob("*.jpg"))
        long_id = "y" * 250
        p.store.put(f"incoming/{long_id}.jpg", src[1].read_bytes())
        with pytest.raises(ValueError, match="longer than"):
            p.store.put("incoming/" + "z" * 600 + ".jpg", src[0].read_bytes())
        try:
            run_matching(p, StoreSource(p.settings, "incoming/"), "long-ids")
            assert p.db.run("long-ids").status == "complete"
            assert {r.query_id for r in p.db.pairs()} == {long_id}
        finally:
            p.db.engine.dispose()
