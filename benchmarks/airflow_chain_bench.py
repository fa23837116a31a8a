"""The whole chain under a real scheduler, per executor: one trigger to flagged pairs, and parse cost.

For each executor (LocalExecutor; CeleryExecutor with a worker on the local Redis) this starts a
fresh deployment (``tests/airflow_scheduler.py``: api-server, dag-processor, scheduler, worker;
Postgres metadata and review databases; ``moto_server``), uploads the images, triggers
``background_stats_refresh`` once and waits until the asset-triggered matching run has written the
day's flagged pairs (``run_chain``). Then, on a fresh bucket and review database with the same
images, it makes the same ``moderation.orchestration`` calls directly in this process
(``airflow_bench.run_direct``): Airflow's overhead is the chain's wall time minus that.

It also parses each DAG file on its own in a fresh interpreter (after Airflow's own imports, as
``tests/test_dags_parsing.py`` does) and reports the CPU time per file.

With ``--bench-dev DIR`` the images are bench-dev's (references, background, the 214 queries as the
day's batch; with ``--calibration`` also ``extra/`` as the labelled set the index DAG calibrates on),
at the library's default settings; without it, a small generated set at 96 px as in the tests.

    .venv/bin/python benchmarks/airflow_chain_bench.py --bench-dev ../shared/bench-dev
    .venv/bin/python benchmarks/airflow_chain_bench.py --executors LocalExecutor   # generated images

Prints a Markdown table and writes benchmarks/out/airflow_chain_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

import airflow_bench  # noqa: E402
import airflow_harness as h  # noqa: E402
from airflow_scheduler import CHAIN, EXECUTORS, Airflow, run_chain  # noqa: E402

# The library's defaults, not the tests' small-image settings, when measuring on bench-dev.
TEST_ONLY = ("MODERATION_IMAGE_SIZE", "MODERATION_BATCH_SIZE", "MODERATION_EVIDENCE", "MODERATION_THRESHOLD")


def bench_dev_objects(root: Path, days: list[str], calibration: bool) -> dict[str, bytes]:
    """bench-dev as a bucket: references/, background/, each day's queries (and calibration/ from extra/)."""
    objects: dict[str, bytes] = {}
    for sub in ("references", "background"):
        for f in sorted((root / sub).glob("*.jpg")):
            objects[f"{sub}/{f.name}"] = f.read_bytes()
    queries = sorted((root / "queries").glob("*.jpg"))
    for day in days:
        for f in queries:
            objects[f"queries/{day}/{f.name}"] = f.read_bytes()
    if calibration:
        for f in sorted((root / "extra" / "queries").glob("*.jpg")):
            objects[f"calibration/queries/{f.name}"] = f.read_bytes()
        objects["calibration/ground_truth.csv"] = (root / "extra" / "ground_truth.csv").read_bytes()
    return objects


def generated_objects(days: list[str]) -> tuple[dict[str, bytes], int]:
    data = h.make_dataset(days)
    objects = {**data.references, **data.background}
    for part in data.queries.values():
        objects.update(part)
    return objects, len(data.queries[days[0]])


def truth_of(root: Path | None) -> dict[str, str]:
    if root is None:
        return {}
    rows = (root / "ground_truth.csv").read_text().splitlines()[1:]
    return {q: r for q, r in (line.split(",")[:2] for line in rows) if r}


_PARSE_PROBE = """
import json, resource, sys, tempfile
from pathlib import Path
from airflow.dag_processing.dagbag import BundleDagBag

def cpu():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime

warm = Path(tempfile.mkdtemp())
(warm / "warm_dag.py").write_text(
    "from datetime import datetime\\n"
    "from airflow.sdk import Asset, AssetOrTimeSchedule, Connection, CronTriggerTimetable, Param, dag, task\\n"
    "@dag(dag_id='warm', start_date=datetime(2026, 1, 1), params={'p': Param(1, type='integer')},\\n"
    "     schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable('0 1 * * *', timezone='UTC'),\\n"
    "                                  assets=Asset(name='w', uri='x-w://w')))\\n"
    "def warm():\\n"
    "    @task\\n"
    "    def a(x):\\n"
    "        return x\\n"
    "    a.expand(x=[1])\\n"
    "warm()\\n")
BundleDagBag(dag_folder=str(warm), bundle_path=warm, bundle_name="warm")
dags, name = Path(sys.argv[1]), sys.argv[2]
t, w = cpu(), __import__("time").perf_counter()
bag = BundleDagBag(dag_folder=str(dags / name), bundle_path=dags, bundle_name="dags-folder")
print("PROBE " + json.dumps({"cpu_s": cpu() - t, "wall_s": __import__("time").perf_counter() - w,
                             "dags": sorted(bag.dags), "errors": len(bag.import_errors)}))
"""


def parse_costs() -> dict[str, dict]:
    """CPU and wall seconds to parse each DAG file alone, in a fresh interpreter (median of 3)."""
    out = {}
    for path in sorted((REPO / "dags").glob("*.py")):
        if path.name == "moderation_dag_common.py":  # .airflowignore: not a DAG file
            continue
        runs = []
        for _ in range(3):
            with tempfile.TemporaryDirectory() as home:
                env = {**os.environ, "AIRFLOW_HOME": home, "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                       "AIRFLOW__CORE__UNIT_TEST_MODE": "False", "AIRFLOW__LOGGING__LOGGING_LEVEL": "ERROR",
                       "PYTHONPATH": str(REPO)}
                proc = subprocess.run([sys.executable, "-c", _PARSE_PROBE, str(REPO / "dags"), path.name],
                                      env=env, capture_output=True, text=True, timeout=300)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("PROBE ")), None)
                if line is None:
                    raise RuntimeError(f"parsing {path.name} failed:\n{proc.stderr[-3000:]}")
                runs.append(json.loads(line[6:]))
        runs.sort(key=lambda r: r["cpu_s"])
        out[path.name] = runs[1]
    return out


def one_executor(executor: str, objects: dict[str, bytes], truth: dict[str, str], bench_dev: bool,
                 keys_per_shard: int, root: Path, direct: bool = True) -> dict:
    stack = h.configure_airflow(root / executor, tag=f"chain{executor[:5].lower()}", in_process=False)
    try:
        if bench_dev:
            for key in TEST_ONLY:
                stack.env.pop(key, None)
        with h.environment(stack):
            from moderation.jobs import Pipeline

            pipeline = Pipeline.open(stack.settings())
            h.upload(pipeline.store, objects)
            airflow = Airflow(stack, root / executor / "logs", executor)
            try:
                chain = run_chain(airflow, pipeline, chain_timeout=3600)
            finally:
                airflow.stop()
            run = pipeline.db.run(f"queries/{chain.day}/")
            pairs = [(p.query_id, p.reference_id) for p in pipeline.db.pairs(run.id)] if run else []
            triggered = {d: [r for r in chain.runs[d] if r["run_type"] != "scheduled"] for d in CHAIN}
            result = {
                "chain_s": round(chain.chain_seconds, 1), "parse_wait_s": round(chain.parse_wait, 1),
                "dag_runs_s": {d: [round(r["duration"] or 0, 1) for r in rs] for d, rs in triggered.items()},
                "match_run_state": chain.match_run["state"], "queries": run.n_queries if run else 0,
                "flagged": len(pairs),
                "flagged_correct": sum(1 for q, r in pairs if truth.get(q) == r) if truth else None,
            }
            if not direct:
                return result
            # the same calls without Airflow, on a fresh bucket and review database with the same images
            settings, db = airflow_bench._fresh(stack, "direct")
            try:
                from moderation.store import open_store

                h.upload(open_store(settings), objects)
                t = time.perf_counter()
                direct = airflow_bench.run_direct(settings, keys_per_shard)
                result["direct_s"] = round(time.perf_counter() - t, 1)
                result["direct_by_dag_s"] = {k: round(v, 1) for k, v in direct.items()}
            finally:
                h.drop_database(db)
            result["overhead_s"] = round(result["chain_s"] - result["direct_s"], 1)
            return result
    finally:
        stack.stop()
        for name in (stack.meta_db, stack.review_db):
            h.drop_database(name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--executors", default=",".join(EXECUTORS))
    ap.add_argument("--bench-dev", type=Path, help="bench-dev folder (default: generated images)")
    ap.add_argument("--calibration", action="store_true",
                    help="with --bench-dev: upload extra/ as the labelled set, so the index run calibrates "
                         "(642 more queries through both stages: the longest part of the chain on a CPU)")
    ap.add_argument("--keys-per-shard", type=int, default=2000, help="as the index DAG's default")
    ap.add_argument("--skip-parse", action="store_true")
    ap.add_argument("--skip-direct", action="store_true", help="only the chain (no direct calls, no overhead)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "airflow_chain_bench.json")
    args = ap.parse_args(argv)
    executors = [e.strip() for e in args.executors.split(",") if e.strip()]
    now = datetime.now(timezone.utc)
    # the index-triggered matching run matches the day before it starts (today too, across midnight);
    # run_direct matches airflow_bench.DAY
    days = [(now - timedelta(days=1)).strftime("%Y-%m-%d"), now.strftime("%Y-%m-%d"), airflow_bench.DAY]
    if args.bench_dev:
        objects, truth = bench_dev_objects(args.bench_dev, days, args.calibration), truth_of(args.bench_dev)
    else:
        objects, _ = generated_objects(days)
        truth = {}
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "data": str(args.bench_dev or "generated"), "objects": len(objects), "executors": {}}
    if not args.skip_parse:
        report["parse"] = parse_costs()
    with tempfile.TemporaryDirectory() as tmp:
        for executor in executors:
            print(f"{executor}: chain ...", file=sys.stderr, flush=True)
            report["executors"][executor] = one_executor(executor, objects, truth, bool(args.bench_dev),
                                                         args.keys_per_shard, Path(tmp),
                                                         direct=not args.skip_direct)
            print(json.dumps(report["executors"][executor]), file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print("| executor | trigger → flagged pairs (s) | same calls, direct (s) | overhead (s) | statistics / index / "
          "matching runs (s) | flagged (correct) |")
    print("|---|---|---|---|---|---|")
    for executor, r in report["executors"].items():
        runs = " / ".join(str(r["dag_runs_s"][d][0]) if r["dag_runs_s"][d] else "-" for d in CHAIN)
        correct = f" ({r['flagged_correct']})" if r["flagged_correct"] is not None else ""
        print(f"| {executor} | {r['chain_s']} | {r.get('direct_s', '-')} | {r.get('overhead_s', '-')} | {runs} | "
              f"{r['flagged']}{correct} |")
    if "parse" in report:
        print("\n| DAG file | parse CPU (s) | parse wall (s) |\n|---|---|---|")
        for name, r in report["parse"].items():
            print(f"| `{name}` | {r['cpu_s']:.3f} | {r['wall_s']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
