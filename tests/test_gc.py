"""Sweeping the object store (hardening items 14 and 15): a real pipeline on S3 (moto) and Postgres.

``collect_garbage`` removes superseded versions, half-written publishes, failed runs' artifacts, orphan
cache objects and expired query vectors, only past the grace period, never what a pointer or a kept
version needs; a dry run lists the same objects with sizes and changes nothing; a rerun removes nothing
more. Time passing is given as ``now``; the objects' own times come from the S3 server.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from review_support import s3_pipeline, torch_single_thread  # noqa: F401 (autouse)

from moderation.embedding import FolderSource
from moderation.gc import collect_garbage
from moderation.images import sha256_hex
from moderation.jobs import run_folder_of, run_matching
from moderation.registry import IndexVersion, Kind, StatsVersion
from moderation.vector_cache import Namespace, VectorCache

LATER = timedelta(hours=25)  # past the default grace period of 24 h


def keys(store, prefix="") -> set[str]:
    return set(store.list(prefix))


def publish_old(p, kind, version, model, created_at, stats="", size=64):
    if kind == Kind.INDEX:
        record = IndexVersion(version, model, stats, 1, 4, "Flat", created_at=created_at)
        files = {"index.faiss": b"i" * size, "ids.json": b'{"ids": ["r"]}'}
    else:
        record = StatsVersion(version, model, "center", 4, 4, 1, created_at=created_at)
        files = {"stats.npz": b"s" * size, "background.npy": b"b" * size}
    return p.registry.publish(kind, record, files, make_current=False)


def failing_queries(tmp_path, samples):
    folder = tmp_path / "bad-day"
    folder.mkdir()
    good = sorted(samples.queries.iterdir())[0]
    (folder / good.name).write_bytes(good.read_bytes())
    (folder / "junk1.jpg").write_bytes(b"not an image")
    (folder / "junk2.png").write_bytes(b"")
    return folder


def test_gc_removes_only_what_nothing_needs(tmp_path, s3_server, s3_bucket):
    with s3_pipeline(tmp_path / "home", s3_server, s3_bucket, MODERATION_KEEP_VERSIONS="2") as (p, _, samples):
        model = p.current_model().version
        current_index = p.registry.current(Kind.INDEX, model_version=model)
        current_stats = p.registry.current(Kind.STATS, model_version=model)
        # superseded versions: Ia is beyond the two kept; Ib is kept, so Sb (which it was built with) stays;
        # Sa is among the two newest statistics; Sc is neither
        for v, created in (("Sa", "2021"), ("Sb", "2019"), ("Sc", "2018")):
            publish_old(p, Kind.STATS, f"{created}0101T000000-{v.lower()}", model, f"{created}-01-01T00:00:00+00:00")
        publish_old(p, Kind.INDEX, "20200101T000000-ia", model, "2020-01-01T00:00:00+00:00",
                    stats="20210101T000000-sa")
        publish_old(p, Kind.INDEX, "20200601T000000-ib", model, "2020-06-01T00:00:00+00:00",
                    stats="20190101T000000-sb")
        # a killed index build and a killed model upload: files, no manifest
        p.store.put(f"indexes/{model}/20991231T000000-killed/index.faiss", b"half" * 100)
        p.store.put("models/half-uploaded/model.pt", b"weights" * 100)
        # a finished run, and a failed one (too many bad images) that left its failures.json behind
        assert run_matching(p, FolderSource(samples.queries), "day-ok").n_flagged > 0
        with pytest.raises(Exception, match="failed to decode"):
            run_matching(p, FolderSource(failing_queries(tmp_path, samples)), "day-bad")
        assert p.db.run("day-bad").status == "failed"
        failed_folder = run_folder_of("day-bad") + "/"
        assert keys(p.store, failed_folder)
        # cache objects no manifest names, and a manifest whose part is gone
        p.store.put(f"embeddings/{model}/references/20000101T000000-0000000000000000.npz", b"orphan part")
        p.store.put(f"embeddings/{model}/queries/20000101T000000-1111111111111111.json", b"{}")
        before = keys(p.store)

        assert collect_garbage(p).removals == []  # everything is younger than the grace period
        later = datetime.now(timezone.utc) + LATER
        dry = collect_garbage(p, dry_run=True, now=later)
        assert keys(p.store) == before
        assert dry.removals and all(r.bytes > 0 for r in dry.removals if "embeddings" not in r.key)
        by_reason: dict[str, set[str]] = {}
        for r in dry.removals:
            by_reason.setdefault(r.reason, set()).add(r.key)
        assert by_reason == {
            "half-written version (no manifest)": {f"indexes/{model}/20991231T000000-killed/index.faiss",
                                                   "models/half-uploaded/model.pt"},
            "superseded indexes version": keys(p.store, f"indexes/{model}/20200101T000000-ia/"),
            "superseded stats version": keys(p.store, f"stats/{model}/20180101T000000-sc/"),
            "artifact of a failed match run": keys(p.store, failed_folder),
            "cache part without a manifest": {f"embeddings/{model}/references/20000101T000000-0000000000000000.npz"},
            "cache manifest without its part": {f"embeddings/{model}/queries/20000101T000000-1111111111111111.json"},
        }
        # a version's manifest goes before its files
        ia = [r.key for r in dry.removals if r.reason == "superseded indexes version"]
        assert ia[0].endswith("/manifest.json")

        done = collect_garbage(p, now=later)
        assert [(r.key, r.reason) for r in done.removals] == [(r.key, r.reason) for r in dry.removals]
        assert keys(p.store) == before - {r.key for r in done.removals}
        assert collect_garbage(p, now=later).removals == []  # idempotent

        # what is in use is untouched and still works
        assert p.registry.current(Kind.INDEX, model_version=model) == current_index
        assert p.registry.current(Kind.STATS, model_version=model) == current_stats
        assert {r.version for r in p.registry.versions(Kind.INDEX, model_version=model)} == {
            current_index.version, "20200601T000000-ib"}
        assert {r.version for r in p.registry.versions(Kind.STATS, model_version=model)} == {
            current_stats.version, "20210101T000000-sa", "20190101T000000-sb"}
        ok_run = p.db.run("day-ok")
        assert p.store.exists(ok_run.candidates_key)
        assert all(p.store.exists(pair.evidence_key) for pair in p.db.pairs(ok_run.id) if pair.evidence_key)
        queries = VectorCache(p.store, model, Namespace.QUERIES).known()
        assert queries and run_matching(p, FolderSource(samples.queries), "day-ok-again").n_flagged > 0

        # query vectors expire after MODERATION_QUERY_VECTOR_RETENTION_DAYS (30); reference vectors stay
        references = VectorCache(p.store, model, Namespace.REFERENCES).known()
        month = collect_garbage(p, now=datetime.now(timezone.utc) + timedelta(days=31))
        assert {r.reason for r in month.removals} == {"query vectors past retention"}
        assert VectorCache(p.store, model, Namespace.QUERIES).known() == frozenset()
        assert VectorCache(p.store, model, Namespace.REFERENCES).known() == references
        assert run_matching(p, FolderSource(samples.queries), "day-after-retention").n_flagged > 0


def test_gc_leaves_a_scope_with_a_broken_pointer_alone(tmp_path, s3_server, s3_bucket):
    with s3_pipeline(tmp_path / "home", s3_server, s3_bucket, MODERATION_KEEP_VERSIONS="0") as (p, _, _s):
        model = p.current_model().version
        publish_old(p, Kind.STATS, "20180101T000000-sc", model, "2018-01-01T00:00:00+00:00")
        publish_old(p, Kind.INDEX, "20200101T000000-ia", model, "2020-01-01T00:00:00+00:00",
                    stats="20180101T000000-sc")
        p.store.put(f"indexes/{model}/CURRENT", b'{"version": ')
        before = keys(p.store)
        report = collect_garbage(p, now=datetime.now(timezone.utc) + LATER)
        assert report.removals == [] and keys(p.store) == before
        assert any(s.startswith(f"indexes/{model}: left alone, its pointer is broken") for s in report.skipped)
        assert "moderation index build" in " ".join(report.skipped)


def test_gc_moves_an_old_layout_cache_into_the_namespaces(tmp_path, s3_server, s3_bucket):
    with s3_pipeline(tmp_path / "home", s3_server, s3_bucket) as (p, _, samples):
        model = p.current_model().version
        for key in keys(p.store, "embeddings/"):
            p.store.delete(key)
        index = p.registry.current(Kind.INDEX, model_version=model)
        reference_shas = sorted(set(p.index_shas(index).values()))
        foreign = sha256_hex(b"a query from before the upgrade")
        shas = [*reference_shas, foreign]
        vectors = np.random.default_rng(0).normal(size=(len(shas), 8)).astype(np.float32)
        import io

        buf = io.BytesIO()
        np.savez(buf, sha256=np.array(shas), vectors=vectors)
        legacy = f"embeddings/{model}/0123456789abcdef.npz"
        p.store.put(legacy, buf.getvalue())

        dry = collect_garbage(p, dry_run=True)
        assert dry.migrated == {"old-layout parts to move": 1} and p.store.exists(legacy)
        report = collect_garbage(p)
        assert report.migrated == {"references": len(reference_shas), "queries": 1}
        assert not p.store.exists(legacy)
        assert VectorCache(p.store, model, Namespace.REFERENCES).known() == set(reference_shas)
        assert VectorCache(p.store, model, Namespace.QUERIES).known() == {foreign}
        cache = VectorCache(p.store, model)
        np.testing.assert_array_equal(cache.get(reference_shas[0]), vectors[0])
        assert collect_garbage(p).migrated == {}


def test_gc_command_dry_run_and_grace_hours(tmp_path, s3_server, s3_bucket, monkeypatch, capsys):
    from moderation import cli

    with s3_pipeline(tmp_path / "home", s3_server, s3_bucket) as (p, env, _s):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        half = "indexes/some-model/20991231T000000-killed/index.faiss"
        p.store.put(half, b"x" * 1234)
        assert cli.main(["--quiet", "gc", "--dry-run"]) == 0  # default grace: 24 h
        assert json.loads(capsys.readouterr().out)["would_delete"] == []
        assert cli.main(["--quiet", "gc", "--dry-run", "--grace-hours", "0"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["dry_run"] is True and p.store.exists(half)
        assert {"key": half, "bytes": 1234, "reason": "half-written version (no manifest)"} in out["would_delete"]
        assert cli.main(["--quiet", "gc", "--grace-hours", "-1"]) == 1
        assert "grace period must be 0 hours or more" in capsys.readouterr().err
        assert cli.main(["--quiet", "gc", "--grace-hours", "0"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["by_reason"]["half-written version (no manifest)"] == {"objects": 1, "bytes": 1234}
        assert not p.store.exists(half)
