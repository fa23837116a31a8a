"""Daily matching: gate and embed a day's queries, match them, gate the flagged pairs.

Runs at 06:00 UTC and whenever a new reference index is published
(``moderation_index``), so a promotion's rebuild ends in a matching run with
the new model without waiting for the next morning. The day's queries live
under ``queries/YYYY-MM-DD/``. A run matches the day before its date (a
cron run's logical date; an index-triggered run has none and matches the day
before it was triggered); the ``date`` parameter selects another day (late
data). Matching uses the newest model whose index is published
and pins its model, statistics, index and calibration. Re-running a day
replaces that day's match run (no duplicate pairs). The day's pairs stay
held back from review until the flagged-pairs gate passes; a spike keeps
them held until an operator releases them (rerun with ``release_hold``).
Before any model has a reference index, a run skips (no failure, no retry)
and its log names the DAG to run first; a day with no query images skips the
same way (rerun with ``date`` when they arrive).
"""

from __future__ import annotations

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

import moderation_dag_common as common

# moderation.orchestration (torch, FAISS, great-expectations, pandas) is imported inside each task:
# the dag-processor parses this file every few minutes and must not pay for it.


@dag(
    dag_id="query_matching_daily",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 6 * * *", timezone="UTC"),
                                 assets=common.INDEX_ASSET),
    start_date=common.START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=common.DEFAULT_ARGS,
    tags=common.TAGS,
    params={
        "date": Param("", type="string", pattern=r"^(\d{4}-\d{2}-\d{2})?$",
                      description="Day to match (YYYY-MM-DD); empty: the day before the run's date."),
        "release_hold": Param(False, type="boolean",
                              description="Operator override: let the day's flagged pairs into review "
                                          "even if the flagged-pairs gate fails (recorded)."),
    },
    doc_md=__doc__,
)
def query_matching_daily():
    @task(doc_md="Reads: the date parameter, else the run's logical date (cron) or the time it was "
                 "triggered (index event). Returns the batch prefix queries/DATE/ of the day before.")
    def resolve_batch(params=None, logical_date=None, dag_run=None):
        from moderation import orchestration

        # Asset-triggered runs have no logical date in Airflow 3, only run_after.
        when = logical_date or getattr(dag_run, "run_after", None)
        return common.no_retry(lambda: orchestration.batch_prefix(orchestration.batch_date(params["date"], when)))

    @task(doc_md="Reads: the registry pointers (no model with a reference index yet: skips the run, naming "
                 "the DAG to run), the day's query images. Writes: quality/profiles/queries/DATE.csv. Gate: "
                 "decode failure rate, image sizes, duplicates by sha256.")
    def check_queries(batch: str):
        from moderation import orchestration

        settings = common.settings()
        common.no_retry(orchestration.require_serving_index, settings)
        return common.no_retry(orchestration.check_query_batch, settings, batch)

    @task(doc_md="Reads: the day's queries, the serving model (newest with an index). Writes: new vectors "
                 "in embeddings/MODEL/queries/. Gate: embeddings (dimension, unit norm, finite).")
    def embed_queries(batch: str, checked: dict):
        from moderation import orchestration

        return common.no_retry(orchestration.embed_query_batch, common.settings(), batch)

    @task(doc_md="Reads: queries (vectors from the cache), the pinned model/statistics/index/calibration. "
                 "Writes: runs/DAY/ artifacts, the day's match_runs row, and on completion, in one "
                 "transaction, its flagged_pairs (a rerun replaces them) and a pending hold on the day.")
    def match(batch: str, embedded: dict):
        from moderation import orchestration

        return common.no_retry(orchestration.match_batch, common.settings(), batch, embedded["model_version"])

    @task(outlets=[common.MATCH_ASSET],
          doc_md="Reads: the day's flagged pairs and earlier runs' counts. Gate: score ranges, ranks, "
                 "unique pairs, count vs trailing mean. Writes: releases the hold, or keeps it 'held' and "
                 "fails. Emits moderation_match_runs {batch, run_id, flagged}.")
    def gate_flagged(batch: str, matched: dict, params=None, dag_run=None, outlet_events=None):
        from moderation import orchestration

        who = f"airflow:{dag_run.run_id}" if dag_run is not None else "airflow"
        out = common.no_retry(orchestration.gate_flagged_batch, common.settings(), batch,
                              release=bool(params["release_hold"]), released_by=who)
        outlet_events[common.MATCH_ASSET].extra = {
            "batch": batch, "run_id": matched["run_id"], "flagged": out["flagged"],
            "model_version": matched["model_version"], "index_version": matched["index_version"]}
        return out

    batch = resolve_batch()
    embedded = embed_queries(batch, check_queries(batch))
    gate_flagged(batch, match(batch, embedded))


query_matching_daily()
