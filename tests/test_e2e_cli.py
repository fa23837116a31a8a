"""End to end through the CLI on the real components: Postgres and an S3 server on loopback.

Generated references, background and edited copies; ``stats refresh`` ->
``index build`` -> ``calibrate`` -> ``match``; the copies are found, the
flagged pairs are in Postgres, and rerunning ``match`` adds no rows.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from conftest import fast_env, s3_env

MODERATION = str(Path(sys.executable).parent / "moderation")


def run_cli(env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    proc = subprocess.run([MODERATION, "--quiet", *args], env=full_env, capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"moderation {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def env(pg_url, s3_server, tmp_path_factory):
    home = tmp_path_factory.mktemp("e2e-home")
    return {**fast_env(home), **s3_env(s3_server, "e2e-artifacts"), "MODERATION_DATABASE_URL": pg_url}


def test_cli_pipeline_finds_copies_and_is_idempotent(env, sample_set, pg_url, tmp_path):
    out = json.loads(run_cli(env, "stats", "refresh", "--images", str(sample_set.background)).stdout)
    assert out["n_background"] == 30 and out["postprocess"] == "whiten"

    out = json.loads(run_cli(env, "index", "build", "--images", str(sample_set.references)).stdout)
    assert out["count"] == 30
    index_version = out["index_version"]
    # unchanged references: the same version stays in force, nothing republished
    again = json.loads(run_cli(env, "index", "build", "--images", str(sample_set.references)).stdout)
    assert again["index_version"] == index_version

    metrics = json.loads(run_cli(env, "calibrate", "--images", str(sample_set.queries),
                                 "--ground-truth", str(sample_set.ground_truth)).stdout)
    assert metrics["n_positives"] == sample_set.n_copies
    assert metrics["uap_sn"] > 0.5, metrics
    assert metrics["target_reached"] is True

    candidates = tmp_path / "candidates.csv"
    summary = json.loads(run_cli(env, "match", "--images", str(sample_set.queries), "--batch", "day-1",
                                 "--candidates-out", str(candidates)).stdout)
    assert summary["threshold"] == pytest.approx(metrics["threshold"])
    gt = {r["query_id"]: r["reference_id"] for r in csv.DictReader(open(sample_set.ground_truth))}

    # every candidate in DISC21 format; most copies have their reference ranked first
    rows = list(csv.DictReader(open(candidates)))
    assert set(rows[0]) == {"query_id", "reference_id", "score"}
    top1 = {}
    for r in rows:
        if r["query_id"] not in top1 or float(r["score"]) > float(top1[r["query_id"]]["score"]):
            top1[r["query_id"]] = r
    hits = sum(1 for q, ref in gt.items() if ref and top1[q]["reference_id"] == ref)
    assert hits >= 0.7 * sample_set.n_copies

    engine = create_engine(pg_url)
    with engine.connect() as conn:
        pairs = conn.execute(text(
            "select p.query_id, p.reference_id, p.score from flagged_pairs p "
            "join match_runs r on r.id = p.run_id where r.batch = 'day-1'")).all()
        run = conn.execute(text("select status, n_queries, n_flagged, index_version from match_runs "
                                "where batch = 'day-1'")).one()
    assert run.status == "complete" and run.n_queries == 20 and run.index_version == index_version
    assert len(pairs) == run.n_flagged == summary["n_flagged"]
    correct = sum(1 for p in pairs if gt.get(p.query_id) == p.reference_id)
    assert len(pairs) >= sample_set.n_copies // 3
    assert correct / len(pairs) >= 0.9
    assert all(p.score >= summary["threshold"] for p in pairs)

    # rerun of the same batch: no duplicates, same pairs
    run_cli(env, "match", "--images", str(sample_set.queries), "--batch", "day-1")
    with engine.connect() as conn:
        n_pairs = conn.execute(text("select count(*) from flagged_pairs")).scalar()
        n_runs = conn.execute(text("select count(*) from match_runs where batch = 'day-1'")).scalar()
        dupes = conn.execute(text("select count(*) from (select run_id, query_id, reference_id "
                                  "from flagged_pairs group by 1, 2, 3 having count(*) > 1) d")).scalar()
    engine.dispose()
    assert n_runs == 1 and n_pairs == len(pairs) and dupes == 0


def test_cli_errors_are_clear(env, tmp_path):
    proc = run_cli(env, "match", "--images", str(tmp_path / "missing"), check=False)
    assert proc.returncode == 1 and "not a folder" in proc.stderr
    proc = run_cli(env, "index", "build", check=False)
    assert proc.returncode == 2 and "--images" in proc.stderr
    bad_db = {**env, "MODERATION_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/nope"}
    proc = run_cli(bad_db, "model", "list", check=False)
    assert proc.returncode == 1 and "MODERATION_DATABASE_URL" in proc.stderr
    bad_store = {**env, "MODERATION_S3_ENDPOINT": "127.0.0.1:1"}
    proc = run_cli(bad_store, "model", "list", check=False)
    assert proc.returncode == 1 and "MODERATION_S3_ENDPOINT" in proc.stderr


def test_cli_help_for_every_command():
    for args in (["--help"], ["stats", "refresh", "--help"], ["index", "build", "--help"],
                 ["calibrate", "--help"], ["match", "--help"], ["model", "import", "--help"],
                 ["review", "list", "--help"], ["demo", "--help"]):
        proc = subprocess.run([MODERATION, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "usage: moderation" in proc.stdout
