"""The object store or the database going away during a matching run, and coming back.

Real servers: moto's S3 server (through the project's S3Store / minio
client) and the local Postgres. Each is reached through a TCP proxy the
test stops and starts: to the pipeline that is exactly a server going down
(connections reset, then refused) and coming back with its data, which a
restarted moto (memory only) could not offer.

Expected: the run fails with a message that says which service is
unreachable, the run row says ``failed`` where the database can still be
written, and the same batch run again once the service is back completes
with exactly the pairs of a clean run, no duplicates.
"""

from __future__ import annotations

import pytest
from review_support import (InterruptingSource, MotoServer, TcpProxy, fresh_pg_database, local_pipeline,
                            pipeline_env, pipeline_template, settings_from, upload_template, url_for,
                            torch_single_thread)  # noqa: F401 (autouse)
from sqlalchemy import text
from sqlalchemy.engine import make_url

from fault_ledger import lost_and_duplicated, record
from moderation.db import Database
from moderation.errors import ConfigError, ModerationError, StoreError

BATCH = "2024-06-02"


def _lost_and_duplicated(p, db: Database, summary) -> tuple[int, int]:
    """Against the run's own candidates file: pairs at or above its threshold missing, or stored twice."""
    import csv
    import io

    threshold = db.run(BATCH).threshold
    rows = csv.DictReader(io.StringIO(p.store.get(summary.candidates_key).decode()))
    expected = [(c["query_id"], c["reference_id"]) for c in rows if float(c["score"]) >= threshold]
    return lost_and_duplicated(expected, [(q, r) for q, r, *_ in _pairs(db)])


def _pairs(db: Database) -> list[tuple]:
    with db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT query_id, reference_id, round(score::numeric, 5), evidence_key IS NOT NULL "
            "FROM flagged_pairs ORDER BY 1, 2"))]


@pytest.fixture(scope="module")
def s3():
    server = MotoServer()
    proxy = TcpProxy("127.0.0.1", server.port)
    try:
        yield server, proxy
    finally:
        proxy.stop()
        server.stop()


def test_object_store_down_then_back(s3, tmp_path, monkeypatch):
    from moderation.embedding import FolderSource
    from moderation.jobs import Pipeline, run_matching
    from moderation.store import S3Store

    _, proxy = s3
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(k, v)
    samples, _ = pipeline_template()
    with fresh_pg_database() as url:
        env = pipeline_env(tmp_path / "home", url, store_url="s3://review-faults",
                           MODERATION_S3_ENDPOINT=f"127.0.0.1:{proxy.port}", MODERATION_S3_ACCESS_KEY="testing",
                           MODERATION_S3_SECRET_KEY="testing", MODERATION_THRESHOLD="0.2")
        upload_template(S3Store(f"127.0.0.1:{proxy.port}", "review-faults", "testing", "testing"))
        db = Database(url)
        try:
            # Down before the run starts: opening the store says so.
            proxy.stop()
            with pytest.raises(StoreError, match=f"cannot reach the object store at 127.0.0.1:{proxy.port}"):
                Pipeline.open(settings_from(env))
            proxy.start()
            p = Pipeline.open(settings_from(env))
            # Down in the middle: the fifth query image read stops the server's proxy.
            with pytest.raises(StoreError, match="cannot reach the object store") as info:
                run_matching(p, InterruptingSource(samples.queries, 5, proxy.stop), BATCH)
            assert "MODERATION_S3_ENDPOINT" in str(info.value)
            run = db.run(BATCH)
            assert run.status == "failed" and "object store" in run.failures["error"]
            assert _pairs(db) == []
            # Back: the same batch runs clean.
            proxy.start()
            summary = run_matching(p, FolderSource(samples.queries), BATCH)
            pairs = _pairs(db)
            lost, dup = _lost_and_duplicated(p, db, summary)
            record("service down", "object store down before a run, and in the middle of one; then rerun",
                   tried=2, survived=2 * (db.run(BATCH).status == "complete"), lost=lost, duplicated=dup)
            assert db.run(BATCH).status == "complete" and len(pairs) == summary.n_flagged > 0
            assert all(has_evidence for *_, has_evidence in pairs)
            for row in db.pairs():
                assert p.store.exists(row.evidence_key) and p.store.exists(row.heatmap_key)
            # What `moderation review show ID --urls` prints: presigned URLs that open the images.
            from urllib.request import urlopen

            from moderation import review

            links = review.evidence_links(p.store, review.pair_details(db, db.pairs()[0].id))
            assert set(links) == {"evidence_url", "heatmap_url"}
            for link in links.values():
                assert "X-Amz-Signature=" in link
                with urlopen(link, timeout=10) as resp:
                    assert resp.read(2) == b"\xff\xd8"  # a JPEG
            run_matching(p, FolderSource(samples.queries), BATCH)
            assert _pairs(db) == pairs  # and again: nothing duplicated
            p.db.engine.dispose()
        finally:
            if not proxy.running:
                proxy.start()
            db.engine.dispose()


@pytest.fixture
def pg_behind_proxy(tmp_path):
    with fresh_pg_database() as url:
        u = make_url(url)
        proxy = TcpProxy(u.host or "127.0.0.1", u.port or 5432)
        try:
            yield url, url_for(u.database, port=proxy.port), proxy
        finally:
            proxy.stop()


def test_database_down_then_back(pg_behind_proxy, tmp_path):
    from moderation.embedding import FolderSource
    from moderation.jobs import Pipeline, run_matching

    direct_url, proxied_url, proxy = pg_behind_proxy
    env, samples = local_pipeline(tmp_path / "home", proxied_url, MODERATION_THRESHOLD="0.2")
    direct = Database(direct_url)
    try:
        proxy.stop()
        with pytest.raises(ConfigError, match="cannot connect to the review database"):
            Pipeline.open(settings_from(env))
        proxy.start()
        p = Pipeline.open(settings_from(env))
        with pytest.raises(Exception) as info:
            run_matching(p, InterruptingSource(samples.queries, 5, proxy.stop), BATCH)
        assert "connection" in str(info.value).lower()
        assert _pairs(direct) == []  # nothing of the failed attempt was written
        assert direct.run(BATCH).status in ("running", "failed")
        proxy.start()
        summary = run_matching(p, FolderSource(samples.queries), BATCH)
        pairs = _pairs(direct)
        lost, dup = _lost_and_duplicated(p, direct, summary)
        record("service down", "review database down before a run, and in the middle of one; then rerun",
               tried=2, survived=2 * (direct.run(BATCH).status == "complete"), lost=lost, duplicated=dup)
        assert direct.run(BATCH).status == "complete" and len(pairs) == summary.n_flagged > 0
        p.db.engine.dispose()
    finally:
        direct.engine.dispose()


def test_database_lost_mid_run_is_a_clear_moderation_error(pg_behind_proxy, tmp_path):
    from moderation.jobs import Pipeline, run_matching

    _, proxied_url, proxy = pg_behind_proxy
    env, samples = local_pipeline(tmp_path / "home", proxied_url, MODERATION_THRESHOLD="0.2")
    p = Pipeline.open(settings_from(env))
    try:
        try:
            run_matching(p, InterruptingSource(samples.queries, 5, proxy.stop), BATCH)
            outcome = None
        except Exception as exc:  # noqa: BLE001 - measured, then asserted below
            outcome = exc
        record("service down", "review database lost mid-run: a clear error naming it",
               tried=1, survived=int(isinstance(outcome, ModerationError) and "review database" in str(outcome)))
        assert isinstance(outcome, ModerationError) and "review database" in str(outcome), outcome
    finally:
        proxy.start()
        p.db.engine.dispose()
