"""Wall time of each DAG on real Airflow, and Airflow's overhead over the same calls made directly.

Sets up the end-to-end test's stack (Postgres metadata + review databases,
``moto_server`` on loopback, ``airflow db migrate``), uploads generated
images, then for each of two fresh buckets and review databases:

- ``direct``: calls the same ``moderation.orchestration`` functions the
  tasks call, in the same order, in this process;
- ``airflow``: runs ``background_stats_refresh``, ``reference_index_nightly``
  and ``query_matching_daily`` with ``dag.test()``.

Overhead = DAG wall time - direct time (scheduling loop, serialisation,
XCom, connections, task start-up; ``dag.test()`` runs tasks in-process, so
a Celery worker's per-task process start is not included). It also times
the bare library jobs (``refresh_stats``, ``build_reference_index``,
``run_matching``) to show what the gates and sharding add.

    .venv/bin/python benchmarks/airflow_bench.py [--refs 40] [--background 40] [--repeat 3]

Each path runs ``--repeat`` times (alternating the order) and the fastest run counts.
Prints a Markdown table and writes benchmarks/out/airflow_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import airflow_harness as h  # noqa: E402

DAY = "2026-11-28"


def _fresh(stack, label: str):
    """Settings for a new bucket and a new review database (cold caches, no versions)."""
    from moderation.config import Settings

    db = f"af_bench_{label}_{uuid.uuid4().hex[:6]}"
    url = h.create_database(db)
    settings = Settings.from_env(os.environ).with_overrides(database_url=url,
                                                            store_url=f"s3://bench-{label}-{uuid.uuid4().hex[:6]}")
    return settings, db


def _upload(settings, data) -> None:
    from moderation.store import open_store

    store = open_store(settings)
    for part in (data.references, data.background, data.queries[DAY]):
        h.upload(store, part)


def run_direct(settings, keys_per_shard: int) -> dict[str, float]:
    from moderation import orchestration as o

    out = {}
    t = time.perf_counter()
    sample = o.sample_background(settings, sample_size=5000)
    o.fit_background_stats(settings, sample)
    out["background_stats_refresh"] = time.perf_counter() - t
    t = time.perf_counter()
    plan = o.plan_reference_index(settings, keys_per_shard=keys_per_shard)
    shards = [o.embed_reference_shard(settings, s, run_id="bench") for s in plan["shards"]]
    o.check_reference_batch(settings, plan, shards)
    built = o.build_index_version(settings, plan)
    o.calibrate_if_labelled(settings, built)
    out["reference_index_nightly"] = time.perf_counter() - t
    t = time.perf_counter()
    batch = o.batch_prefix(DAY)
    o.check_query_batch(settings, batch)
    embedded = o.embed_query_batch(settings, batch)
    o.match_batch(settings, batch, embedded["model_version"])
    o.gate_flagged_batch(settings, batch)
    out["query_matching_daily"] = time.perf_counter() - t
    return out


def run_bare(settings) -> dict[str, float]:
    from moderation.embedding import StoreSource
    from moderation.jobs import Pipeline, build_reference_index, refresh_stats, run_matching

    out = {}
    t = time.perf_counter()
    p = Pipeline.open(settings)
    refresh_stats(p, StoreSource(settings, "background/"))
    out["background_stats_refresh"] = time.perf_counter() - t
    t = time.perf_counter()
    build_reference_index(p, StoreSource(settings, "references/"))
    out["reference_index_nightly"] = time.perf_counter() - t
    t = time.perf_counter()
    run_matching(p, StoreSource(settings, f"queries/{DAY}/"), f"queries/{DAY}/")
    out["query_matching_daily"] = time.perf_counter() - t
    return out


def run_airflow(dags, settings, keys_per_shard: int) -> tuple[dict, dict, dict]:
    """Point the connections at ``settings``' bucket and database, then dag.test() each DAG."""
    from urllib.parse import urlsplit

    bucket = urlsplit(settings.store_url).netloc
    conn = json.loads(os.environ["AIRFLOW_CONN_MODERATION_S3"])
    conn["extra"]["bucket"] = bucket
    os.environ["AIRFLOW_CONN_MODERATION_S3"] = json.dumps(conn)
    db = urlsplit(settings.database_url)
    os.environ["AIRFLOW_CONN_MODERATION_DB"] = f"postgres://{db.netloc}{db.path}"
    times, states, inside = {}, {}, {}
    for dag_id, conf in (("background_stats_refresh", {}),
                         ("reference_index_nightly", {"keys_per_shard": keys_per_shard}),
                         ("query_matching_daily", {"date": DAY})):
        dr, st, secs = h.run_dag(dags[dag_id], conf=conf)
        if dr.state != "success":
            raise RuntimeError(f"{dag_id} ended {dr.state}: {st}")
        times[dag_id], states[dag_id] = secs, st
        inside[dag_id] = h.task_seconds(dag_id, dr.run_id)
    return times, states, inside


def warm_up(settings) -> None:
    """Import and build once so neither path pays the first-import cost."""
    from moderation import quality
    from moderation.model_versions import imagenet_default

    import numpy as np

    imagenet_default(settings)
    quality.check_embeddings(np.eye(4, dtype=np.float32), 4, "warmup")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--refs", type=int, default=40)
    ap.add_argument("--background", type=int, default=40)
    ap.add_argument("--copies", type=int, default=12)
    ap.add_argument("--distractors", type=int, default=4)
    ap.add_argument("--keys-per-shard", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3, help="repeats of each path; the fastest counts")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "airflow_bench.json")
    args = ap.parse_args(argv)

    stack = h.configure_airflow(Path(tempfile.mkdtemp(prefix="airflow-bench-")), tag="bench")
    created = []
    try:
        with h.environment(stack):
            dags = h.load_dags()
            data = h.make_dataset([DAY], n_refs=args.refs, n_background=args.background,
                                  copies_per_day=args.copies, distractors_per_day=args.distractors)
            base = stack.settings()
            warm_up(base)
            runs: dict[str, list[dict[str, float]]] = {"bare": [], "direct": [], "airflow": [], "in_tasks": []}
            states: dict[str, dict] = {}
            for rep in range(args.repeat):
                order = ["bare", "direct", "airflow"] if rep % 2 == 0 else ["airflow", "direct", "bare"]
                for label in order:
                    settings, db = _fresh(stack, label)
                    created.append(db)
                    _upload(settings, data)
                    if label == "airflow":
                        times, states, inside = run_airflow(dags, settings, args.keys_per_shard)
                        runs["in_tasks"].append(inside)
                    elif label == "direct":
                        times = run_direct(settings, args.keys_per_shard)
                    else:
                        times = run_bare(settings)
                    runs[label].append(times)
                    print(f"rep {rep + 1} {label}: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()),
                          flush=True)
            # fastest of the repeats: the least disturbed by other load on the machine. The first
            # Airflow run also pays one-off costs (importing the execution API, first DAG sync).
            best = {label: {dag: min(r[dag] for r in reps) for dag in reps[0]} for label, reps in runs.items()}
            # the same DAG run's wall time minus the time spent inside its tasks: robust to the
            # machine's load, as both come from one run
            loop = {dag: min(a[dag] - t[dag] for a, t in zip(runs["airflow"][1:] or runs["airflow"],
                                                               runs["in_tasks"][1:] or runs["in_tasks"]))
                    for dag in runs["airflow"][0]}
            rows = []
            for dag_id in best["airflow"]:
                af, direct, bare = (best[k][dag_id] for k in ("airflow", "direct", "bare"))
                rows.append({"dag": dag_id, "airflow_s": round(af, 2), "direct_s": round(direct, 2),
                             "overhead_s": round(af - direct, 2), "bare_jobs_s": round(bare, 2),
                             "airflow_first_run_s": round(runs["airflow"][0][dag_id], 2),
                             "outside_tasks_s": round(loop[dag_id], 2),
                             "tasks": len(states[dag_id])})
    finally:
        stack.stop()
        for db in [*created, stack.meta_db, stack.review_db]:
            h.drop_database(db)
    report = {"rows": rows, "runs": runs, "repeat": args.repeat,
              "images": {"references": args.refs, "background": args.background,
                         "queries": args.copies + args.distractors},
              "image_size": int(stack.env["MODERATION_IMAGE_SIZE"]), "cpus": os.cpu_count(),
              "python": platform.python_version(), "at": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print("| DAG | tasks | DAG run (s) | same calls direct (s) | overhead: run - direct (s) "
          "| overhead: run - time inside tasks (s) | bare library jobs (s) | first DAG run (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dag']} | {r['tasks']} | {r['airflow_s']:.1f} | {r['direct_s']:.1f} | "
              f"{r['overhead_s']:.1f} | {r['outside_tasks_s']:.1f} | {r['bare_jobs_s']:.1f} | "
              f"{r['airflow_first_run_s']:.1f} |")
    total = {k: sum(r[k] for r in rows) for k in ("airflow_s", "direct_s", "overhead_s", "outside_tasks_s")}
    print(f"| total | | {total['airflow_s']:.1f} | {total['direct_s']:.1f} | {total['overhead_s']:.1f} | "
          f"{total['outside_tasks_s']:.1f} | | |")
    print(f"\nfastest of {args.repeat} runs per path; {report['images']} at {report['image_size']} px, "
          f"{report['cpus']} CPUs; json: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
