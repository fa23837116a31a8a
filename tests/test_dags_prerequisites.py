"""A run that comes before its prerequisite skips cleanly: no failed try, no retry, a log naming the DAG to run.

Real Airflow (``dag.test()``) against an empty bucket and a fresh review
database: the index DAG before any statistics exist, the matching DAG before
any index exists (a new installation, where both run on their cron).
"""

from __future__ import annotations

import json
import logging
import os
from datetime import timedelta

import pytest

import airflow_harness as h

pytestmark = [pytest.mark.airflow, pytest.mark.slow]

# The task that checks the prerequisite, and the DAG its skip message names.
CHECKS = {"reference_index_nightly": ("plan", "background_stats_refresh"),
          "query_matching_daily": ("check_queries", "background_stats_refresh")}


@pytest.fixture(scope="module")
def empty(tmp_path_factory):
    stack = h.session_stack(tmp_path_factory.mktemp("airflow"))
    review_db = f"af_empty_{os.getpid()}"
    s3 = {"conn_type": "aws", "login": h.ACCESS_KEY, "password": h.SECRET_KEY,
          "extra": {"endpoint_url": f"http://127.0.0.1:{stack.proxy.port}", "bucket": f"empty-{os.getpid()}",
                    "region_name": "us-east-1"}}
    h.create_database(review_db)
    with h.environment(stack):
        # the DAGs read these two connections: a new installation with nothing published yet
        os.environ["AIRFLOW_CONN_MODERATION_DB"] = h.pg_url(review_db, "postgres")
        os.environ["AIRFLOW_CONN_MODERATION_S3"] = json.dumps(s3)
        dags = h.load_dags()
        for dag_id, (check, _) in CHECKS.items():
            # were the check to fail instead of skipping, its retries should not make the test wait minutes
            task = dags[dag_id].get_task(check)
            task.retry_delay, task.retry_exponential_backoff = timedelta(seconds=1), 0
        yield dags
    h.drop_database(review_db)


# Trigger rules under which a task whose upstream tasks were all skipped is skipped too. all_success is
# the default; none_failed_min_one_success lets the index build run after a fill mapped over nothing
# (an incremental night) and still needs one upstream success, which a skipped run never has.
SKIP_CARRYING = {"all_success", "none_failed_min_one_success"}


def test_the_skip_reaches_every_downstream_task(empty):
    """Every downstream task's trigger rule carries the first task's skip through the run."""
    for dag_id, (check, _) in CHECKS.items():
        dag = empty[dag_id]
        downstream = dag.get_task(check).get_flat_relatives(upstream=False)
        assert downstream, dag_id
        assert {str(getattr(t.trigger_rule, "value", t.trigger_rule)) for t in downstream} <= SKIP_CARRYING, dag_id


@pytest.mark.parametrize("dag_id", list(CHECKS))
def test_a_run_before_its_prerequisite_skips_and_names_the_dag_to_run(empty, dag_id, caplog):
    check, producer = CHECKS[dag_id]
    with caplog.at_level(logging.WARNING):
        dr, states, _ = h.run_dag(empty[dag_id])
    assert dr.state == "success", states
    assert states[check] == ("skipped", 1), states  # one try, not a failure waiting for its retries
    downstream = {t.task_id for t in empty[dag_id].get_task(check).get_flat_relatives(upstream=False)}
    assert {k.split("[")[0] for k, (state, _) in states.items() if state == "skipped"} == {check, *downstream}
    assert all(state in ("success", "skipped") for state, _ in states.values()), states
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(f"Run the DAG {producer} first" in m for m in warnings), warnings
