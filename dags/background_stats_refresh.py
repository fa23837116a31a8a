"""Background statistics: sample the background set, fit whitening + SN background, publish.

Runs weekly, and whenever a model is promoted (``moderation_model`` asset).
Emits ``moderation_stats`` carrying ``model_version`` and ``stats_version``
when a new statistics version was published, which rebuilds the index.
"""

from __future__ import annotations

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task
from airflow.sdk.exceptions import AirflowSkipException

import moderation_dag_common as common
from moderation import layout

# moderation.orchestration (torch, FAISS, great-expectations, pandas) is imported inside each task:
# the dag-processor parses this file every few minutes and must not pay for it.


@dag(
    dag_id="background_stats_refresh",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 1 * * 0", timezone="UTC"),
                                 assets=common.MODEL_ASSET),
    start_date=common.START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=common.DEFAULT_ARGS,
    tags=common.TAGS,
    params={
        "model_version": Param("", type="string",
                               description="Model to fit for; empty: the promoted model of the triggering "
                                           "event, else the current model."),
        "prefix": Param(layout.BACKGROUND_PREFIX, type="string", minLength=1,
                        description="Object prefix of the background images."),
        "sample_size": Param(5000, type="integer", minimum=10, maximum=1_000_000,
                             description="Background images sampled (deterministically) for the fit."),
        "seed": Param(0, type="integer", minimum=0, description="Sampling seed."),
    },
    doc_md=__doc__,
)
def background_stats_refresh():
    @task(doc_md="Reads: the model pointer (or the triggering event's model), the listing of the "
                 "background prefix. Writes: nothing. Returns the model version and the sampled keys.")
    def sample(params=None, triggering_asset_events=None):
        from moderation import orchestration

        model = (common.version_from_events(triggering_asset_events, common.MODEL_ASSET)
                 or params["model_version"] or None)
        return common.no_retry(orchestration.sample_background, common.settings(), prefix=params["prefix"],
                               sample_size=params["sample_size"], seed=params["seed"], model_version=model)

    @task(doc_md="Reads: the sampled background images, the model. Writes: new vectors to "
                 "embeddings/MODEL/references/, stats/MODEL/STATS/ + stats/MODEL/CURRENT when the fit changed, "
                 "a stats_versions row. Gate: embeddings (dimension, unit norm, finite).")
    def fit(sampled: dict):
        from moderation import orchestration

        return common.no_retry(orchestration.fit_background_stats, common.settings(), sampled)

    @task(outlets=[common.STATS_ASSET],
          doc_md="Emits moderation_stats {model_version, stats_version} when a new version was "
                 "published; skipped (no event) when the statistics did not change.")
    def announce(fitted: dict, outlet_events=None):
        if not fitted["changed"]:
            raise AirflowSkipException(f"statistics {fitted['stats_version']} unchanged: no event")
        outlet_events[common.STATS_ASSET].extra = {
            "model_version": fitted["model_version"], "stats_version": fitted["stats_version"]}
        return fitted

    announce(fit(sample()))


background_stats_refresh()
