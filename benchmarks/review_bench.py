"""Review-queue figures on a real Postgres: insert a day's flagged pairs, then 8 moderators at work.

    python benchmarks/review_bench.py                     # 10k and 1M rows, 8 moderators, 20 s
    python benchmarks/review_bench.py --rows 10000 --seconds 5   # quick

Measures, in a fresh database (dropped afterwards unless --keep):

1. the time to write a day's flagged pairs at each --rows, through the
   pipeline's own path (``Database.finish_run``: chunked multi-row INSERT ...
   ON CONFLICT, one transaction) and through COPY into a staging table plus
   one INSERT ... SELECT ON CONFLICT (what finish_run could do); both fire
   the statement triggers that fill ``review_queue``;
2. with the largest day as the queue, --moderators processes each looping
   ``claim(n)`` -> ``decide`` for each pair, for --seconds: claims per second
   (all moderators together) and the latency of claim and decide calls
   (p50/p95/p99, milliseconds, as seen by the client).

Prints a Markdown table and writes benchmarks/out/review_bench.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import secrets
import statistics
import sys
import time
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moderation import review  # noqa: E402
from moderation.db import (Database, FlaggedPair, IndexVersionRow, MatchRunRecord, ModelVersionRow,  # noqa: E402
                           StatsVersionRow, upgrade)

DEFAULT_PG = os.environ.get("MODERATION_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def _versions(db: Database) -> None:
    db.record_version(ModelVersionRow(version="bench-model", backbone="bench", dim=512, image_size=320,
                                      resize_mode="square", source="bench", metrics={}))
    db.record_version(StatsVersionRow(version="bench-stats", model_version="bench-model", postprocess="whiten",
                                      in_dim=512, out_dim=512, n_background=1000))
    db.record_version(IndexVersionRow(version="bench-index", model_version="bench-model",
                                      stats_version="bench-stats", count=1_000_000, dim=512, factory="Flat"))


def insert_day(db: Database, batch: str, rows: int, seed: int) -> float:
    """Seconds to write ``rows`` flagged pairs of one batch, as run_matching does."""
    rng = random.Random(seed)
    pairs = [FlaggedPair(f"{batch}/q{i:08d}", f"r{rng.randrange(1_000_000):07d}", raw_score=rng.uniform(0.5, 1.0),
                         score=rng.uniform(0.0, 1.0), rank=1 + rng.randrange(10),
                         query_key=f"queries/{batch}/q{i:08d}.jpg", reference_key=f"references/r{i:07d}.jpg",
                         evidence_key=f"runs/{batch}/evidence/q{i:08d}.jpg",
                         heatmap_key=f"runs/{batch}/evidence/q{i:08d}.heatmap.jpg")
             for i in range(rows)]
    run = MatchRunRecord(batch=batch, model_version="bench-model", stats_version="bench-stats",
                         index_version="bench-index", threshold=0.0, n_queries=rows, n_candidates=rows * 10)
    db.start_run(run)
    t = time.perf_counter()
    db.finish_run(run, pairs)
    return time.perf_counter() - t


_COLS = ("query_id", "reference_id", "query_key", "reference_key", "raw_score", "score", "rank", "evidence_key",
         "heatmap_key")


def insert_day_copy(db: Database, batch: str, rows: int, seed: int) -> float:
    """Seconds to write the same day with COPY into a staging table + one INSERT ... ON CONFLICT.

    Not the pipeline's path today: it shows what ``finish_run`` could reach
    (same table, same triggers, same single transaction).
    """
    rng = random.Random(seed)
    run = MatchRunRecord(batch=batch, model_version="bench-model", stats_version="bench-stats",
                         index_version="bench-index", threshold=0.0, n_queries=rows, n_candidates=rows * 10)
    run_id = db.start_run(run)
    data = [(f"{batch}/q{i:08d}", f"r{rng.randrange(1_000_000):07d}", f"queries/{batch}/q{i:08d}.jpg",
             f"references/r{i:07d}.jpg", rng.uniform(0.5, 1.0), rng.uniform(0.0, 1.0), 1 + rng.randrange(10),
             f"runs/{batch}/evidence/q{i:08d}.jpg", f"runs/{batch}/evidence/q{i:08d}.heatmap.jpg")
            for i in range(rows)]
    cols = ", ".join(_COLS)
    t = time.perf_counter()
    raw = db.engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute(f"CREATE TEMP TABLE stage ON COMMIT DROP AS SELECT {cols} FROM flagged_pairs WITH NO DATA")
        with cur.copy(f"COPY stage ({cols}) FROM STDIN") as copy:
            for row in data:
                copy.write_row(row)
        cur.execute(f"INSERT INTO flagged_pairs (run_id, {cols}, model_version, stats_version, index_version, "
                    f"threshold) SELECT %s, {cols}, %s, %s, %s, %s FROM stage "
                    "ON CONFLICT (run_id, query_id, reference_id) DO UPDATE SET "
                    + ", ".join(f"{c} = excluded.{c}" for c in _COLS[2:]),
                    (run_id, run.model_version, run.stats_version, run.index_version, run.threshold))
        cur.execute("UPDATE match_runs SET status = 'complete', n_flagged = %s, finished_at = now(), "
                    "last_complete_at = now() WHERE id = %s", (rows, run_id))
        raw.commit()
    finally:
        raw.close()
    return time.perf_counter() - t


def _moderator(url: str, name: str, n: int, seconds: float, start_at: float, out: mp.Queue) -> None:
    db = Database(url)
    rng = random.Random(name)
    claim_ms, decide_ms, claimed = [], [], 0
    while time.time() < start_at:
        time.sleep(0.005)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        got = review.claim(db, name, n)
        claim_ms.append((time.perf_counter() - t) * 1000)
        if not got:
            break
        claimed += len(got)
        for c in got:
            t = time.perf_counter()
            review.decide(db, c["pair_id"], name, rng.choice(("confirmed", "rejected", "unsure")))
            decide_ms.append((time.perf_counter() - t) * 1000)
    db.engine.dispose()
    out.put({"name": name, "claimed": claimed, "claim_ms": claim_ms, "decide_ms": decide_ms})


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def moderators(url: str, k: int, n: int, seconds: float) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 3.0  # all start together, after their imports
    procs = [ctx.Process(target=_moderator, args=(url, f"mod{i}", n, seconds, start_at, out)) for i in range(k)]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    claims = sum(r["claimed"] for r in results)
    c_ms = [x for r in results for x in r["claim_ms"]]
    d_ms = [x for r in results for x in r["decide_ms"]]
    return {"moderators": k, "claim_batch": n, "seconds": seconds, "pairs_claimed": claims,
            "claims_per_s": claims / seconds, "claim_calls_per_s": len(c_ms) / seconds,
            "claim_ms": {"p50": _pct(c_ms, .5), "p95": _pct(c_ms, .95), "p99": _pct(c_ms, .99)},
            "decide_ms": {"p50": _pct(d_ms, .5), "p95": _pct(d_ms, .95), "p99": _pct(d_ms, .99),
                          "mean": statistics.fmean(d_ms) if d_ms else float("nan")},
            "decisions": len(d_ms)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pg", default=DEFAULT_PG, help="maintenance URL of the Postgres server")
    ap.add_argument("--rows", default="10000,1000000", help="day sizes to insert, comma-separated")
    ap.add_argument("--moderators", type=int, default=8)
    ap.add_argument("--claim-batch", default="1,10", help="pairs per claim call, comma-separated")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--finish-run-max", type=int, default=1_000_000,
                    help="largest day to write through finish_run (it is the slow path)")
    ap.add_argument("--keep", action="store_true", help="keep the benchmark database")
    args = ap.parse_args(argv)

    name = f"review_bench_{secrets.token_hex(4)}"
    admin = create_engine(args.pg, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = make_url(args.pg).set(database=name).render_as_string(hide_password=False)
    report: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"}
    try:
        db = Database(url)
        upgrade(db)
        _versions(db)
        with db.engine.connect() as c:
            report["postgres"] = c.execute(text("SHOW server_version")).scalar()
        report["insert"] = []
        for i, rows in enumerate(int(x) for x in args.rows.split(",")):
            for path, fn in (("finish_run", insert_day), ("copy", insert_day_copy)):
                if path == "finish_run" and rows > args.finish_run_max:
                    continue
                secs = fn(db, f"day-{i}-{path}", rows, seed=i)
                report["insert"].append({"rows": rows, "path": path, "seconds": secs, "rows_per_s": rows / secs})
                print(f"inserted {rows:,} pairs via {path} in {secs:.2f} s ({rows / secs:,.0f} rows/s)", flush=True)
        with db.engine.begin() as c:
            c.exec_driver_sql("ANALYZE")
        db.engine.dispose()
        report["moderators"] = []
        for n in (int(x) for x in args.claim_batch.split(",")):
            r = moderators(url, args.moderators, n, args.seconds)
            report["moderators"].append(r)
            print(f"{r['moderators']} moderators, claim {n}: {r['claims_per_s']:.0f} claims/s, decide p50 "
                  f"{r['decide_ms']['p50']:.1f} ms p95 {r['decide_ms']['p95']:.1f} ms, claim p50 "
                  f"{r['claim_ms']['p50']:.1f} ms p95 {r['claim_ms']['p95']:.1f} ms", flush=True)
        db = Database(url)
        with db.engine.connect() as c:  # the run must not have broken the queue's guarantees
            dup = c.execute(text("SELECT count(*) FROM (SELECT pair_id FROM review_decisions "
                                 "WHERE decision <> 'undo' GROUP BY pair_id HAVING count(*) > 1) x")).scalar()
            drift = c.execute(text("SELECT count(*) FROM review_queue q JOIN review_pair_state s "
                                   "USING (pair_id) WHERE q.state <> s.state")).scalar()
        db.engine.dispose()
        report["checks"] = {"pairs_decided_twice": dup, "state_drift": drift}
    finally:
        if not args.keep:
            with admin.connect() as c:
                c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
    out = REPO / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "review_bench.json").write_text(json.dumps(report, indent=2))
    print()
    print("| measure | value |")
    print("|---|---|")
    for r in report["insert"]:
        print(f"| insert a day of {r['rows']:,} flagged pairs ({r['path']}) | {r['seconds']:.2f} s "
              f"({r['rows_per_s']:,.0f} rows/s) |")
    for r in report["moderators"]:
        print(f"| {r['moderators']} moderators, claim {r['claim_batch']} at a time: claims/s | "
              f"{r['claims_per_s']:.0f} |")
        print(f"| ... decision latency p50 / p95 / p99 | {r['decide_ms']['p50']:.1f} / {r['decide_ms']['p95']:.1f} / "
              f"{r['decide_ms']['p99']:.1f} ms |")
        print(f"| ... claim latency p50 / p95 | {r['claim_ms']['p50']:.1f} / {r['claim_ms']['p95']:.1f} ms |")
    print(f"| pairs decided twice / state drift | {report['checks']['pairs_decided_twice']} / "
          f"{report['checks']['state_drift']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
