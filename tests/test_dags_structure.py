"""The DAG files parse cleanly and are wired as designed (real Airflow DagBag, no mocks)."""

from __future__ import annotations

import copy
import warnings
from datetime import datetime, timedelta, timezone

import pytest

import airflow_harness as h

pytestmark = pytest.mark.airflow

EXPECTED = {
    "background_stats_refresh": {"sample", "fit", "announce"},
    "reference_index_nightly": {"plan", "embed_shard", "check_references", "prepare_build", "fill_shard", "build",
                                "calibrate", "announce", "retro_match", "gc"},
    "query_matching_daily": {"resolve_batch", "check_queries", "embed_queries", "match", "gate_flagged"},
    "sscd_retrain": {"plan", "train_evaluate_publish", "announce"},
}


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    with h.environment(h.session_stack(tmp_path_factory.mktemp("airflow"))):
        from airflow.dag_processing.dagbag import BundleDagBag

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bag = BundleDagBag(dag_folder=str(h.REPO / "dags"), bundle_path=h.REPO / "dags",
                               bundle_name="dags-folder")
        yield bag, list(caught)


def _airflows_own(w: warnings.WarningMessage) -> bool:
    """Airflow 3.3 reading any glob ``.airflowignore`` warns about pathspec's renamed pattern class.

    That warning is raised inside Airflow for every deployment with an ignore file; it says nothing about
    our DAG files, so it alone is let through.
    """
    return "GitWildMatchPattern" in str(w.message) and ("file_discovery" in w.filename or "pathspec" in w.filename)


def test_dag_files_import_without_errors_or_warnings(bag):
    dagbag, caught = bag
    assert dagbag.import_errors == {}
    ours = [w for w in caught if not _airflows_own(w)]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
    assert not getattr(dagbag, "dag_warnings", None)
    assert set(dagbag.dags) == set(EXPECTED)


def test_tasks_retries_docs(bag):
    dagbag, _ = bag
    for dag_id, tasks in EXPECTED.items():
        dag = dagbag.dags[dag_id]
        assert set(dag.task_dict) == tasks, dag_id
        assert dag.catchup is False and dag.max_active_runs == 1, dag_id
        assert dag.doc_md, dag_id
        for task in dag.tasks:
            assert task.doc_md and ("Reads" in task.doc_md or "Emits" in task.doc_md), (dag_id, task.task_id)
            assert task.retries >= 1, (dag_id, task.task_id)
            assert task.retry_delay >= timedelta(seconds=30), (dag_id, task.task_id)
        network = [t for t in dag.tasks if t.task_id != "resolve_batch"]
        assert all(t.retry_exponential_backoff for t in network), dag_id


def test_schedules_and_asset_wiring(bag):
    dagbag, _ = bag
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    stats = dagbag.dags["background_stats_refresh"]
    index = dagbag.dags["reference_index_nightly"]
    match = dagbag.dags["query_matching_daily"]
    retrain = dagbag.dags["sscd_retrain"]

    def scheduled_on(dag):
        cond = dag.timetable.asset_condition
        members = getattr(cond, "objects", None) or [cond]
        return {m.name for m in members}

    assert isinstance(stats.timetable, AssetOrTimeSchedule) and scheduled_on(stats) == {"moderation_model"}
    assert isinstance(index.timetable, AssetOrTimeSchedule) and scheduled_on(index) == {"moderation_stats"}
    assert index.timetable.timetable.expression == "0 2 * * *"
    # matching follows a new index (a promotion's whole rebuild ends there) as well as its daily cron
    assert isinstance(match.timetable, AssetOrTimeSchedule) and scheduled_on(match) == {"moderation_index"}
    assert isinstance(match.timetable.timetable, CronTriggerTimetable)
    assert match.timetable.timetable.expression == "0 6 * * *"
    assert retrain.timetable.can_be_scheduled is False

    def outlets(dag, task_id):
        return {o.name for o in dag.get_task(task_id).outlets}

    assert outlets(retrain, "announce") == {"moderation_model"}
    assert outlets(stats, "announce") == {"moderation_stats"}
    assert outlets(index, "announce") == {"moderation_index"}
    assert outlets(match, "gate_flagged") == {"moderation_match_runs"}
    # the store sweep runs once tonight's index is built and calibrated, whether or not it changed
    assert index.get_task("gc").upstream_task_ids == {"calibrate"}
    assert index.get_task("gc").downstream_task_ids == set()
    # retroactive matching reads the published index and the calibration in force
    assert index.get_task("retro_match").upstream_task_ids == {"build", "calibrate"}
    assert index.get_task("retro_match").downstream_task_ids == set()
    # the reference shards are a mapped task
    assert type(index.get_task("embed_shard")).__name__ in ("MappedOperator", "DecoratedMappedOperator")
    # a full build's fill is mapped over prepare_build's ranges; the build merges and publishes after it, and
    # also runs when the fill mapped over nothing (an incremental night), never after a failure
    assert type(index.get_task("fill_shard")).__name__ in ("MappedOperator", "DecoratedMappedOperator")
    assert index.get_task("fill_shard").upstream_task_ids == {"prepare_build"}
    assert index.get_task("prepare_build").upstream_task_ids == {"plan", "check_references"}
    assert index.get_task("build").upstream_task_ids == {"plan", "fill_shard"}
    assert index.get_task("build").trigger_rule == "none_failed_min_one_success"


def test_matching_resolves_the_pending_day_for_every_kind_of_run(bag):
    """Cron runs have a logical date; asset-triggered runs have none, only the time they were triggered."""
    from types import SimpleNamespace

    resolve = bag[0].dags["query_matching_daily"].get_task("resolve_batch").python_callable
    six_am = datetime(2026, 11, 30, 6, 0, tzinfo=timezone.utc)
    assert resolve(params={"date": ""}, logical_date=six_am, dag_run=None) == "queries/2026-11-29/"
    triggered = SimpleNamespace(run_after=datetime(2026, 11, 30, 2, 41, tzinfo=timezone.utc))
    assert resolve(params={"date": ""}, logical_date=None, dag_run=triggered) == "queries/2026-11-29/"
    assert resolve(params={"date": "2026-11-20"}, logical_date=None, dag_run=triggered) == "queries/2026-11-20/"


def test_gpu_routing_and_params_schema(bag):
    dagbag, _ = bag
    from airflow.sdk.exceptions import ParamValidationError

    retrain = dagbag.dags["sscd_retrain"]
    train = retrain.get_task("train_evaluate_publish")
    assert (train.queue, train.pool) == ("gpu", "gpu")
    assert {t.queue for t in retrain.tasks if t is not train} == {"default"}
    expected = {"backbone", "epochs", "batch_size", "learning_rate", "entropy_weight", "augmentation",
                "images_prefix", "promote"}
    assert expected <= set(retrain.params)

    def validated(dag, conf):
        params = copy.deepcopy(dag.params)
        params.update(conf)
        return params.validate()

    assert validated(retrain, {"epochs": 2, "backbone": "resnet50", "promote": False})["epochs"] == 2
    for bad in ({"backbone": "vgg"}, {"epochs": 0}, {"batch_size": 1}, {"learning_rate": -1},
                {"augmentation": "extreme"}, {"promote": "yes"}):
        with pytest.raises(ParamValidationError):
            validated(retrain, bad)
    match = dagbag.dags["query_matching_daily"]
    index = dagbag.dags["reference_index_nightly"]
    assert validated(index, {"fill_shard_size": 8})["fill_shard_size"] == 8
    with pytest.raises(ParamValidationError):
        validated(index, {"fill_shard_size": -1})
    assert validated(match, {"date": "2026-11-29"})["date"] == "2026-11-29"
    with pytest.raises(ParamValidationError):
        validated(match, {"date": "29/11/2026"})


def test_metadata_database_serves_the_asset_graph(bag):
    """The UI's asset graph reads every DAG's dependencies with Postgres' ``#>`` JSON-path operator.

    psycopg 3 binds the path as a typed varchar (``operator does not exist: jsonb #> character
    varying``, even on an empty table); psycopg2 inlines it. Airflow's own database must use psycopg2.
    """
    from airflow.models.serialized_dag import SerializedDagModel
    from airflow.settings import engine

    assert engine.dialect.driver == "psycopg2"
    SerializedDagModel.get_dag_dependencies()
