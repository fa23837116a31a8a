"""A real Airflow deployment in subprocesses, for the scheduler test and the chain benchmark.

``airflow api-server``, ``airflow dag-processor`` and ``airflow scheduler`` (and, for
CeleryExecutor, ``airflow celery worker`` on the local Redis) in their own process groups, a small
REST client for the api-server, and :func:`run_chain`, which starts the statistics -> index ->
matching chain with one trigger and waits for the asset-triggered matching run.

Unpausing a DAG on a ``CronTriggerTimetable`` with ``catchup=False`` makes the scheduler create a run
for the latest past cron tick at once. :func:`run_chain` unpauses the index and matching DAGs first
and waits for those cron runs to skip (nothing to work from yet), so that every later run of theirs can
only come from an asset event. The statistics DAG is triggered while still paused and unpaused once
the queued run counts against its ``max_active_runs``: its cron tick then waits for the triggered run,
finds the statistics unchanged and announces nothing.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import airflow_harness as h

EXECUTORS = ("LocalExecutor", "CeleryExecutor")
STATS, INDEX, MATCH = "background_stats_refresh", "reference_index_nightly", "query_matching_daily"
CHAIN = (STATS, INDEX, MATCH)
ACTIVE = {"queued", "running"}
# Bounds for the polls; the whole test is meant to stay within ~6 minutes on 2 cores.
START_TIMEOUT = 120
CRON_SKIP_TIMEOUT = 120
CHAIN_TIMEOUT = 300


class Airflow:
    """The three Airflow processes of one test and a small REST client for the api-server."""

    def __init__(self, stack: h.Stack, logs: Path, executor: str = "LocalExecutor"):
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}")
        self.executor = executor
        self.port = h.free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ, **stack.env,
            # created paused: the test decides when each DAG may start (see the module docstring)
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__EXECUTOR": executor,
            "AIRFLOW__CORE__PARALLELISM": "2",  # two cores: more task processes only thrash
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API__BASE_URL": self.base,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base}/execution/",
            # the scheduler signs the tasks' execution-API tokens, the api-server checks them
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
            # a busy api-server on 2 cores must not fail a task's heartbeat (5 s by default)
            "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "30",
            # fast polling, so that a run follows its event within seconds, not minutes
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "MODERATION_WORKERS": "0",
            "MODERATION_VERIFY_WORKERS": "0",
        }
        if executor == "CeleryExecutor":
            # A Redis database of its own, emptied before and after: nothing left from another run.
            self.redis_db = random.randint(1, 15)
            self.env.update({
                "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:6379/{self.redis_db}",
                "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + stack.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"],
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
                "AIRFLOW__OPERATORS__DEFAULT_QUEUE": "default",
                # the production settings of docker/docker-compose.yml and docs/airflow.md
                "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "194400",
                # its own log-server port: two deployments on one host must not collide on 8793
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(h.free_port()),
            })
        self.procs: dict[str, subprocess.Popen] = {}
        self._token: str | None = None

    # -- processes ------------------------------------------------------------------------

    def start(self) -> None:
        airflow = str(h.VENV_BIN / "airflow")
        commands = {
            "api-server": [airflow, "api-server", "--host", "127.0.0.1", "--port", str(self.port),
                           "--workers", "1"],
            "dag-processor": [airflow, "dag-processor"],
            # task logs are files under AIRFLOW_HOME that the api-server reads directly
            "scheduler": [airflow, "scheduler", "--skip-serve-logs"],
        }
        if self.executor == "CeleryExecutor":
            self._flush_redis()
            # the `default` queue of docs/airflow.md; the `gpu` queue has no task in this chain
            commands["celery-worker"] = [airflow, "celery", "worker", "--queues", "default",
                                         "--concurrency", "2", "--skip-serve-logs", "--without-mingle",
                                         "--without-gossip"]
        for name, cmd in commands.items():
            out = open(self.logs / f"{name}.log", "wb")
            # own session: the group holds the process's children (LocalExecutor workers, uvicorn)
            self.procs[name] = subprocess.Popen(cmd, env=self.env, cwd=str(h.REPO), stdout=out,
                                                stderr=subprocess.STDOUT, start_new_session=True)
            out.close()

    def stop(self, timeout: float = 20.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # the leader may be gone while its children still run: kill the group either way
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        if self.executor == "CeleryExecutor":
            self._flush_redis()

    def _flush_redis(self) -> None:
        import redis

        redis.Redis(host="127.0.0.1", port=6379, db=self.redis_db).flushdb()

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise AssertionError(f"airflow processes exited: {dead}\n{self.diagnostics()}")

    def diagnostics(self, lines: int = 40) -> str:
        parts = []
        for name in self.procs:
            path = self.logs / f"{name}.log"
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
            parts.append(f"--- {name} (last {lines} lines)\n" + "\n".join(text))
        return "\n".join(parts)

    # -- REST ----------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict | None = None, auth: bool = True):
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")

    def token(self) -> str:
        if self._token is None:
            # simple auth manager with all_admins: a token without credentials
            self._token = self._request("GET", "/auth/token", auth=False)["access_token"]
        return self._token

    def get(self, path: str):
        return self._request("GET", path)

    def dag_exists(self, dag_id: str) -> bool:
        try:
            self.get(f"/api/v2/dags/{dag_id}")
            return True
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return False
            raise

    def unpause(self, dag_id: str) -> None:
        assert self._request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})["is_paused"] is False

    def trigger(self, dag_id: str) -> dict:
        return self._request("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None})

    def runs(self, dag_id: str) -> list[dict]:
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns?limit=100&order_by=run_after")["dag_runs"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=100")["task_instances"]

    def upstream_events(self, dag_id: str, run_id: str) -> list[dict]:
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/upstreamAssetEvents")["asset_events"]


def poll(what: str, fn, timeout: float, airflow: Airflow, every: float = 1.0):
    """``fn()`` until it returns something truthy; fails after ``timeout`` seconds with the processes' logs."""
    deadline = time.monotonic() + timeout
    while True:
        airflow.check_alive()
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{airflow.diagnostics()}")
        time.sleep(every)


def ti_states(airflow: Airflow, dag_id: str, run_id: str) -> dict[str, tuple[str | None, int]]:
    return {(f"{ti['task_id']}[{ti['map_index']}]" if ti["map_index"] >= 0 else ti["task_id"]):
            (ti["state"], ti["try_number"]) for ti in airflow.task_instances(dag_id, run_id)}




def after(a: str | None, b: str) -> bool:
    return a is not None and datetime.fromisoformat(a) > datetime.fromisoformat(b)


def answers(airflow: Airflow) -> bool:
    try:
        airflow.token()
        return True
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@dataclass
class ChainRun:
    """What :func:`run_chain` saw: the skipped cron runs, the trigger and the matching run it led to."""

    early: dict[str, list[dict]]  # the cron-tick runs of index and matching that skipped
    triggered: dict  # the manual run of the statistics DAG
    parse_wait: float  # seconds spent waiting for the parse before unpausing the statistics DAG
    match_run: dict  # the asset-triggered matching run that finished
    day: str  # the day it matched (YYYY-MM-DD)
    chain_seconds: float  # trigger -> that run's flagged pairs in the review database
    runs: dict[str, list[dict]]  # every run of the three DAGs once all had finished

    @property
    def early_ids(self) -> dict[str, set[str]]:
        return {d: {r["dag_run_id"] for r in runs} for d, runs in self.early.items()}


def run_chain(airflow: Airflow, pipeline, *, chain_timeout: float = CHAIN_TIMEOUT) -> ChainRun:
    """Start the processes, trigger the statistics DAG once, return when the matching it causes is over.

    Fails (AssertionError with the processes' logs) as soon as any task fails or takes a second
    try, a process dies, or a bound is exceeded. Leaves the processes running: the caller stops them.
    """
    airflow.start()
    poll("the api-server", lambda: answers(airflow), START_TIMEOUT, airflow)
    poll("the DAGs to be parsed", lambda: all(airflow.dag_exists(d) for d in CHAIN), START_TIMEOUT, airflow)

    # 1. index and matching: their cron runs for the latest tick must skip, nothing exists yet
    for dag_id in (INDEX, MATCH):
        airflow.unpause(dag_id)

    def cron_runs_done():
        runs = {d: airflow.runs(d) for d in (INDEX, MATCH)}
        return runs if all(r and all(x["state"] not in ACTIVE for x in r) for r in runs.values()) else None

    early = poll("the cron runs of index and matching", cron_runs_done, CRON_SKIP_TIMEOUT, airflow)
    early_ids = {d: {r["dag_run_id"] for r in runs} for d, runs in early.items()}

    # 2. one trigger, while the DAG is still paused. Once the dag-processor has parsed the DAG again it
    # counts the queued run against max_active_runs, and the scheduler then holds the cron tick back
    # until the triggered run is over: the triggered run is the one that fits and starts the chain.
    t0 = time.monotonic()
    triggered = airflow.trigger(STATS)
    poll("a parse of the statistics DAG after the trigger",
         lambda: after(airflow.get(f"/api/v2/dags/{STATS}")["last_parsed_time"], triggered["queued_at"]),
         60, airflow)
    parse_wait = time.monotonic() - t0
    airflow.unpause(STATS)

    def matched():
        # a retry or a failure anywhere fails now, not after the chain's whole time bound
        for dag_id in CHAIN:
            for r in airflow.runs(dag_id):
                if r["state"] in ACTIVE:
                    bad = {t: st for t, st in ti_states(airflow, dag_id, r["dag_run_id"]).items()
                           if st[0] in ("failed", "up_for_retry", "upstream_failed") or st[1] > 1}
                    assert not bad, (dag_id, r["dag_run_id"], bad, airflow.diagnostics())
        for r in airflow.runs(MATCH):
            if r["dag_run_id"] in early_ids[MATCH] or r["state"] in ACTIVE:
                continue
            day = (datetime.fromisoformat(r["run_after"]) - timedelta(days=1)).strftime("%Y-%m-%d")
            run = pipeline.db.run(f"queries/{day}/")
            if r["state"] != "success" or (run is not None and run.status == "complete"):
                return r, day
        return None

    match_run, day = poll("the chain to reach matching", matched, chain_timeout, airflow, every=2.0)
    chain_seconds = time.monotonic() - t0

    def settled():
        runs = {d: airflow.runs(d) for d in CHAIN}
        return runs if all(x["state"] not in ACTIVE for rs in runs.values() for x in rs) else None

    runs = poll("every run to finish", settled, 120, airflow)
    return ChainRun(early, triggered, parse_wait, match_run, day, chain_seconds, runs)
