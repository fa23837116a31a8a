"""A matching run killed in the middle (SIGKILL, not an exception), then run again.

The run is a real one (default model, generated images, local store, real
Postgres) in a child process that pauses at a chosen point: half way through
writing evidence images to the store, and inside the transaction that
writes the flagged pairs (after the pairs are inserted, before the commit).
(``review_support.run_child_main`` also offers ``embedding``.) The test
kills it there and checks that nothing half-written is visible; then it
reruns the batch and checks that the result is complete, without
duplicates, and exactly the candidates at or above the threshold.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from review_support import (fresh_pg_database, local_pipeline, python_env, settings_from,
                            torch_single_thread)  # noqa: F401 (autouse)
from sqlalchemy import text

from fault_ledger import lost_and_duplicated, record
from moderation.db import Database

SUPPORT = Path(__file__).resolve().parent / "review_support.py"
BATCH = "queries/2024-06-01"


def _kill_at(where: str, env: dict, queries: Path, tmp: Path) -> None:
    marker = tmp / f"reached-{where}"
    proc = subprocess.Popen([sys.executable, str(SUPPORT), "run", where, str(marker), str(queries), BATCH],
                            env=python_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"the run ended before reaching {where}: {proc.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the run never reached {where}")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _state(db: Database) -> tuple[str | None, list[tuple]]:
    with db.engine.connect() as conn:
        status = conn.execute(text("SELECT status FROM match_runs WHERE batch = :b"), {"b": BATCH}).scalar()
        pairs = conn.execute(text("SELECT query_id, reference_id, round(score::numeric, 5), evidence_key, "
                                  "heatmap_key FROM flagged_pairs ORDER BY 1, 2")).all()
    return status, [tuple(p) for p in pairs]


def test_killed_run_leaves_nothing_half_written_and_reruns_complete(tmp_path):
    from moderation.embedding import FolderSource
    from moderation.jobs import Pipeline, run_matching

    with fresh_pg_database() as url:
        env, samples = local_pipeline(tmp_path / "home", url, MODERATION_THRESHOLD="0.2")
        db = Database(url)
        try:
            clean = 0
            for where in ("evidence", "commit"):
                _kill_at(where, env, samples.queries, tmp_path)
                status, pairs = _state(db)
                clean += status == "running" and pairs == []
                assert status == "running", where  # started, never finished, never marked complete
                assert pairs == [], where  # no pair of the killed attempt is visible
                with db.engine.connect() as conn:
                    assert conn.execute(text("SELECT count(*) FROM review_queue")).scalar() == 0
            p = Pipeline.open(settings_from(env))
            summary = run_matching(p, FolderSource(samples.queries), BATCH)
            status, pairs = _state(db)
            assert status == "complete"
            keys = [(q, r) for q, r, *_ in pairs]
            cands = list(csv.DictReader(io.StringIO(p.store.get(summary.candidates_key).decode())))
            expected = [(c["query_id"], c["reference_id"]) for c in cands if float(c["score"]) >= 0.2]
            lost, dup = lost_and_duplicated(expected, keys)
            record("kill -9", "matching killed while storing evidence, and inside the pairs transaction; "
                   "then rerun", tried=2, survived=clean if status == "complete" else 0, lost=lost, duplicated=dup)
            assert len(keys) == len(set(keys)) == summary.n_flagged > 0
            # Exactly the candidates at or above the threshold, each with its evidence stored.
            assert sorted(keys) == sorted(expected)
            for *_, ev, hm in pairs:
                assert ev and hm and p.store.exists(ev) and p.store.exists(hm)
            with db.engine.connect() as conn:
                assert conn.execute(text("SELECT n_flagged FROM match_runs WHERE batch = :b"),
                                    {"b": BATCH}).scalar() == len(pairs)
                assert conn.execute(text("SELECT count(*) FROM review_queue")).scalar() == len(pairs)
            ids_before = sorted(x.id for x in db.pairs())
            # Once more: idempotent, no new rows.
            run_matching(p, FolderSource(samples.queries), BATCH)
            assert _state(db) == ("complete", pairs)
            assert sorted(x.id for x in db.pairs()) == ids_before
            p.db.engine.dispose()
        finally:
            db.engine.dispose()
