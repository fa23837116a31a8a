"""The asset chain under a real scheduler: statistics -> index -> matching, started by one trigger.

Real ``airflow api-server``, ``airflow dag-processor`` and ``airflow scheduler`` subprocesses (with
LocalExecutor, then with CeleryExecutor and an ``airflow celery worker`` on the local Redis) on a fresh
Postgres metadata database, the review database in Postgres and ``moto_server`` behind the harness
proxy. The test triggers ``background_stats_refresh`` once through the REST API; the index and matching
runs must be started by the scheduler from the asset events (see ``airflow_scheduler.run_chain``).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

import airflow_harness as h
from airflow_scheduler import EXECUTORS, INDEX, MATCH, STATS, Airflow, run_chain, ti_states

pytestmark = [pytest.mark.airflow, pytest.mark.slow]


@pytest.fixture
def stack(tmp_path):
    st = h.configure_airflow(tmp_path, tag="sched", in_process=False)
    try:
        yield st
    finally:
        st.stop()
        for name in (st.meta_db, st.review_db):
            h.drop_database(name)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_chain_runs_by_itself_under_scheduler(stack, tmp_path, executor):
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

    airflow = Airflow(stack, tmp_path / "logs", executor)
    try:
        chain = run_chain(airflow, pipeline)
        early, early_ids, runs, triggered = chain.early, chain.early_ids, chain.runs, chain.triggered
        match_run, day = chain.match_run, chain.day
        assert triggered["run_type"] == "manual"
        for dag_id, rs in early.items():
            for r in rs:
                assert (r["run_type"], r["state"]) == ("scheduled", "success"), (dag_id, r)
        # the cron runs skipped: the gate that needs the prerequisite did not run
        assert ti_states(airflow, INDEX, early[INDEX][0]["dag_run_id"])["plan"][0] == "skipped"
        assert ti_states(airflow, MATCH, early[MATCH][0]["dag_run_id"])["check_queries"][0] == "skipped"
        summary = {d: [(r["run_type"], r["state"], round(r["duration"] or 0, 1)) for r in rs] for d, rs in runs.items()}

        # every run of the three DAGs succeeded (a skipped run counts as success) and nothing was retried
        for dag_id, rs in runs.items():
            for r in rs:
                states = ti_states(airflow, dag_id, r["dag_run_id"])
                assert r["state"] == "success", (dag_id, r["dag_run_id"], states, airflow.diagnostics())
                for task, (state, tries) in states.items():
                    assert state in ("success", "skipped"), (dag_id, r["dag_run_id"], task, state)
                    assert tries <= 1, f"{dag_id} {r['dag_run_id']} {task} needed {tries} tries"

        # statistics: the triggered run announced; the cron tick, if it ran yet, came after and found nothing new
        stats_runs = runs[STATS]
        assert [r["dag_run_id"] for r in stats_runs if r["run_type"] == "manual"] == [triggered["dag_run_id"]]
        assert {r["run_type"] for r in stats_runs} <= {"manual", "scheduled"}, summary
        announced = [r["dag_run_id"] for r in stats_runs
                     if ti_states(airflow, STATS, r["dag_run_id"])["announce"][0] == "success"]
        assert announced == [triggered["dag_run_id"]], summary

        # index and matching after the cron skips: exactly one run each, started by the asset event
        later = {d: [r for r in runs[d] if r["dag_run_id"] not in early_ids[d]] for d in (INDEX, MATCH)}
        assert [r["run_type"] for r in later[INDEX]] == ["asset_triggered"], summary
        assert [r["run_type"] for r in later[MATCH]] == ["asset_triggered"], summary
        index_run = later[INDEX][0]
        assert match_run["dag_run_id"] == later[MATCH][0]["dag_run_id"]
        assert ti_states(airflow, INDEX, index_run["dag_run_id"])["announce"][0] == "success"
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

        print(f"\n{executor} chain, trigger -> flagged pairs: {chain.chain_seconds:.1f} s (of which waiting for "
              f"the parse before unpausing: {chain.parse_wait:.1f} s); runs: {summary}")
    finally:
        airflow.stop()
