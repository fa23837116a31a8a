"""The asset chain under a real scheduler: statistics -> index -> matching, started by one trigger.

Real ``airflow api-server``, ``airflow dag-processor`` and ``airflow scheduler`` (LocalExecutor)
subprocesses on a fresh Postgres metadata database, the review database in Postgres and
``moto_server`` behind the harness proxy. The test triggers ``background_stats_refresh`` once through
the REST API; the index and matching runs must be started by the scheduler from the asset events.

Unpausing a DAG on a ``CronTriggerTimetable`` with ``catchup=False`` makes the scheduler create a run
for the latest past cron tick at once. The test unpauses the index and matching DAGs first and waits
for those cron runs to skip (nothing to work from yet), so that every later run of theirs can only come
from an asset event. The statistics DAG is triggered while still paused and unpaused once the queued run
counts against its ``max_active_runs``: its cron tick then waits for the triggered run, finds the
statistics unchanged and announces nothing.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import airflow_harness as h

pytestmark = [pytest.mark.airflow, pytest.mark.slow]

STATS, INDEX, MATCH = "background_stats_refresh", "reference_index_nightly", "query_matching_daily"
CHAIN = (STATS, INDEX, MATCH)
ACTIVE = {"queued", "running"}
# Bounds for the polls; the whole test is meant to stay within ~6 minutes on 2 cores.
START_TIMEOUT = 120
CRON_SKIP_TIMEOUT = 120
CHAIN_TIMEOUT = 300


class Airflow:
    """The three Airflow processes of one test and a small REST client for the api-server."""

    def __init__(self, stack: h.Stack, logs: Path):
        self.port = h.free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ, **stack.env,
            # created paused: the test decides when each DAG may start (see the module docstring)
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
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


def _ti_states(airflow: Airflow, dag_id: str, run_id: str) -> dict[str, tuple[str | None, int]]:
    return {(f"{ti['task_id']}[{ti['map_index']}]" if ti["map_index"] >= 0 else ti["task_id"]):
            (ti["state"], ti["try_number"]) for ti in airflow.task_instances(dag_id, run_id)}


@pytest.fixture
def stack(tmp_path):
    st = h.configure_airflow(tmp_path, tag="sched", in_process=False)
    try:
        yield st
    finally:
        st.stop()
        for name in (st.meta_db, st.review_db):
            h.drop_database(name)


def test_chain_runs_by_itself_under_scheduler(stack, tmp_path):
    from moderation import quality
    from moderation.jobs import Pipeline

    pipeline = Pipeline.open(stack.settings())
    now = datetime.now(timezone.utc)
    # an index-triggered matching run matches the day before it was triggered; today too, in case the
    # test crosses midnight (UTC)
    days = [(now - timedelta(days=1)).strftime("%Y-%m-%d"), now.strftime("%Y-%m-%d")]
    data = h.make_dataset(days)
    for part in (data.references, data.background, *data.queries.values()):
        h.upload(pipeline.store, part)

    airflow = Airflow(stack, tmp_path / "logs")
    try:
        airflow.start()
        poll("the api-server", lambda: _answers(airflow), START_TIMEOUT, airflow)
        poll("the DAGs to be parsed", lambda: all(airflow.dag_exists(d) for d in CHAIN), START_TIMEOUT, airflow)

        # 1. index and matching: their cron runs for the latest tick must skip, nothing exists yet
        for dag_id in (INDEX, MATCH):
            airflow.unpause(dag_id)

        def cron_runs_done():
            runs = {d: airflow.runs(d) for d in (INDEX, MATCH)}
            return runs if all(r and all(x["state"] not in ACTIVE for x in r) for r in runs.values()) else None

        early = poll("the cron runs of index and matching", cron_runs_done, CRON_SKIP_TIMEOUT, airflow)
        early_ids = {d: {r["dag_run_id"] for r in runs} for d, runs in early.items()}
        for dag_id, runs in early.items():
            for r in runs:
                assert (r["run_type"], r["state"]) == ("scheduled", "success"), (dag_id, r)
        # they skipped: the gate that needs the prerequisite did not run
        assert _ti_states(airflow, INDEX, early[INDEX][0]["dag_run_id"])["plan"][0] == "skipped"
        assert _ti_states(airflow, MATCH, early[MATCH][0]["dag_run_id"])["check_queries"][0] == "skipped"
        assert pipeline.db.run(f"queries/{days[0]}/") is None

        # 2. one trigger, while the DAG is still paused. Once the dag-processor has parsed the DAG again it
        # counts the queued run against max_active_runs, and the scheduler then holds the cron tick back
        # until the triggered run is over: the triggered run is the one that fits and starts the chain.
        t0 = time.monotonic()
        triggered = airflow.trigger(STATS)
        assert triggered["run_type"] == "manual"
        poll("a parse of the statistics DAG after the trigger",
             lambda: _after(airflow.get(f"/api/v2/dags/{STATS}")["last_parsed_time"], triggered["queued_at"]),
             60, airflow)
        parse_wait = time.monotonic() - t0
        airflow.unpause(STATS)

        def matched():
            # a retry or a failure anywhere fails the test now, not after the chain's whole time bound
            for dag_id in CHAIN:
                for r in airflow.runs(dag_id):
                    if r["state"] in ACTIVE:
                        bad = {t: st for t, st in _ti_states(airflow, dag_id, r["dag_run_id"]).items()
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

        match_run, day = poll("the chain to reach matching", matched, CHAIN_TIMEOUT, airflow, every=2.0)
        chain_seconds = time.monotonic() - t0

        def settled():
            runs = {d: airflow.runs(d) for d in CHAIN}
            return runs if all(x["state"] not in ACTIVE for rs in runs.values() for x in rs) else None

        runs = poll("every run to finish", settled, 120, airflow)
        summary = {d: [(r["run_type"], r["state"], round(r["duration"] or 0, 1)) for r in rs] for d, rs in runs.items()}

        # every run of the three DAGs succeeded (a skipped run counts as success) and nothing was retried
        for dag_id, rs in runs.items():
            for r in rs:
                states = _ti_states(airflow, dag_id, r["dag_run_id"])
                assert r["state"] == "success", (dag_id, r["dag_run_id"], states, airflow.diagnostics())
                for task, (state, tries) in states.items():
                    assert state in ("success", "skipped"), (dag_id, r["dag_run_id"], task, state)
                    assert tries <= 1, f"{dag_id} {r['dag_run_id']} {task} needed {tries} tries"

        # statistics: the triggered run announced; the cron tick, if it ran yet, came after and found nothing new
        stats_runs = runs[STATS]
        assert [r["dag_run_id"] for r in stats_runs if r["run_type"] == "manual"] == [triggered["dag_run_id"]]
        assert {r["run_type"] for r in stats_runs} <= {"manual", "scheduled"}, summary
        announced = [r["dag_run_id"] for r in stats_runs
                     if _ti_states(airflow, STATS, r["dag_run_id"])["announce"][0] == "success"]
        assert announced == [triggered["dag_run_id"]], summary

        # index and matching after the cron skips: exactly one run each, started by the asset event
        later = {d: [r for r in runs[d] if r["dag_run_id"] not in early_ids[d]] for d in (INDEX, MATCH)}
        assert [r["run_type"] for r in later[INDEX]] == ["asset_triggered"], summary
        assert [r["run_type"] for r in later[MATCH]] == ["asset_triggered"], summary
        index_run = later[INDEX][0]
        assert match_run["dag_run_id"] == later[MATCH][0]["dag_run_id"]
        assert _ti_states(airflow, INDEX, index_run["dag_run_id"])["announce"][0] == "success"
        # the events link the runs: stats run -> index run -> matching run
        (stats_event,) = airflow.upstream_events(INDEX, index_run["dag_run_id"])
        assert (stats_event["name"], stats_event["source_dag_id"], stats_event["source_run_id"]) == \
            ("moderation_stats", STATS, triggered["dag_run_id"])
        (index_event,) = airflow.upstream_events(MATCH, match_run["dag_run_id"])
        assert (index_event["name"], index_event["source_dag_id"], index_event["source_run_id"]) == \
            ("moderation_index", INDEX, index_run["dag_run_id"])

        # the review database: a complete run of the day with the planted copies flagged
        batch = f"queries/{day}/"
        run = pipeline.db.run(batch)
        assert run is not None and run.status == "complete", run
        assert run.index_version == index_event["extra"]["index_version"]
        assert run.n_queries == len(data.queries[day])
        pairs = [(p.query_id, p.reference_id) for p in pipeline.db.pairs(run.id)]
        assert pairs, "no flagged pairs"
        d = days.index(day)
        planted = [q for q in data.truth if q.startswith(f"Q{d:02d}")]
        correct = {(q, r) for q, r in pairs if data.truth.get(q) == r}
        assert len(correct) >= len(planted) // 2, pairs
        assert not quality.is_held(pipeline.db, batch)

        print(f"\nLocalExecutor chain, trigger -> flagged pairs: {chain_seconds:.1f} s (of which waiting for the "
              f"parse before unpausing: {parse_wait:.1f} s); runs: {summary}")
    finally:
        airflow.stop()


def _after(a: str | None, b: str) -> bool:
    return a is not None and datetime.fromisoformat(a) > datetime.fromisoformat(b)


def _answers(airflow: Airflow) -> bool:
    try:
        airflow.token()
        return True
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
