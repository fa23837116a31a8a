"""Reference index: embed new or changed references in parallel shards, build and publish the index.

Nightly, and whenever new statistics are published (``moderation_stats``).
New or changed references are found from the object listing (size, ETag)
against the manifest of the index version in force, without reading any
image; only they go to the mapped shards, each read once, and the build
updates the previous index in place (param ``full``: read and rebuild all).
A full build (the first, ``full``, factory or statistics changed, retrain
due) is filled by mapped tasks: ``prepare_build`` trains the empty index,
each ``fill_shard`` adds one range of the kept references to a copy of it,
and ``build`` merges them in order and publishes (the same index a single
process builds); on an incremental night ``fill_shard`` maps over nothing.
Runs for one model (the triggering event's, else the current one) with the
statistics version in force for it, refuses shards embedded by another
model, gates the reference batch and the vectors, then publishes an index
version and emits ``moderation_index`` carrying the versions. When a
labelled set exists under ``calibration/``, the new model/statistics pair is
calibrated before the event. ``retro_match`` then searches the last
MODERATION_RETRO_WINDOW_DAYS days of query batches for copies of the
references added since each was searched (their cached vectors against a
small index of the new references) and flags them into review as
retroactive pairs. Last, ``gc`` sweeps the object store (``moderation gc``:
superseded index versions, half-written publishes, failed runs' artifacts,
orphan and expired cached vectors, old evidence). A
run before the model has statistics skips (no failure, no retry) and its log
names the DAG to run first.
"""

from __future__ import annotations

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task
from airflow.sdk.exceptions import AirflowSkipException

import moderation_dag_common as common
from moderation import layout

# moderation.orchestration (torch, FAISS, great-expectations, pandas) is imported inside each task:
# the dag-processor parses this file every few minutes and must not pay for it.


@dag(
    dag_id="reference_index_nightly",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 2 * * *", timezone="UTC"),
                                 assets=common.STATS_ASSET),
    start_date=common.START_DATE,
    catchup=False,
    max_active_runs=1,
    max_active_tasks=8,
    default_args=common.DEFAULT_ARGS,
    tags=common.TAGS,
    params={
        "model_version": Param("", type="string",
                               description="Model to index for; empty: the triggering event's, else current."),
        "prefix": Param(layout.REFERENCES_PREFIX, type="string", minLength=1,
                        description="Object prefix of the reference images."),
        "keys_per_shard": Param(2000, type="integer", minimum=1, description="References per mapped task."),
        "max_shards": Param(16, type="integer", minimum=1, maximum=1024, description="Most mapped tasks."),
        "full": Param(False, type="boolean",
                      description="Read every reference and rebuild the index from every vector, instead of "
                                  "reading only what the listing shows new or changed."),
        "fill_shard_size": Param(0, type="integer", minimum=0,
                                 description="References per mapped fill task of a full build "
                                             "(0: MODERATION_INDEX_FILL_SHARD_SIZE); at most max_shards tasks."),
    },
    doc_md=__doc__,
)
def reference_index_nightly():
    @task(doc_md="Reads: model and statistics pointers, the reference listing, the manifest of the index in "
                 "force. Writes: nothing. Returns the shard specs of the new or changed references (all with "
                 "the `full` param), each pinning the model, statistics and previous index versions. No statistics "
                 "for the model yet: skips the run, naming the DAG to run.")
    def plan(params=None, triggering_asset_events=None):
        from moderation import orchestration

        model = (common.version_from_events(triggering_asset_events, common.STATS_ASSET)
                 or params["model_version"] or None)
        planned = common.no_retry(orchestration.plan_reference_index, common.settings(),
                                  prefix=params["prefix"], keys_per_shard=params["keys_per_shard"],
                                  max_shards=params["max_shards"], model_version=model,
                                  full=bool(params.get("full", False)))
        return planned["shards"]

    @task(doc_md="Mapped, one per shard. Reads: the shard's new or changed references, once each. Writes: its "
                 "quality profile and the shas it read (quality/profiles/references/RUN/), new vectors in "
                 "embeddings/MODEL/references/, PDQ hashes, local features. "
                 "Gate: embeddings (dimension, unit norm, finite).")
    def embed_shard(shard: dict, run_id=None):
        from moderation import orchestration

        return common.no_retry(orchestration.embed_reference_shard, common.settings(), shard, run_id=run_id)

    @task(doc_md="Reads: every shard's profile. Gate: decode failure rate, image sizes, duplicates "
                 "by sha256 over the whole reference set; refuses shards of another model.")
    def check_references(planned: list, shards):
        from moderation import orchestration

        results = [shards[i] for i in range(len(shards))]  # indexed: no probe past the last shard
        return common.no_retry(orchestration.check_reference_batch, common.settings(), planned[0], results)

    @task(doc_md="Reads: the reference listing, the previous index's manifest, the shards' shas, the vector "
                 "cache's manifests (an image only if a cache lacks it), the pinned statistics. Decides the build: "
                 "unchanged, incremental (the previous index is updated in place by `build`) or full (first "
                 "build, `full`, factory or statistics changed, retrain due). Writes: "
                 "staging/index-fill/MODEL/RUN/prepared.json and, for a full build, the trained empty index "
                 "(template, trained on a sample streamed from the vector cache). Returns one fill spec per "
                 "range of the kept references (none unless full).")
    def prepare_build(planned: list, checked: dict, params=None, run_id=None):
        from moderation import orchestration

        return common.no_retry(orchestration.prepare_index_build, common.settings(), planned[0], checked,
                               run_id=run_id, fill_shard_size=int(params.get("fill_shard_size") or 0),
                               max_fill_shards=params["max_shards"])

    @task(doc_md="Mapped, one per fill range of a full build (none on an incremental night). Reads: the range's "
                 "references and the template from staging, their vectors from the vector cache a part at a time. "
                 "Writes: the range's filled copy of the template, staging/index-fill/MODEL/RUN/shard-N.*.")
    def fill_shard(spec: dict):
        from moderation import orchestration

        return common.no_retry(orchestration.fill_index_shard, common.settings(), spec)

    # Runs when the fill mapped over nothing (an incremental night: that task is skipped), not after a failure.
    @task(trigger_rule="none_failed_min_one_success",
          doc_md="Reads: the staged preparation and fill shards (merged in range order), or the previous "
                 "index to update in place. Writes: indexes/MODEL/INDEX/ then indexes/MODEL/CURRENT (only if "
                 "changed), an index_versions row, then deletes the run's staging objects. The pointer moves "
                 "last: a failure, here or in a fill task, leaves the previous index in force.")
    def build(planned: list, run_id=None):
        from moderation import orchestration

        return common.no_retry(orchestration.publish_index_build, common.settings(), planned[0], run_id=run_id)

    @task(doc_md="Reads: calibration/ground_truth.csv and calibration/queries/ if present. Writes: "
                 "calibrations/MODEL/STATS/CAL and a calibrations row for a new model/statistics pair.")
    def calibrate(built: dict):
        from moderation import orchestration

        return common.no_retry(orchestration.calibrate_if_labelled, common.settings(), built)

    @task(doc_md="Reads: the new and previous index versions' id lists, the cached query vectors and query "
                 "lists (runs/BATCH/queries.json) of the last MODERATION_RETRO_WINDOW_DAYS days' batches. "
                 "Writes: each batch's retroactive run retro/BATCH (match_runs.retro_of) with the pairs whose "
                 "reference was added since the batch was searched, add-only. Runs after the build and "
                 "calibration are published; returns what it searched and the batches it skipped.")
    def retro_match(built: dict, calibrated: dict):
        from moderation import orchestration

        return common.no_retry(orchestration.retro_match_new_references, common.settings(), built)

    @task(outlets=[common.INDEX_ASSET],
          doc_md="Emits moderation_index {model_version, stats_version, index_version} when a new "
                 "index version was published; skipped when the reference set did not change.")
    def announce(built: dict, calibrated: dict, outlet_events=None):
        if not built["changed"]:
            raise AirflowSkipException(f"index {built['index_version']} unchanged: no event")
        outlet_events[common.INDEX_ASSET].extra = {
            k: built[k] for k in ("model_version", "stats_version", "index_version", "count")}
        return built

    @task(doc_md="Reads: registry pointers and manifests, embeddings/, runs/, match runs and flagged pairs. "
                 "Writes: deletions only (`moderation gc`): superseded index/statistics versions, half-written "
                 "version folders, failed runs' artifacts, cache parts without a manifest, query vectors and "
                 "evidence past retention; nothing younger than MODERATION_GC_GRACE_HOURS, nothing in use. "
                 "Runs after a successful build, so tonight's index counts among the kept versions.")
    def gc(calibrated: dict):
        from moderation import orchestration

        return common.no_retry(orchestration.collect_garbage, common.settings())

    planned = plan()
    shards = embed_shard.expand(shard=planned)
    checked = check_references(planned, shards)
    fills = prepare_build(planned, checked)
    filled = fill_shard.expand(spec=fills)
    built = build(planned)
    filled >> built
    calibrated = calibrate(built)
    announce(built, calibrated)
    retro_match(built, calibrated)
    gc(calibrated)


reference_index_nightly()
