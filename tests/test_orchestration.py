"""The task functions without Airflow: connections, dates, sampling, sharding, model pinning.

The flow test runs the reference-index tasks by hand, one call per task, on
the S3 server and a Postgres database (the same calls the DAG makes).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

import pytest

from moderation import orchestration as orch
from moderation.errors import ConfigError, VersionMismatchError

import airflow_harness as h
from conftest import s3_env


# -- configuration ---------------------------------------------------------------------------


def test_settings_from_connections():
    pg = {"conn_id": "moderation_db", "conn_type": "postgres", "host": "db", "port": 5432,
          "login": "mod", "password": "p@ss/word", "schema": "review", "extra": {}}
    s3 = {"conn_id": "moderation_s3", "conn_type": "aws", "login": "AK", "password": "SK",
          "extra": '{"endpoint_url": "https://minio:9000", "bucket": "moderation", "region_name": "eu-west-1"}'}
    settings = orch.settings_from_connections(pg, s3, env={"MODERATION_IMAGE_SIZE": "96"})
    assert settings.database_url == "postgresql+psycopg://mod:p%40ss%2Fword@db:5432/review"
    assert settings.store_url == "s3://moderation"
    assert (settings.s3_endpoint, settings.s3_secure, settings.s3_region) == ("minio:9000", True, "eu-west-1")
    assert (settings.s3_access_key, settings.s3_secret_key, settings.image_size) == ("AK", "SK", 96)
    plain = orch.store_settings_from_connection({"conn_type": "generic", "host": "minio", "port": 9000,
                                                 "extra": {"bucket": "b", "prefix": "/prod/"}})
    assert (plain["store_url"], plain["s3_endpoint"], plain["s3_secure"]) == ("s3://b/prod", "minio:9000", False)
    assert orch.database_url_from_connection({"conn_type": "x", "extra": {"sqlalchemy_url": "sqlite:///a.db"}}) \
        == "sqlite:///a.db"
    with pytest.raises(ConfigError, match="bucket"):
        orch.store_settings_from_connection({"conn_id": "s3", "conn_type": "aws",
                                             "extra": {"endpoint_url": "http://m:9000"}})
    with pytest.raises(ConfigError, match="review database"):
        orch.database_url_from_connection({"conn_id": "db", "conn_type": "mysql", "host": "h"})


def test_batch_dates():
    assert orch.batch_date("2026-03-01", None) == "2026-03-01"
    when = datetime(2026, 11, 30, 6, 0, tzinfo=timezone.utc)
    assert orch.batch_date("", when) == "2026-11-29"  # a scheduled run matches the day before
    assert orch.batch_date(None, when.isoformat()) == "2026-11-29"
    assert orch.batch_prefix("2026-11-29") == "queries/2026-11-29/"
    for bad in ("2026-13-01", "29/11/2026", "2026-11-29/../x"):
        with pytest.raises((ConfigError, ValueError)):
            orch.batch_prefix(orch.batch_date(bad, None))


def test_sampling_is_deterministic_and_stable():
    keys = [f"background/B{i:05d}.jpg" for i in range(1000)]
    a = orch.sample_keys(keys, 100, seed=1)
    assert a == orch.sample_keys(list(reversed(keys)), 100, seed=1) and len(a) == 100
    assert a != orch.sample_keys(keys, 100, seed=2)
    grown = orch.sample_keys(keys + [f"background/N{i:04d}.jpg" for i in range(50)], 100, seed=1)
    assert len(set(a) & set(grown)) >= 85  # adding 5% images changes about 5% of the sample
    assert orch.sample_keys(keys[:10], 100) == sorted(keys[:10])


def test_shards_partition_the_keys():
    keys = [f"references/R{i:05d}.jpg" for i in range(500)]
    n = orch.shard_count(len(keys), 120, 16)
    assert n == 5 and orch.shard_count(10, 120, 16) == 1 and orch.shard_count(10**6, 100, 16) == 16
    parts = [[k for k in keys if orch.shard_of(k, n) == i] for i in range(n)]
    assert sorted(sum(parts, [])) == keys and all(parts)
    assert orch.run_slug("manual__2026-11-30T03:00:00+00:00") .startswith("manual__2026-11-30T03_00_00_00_00-")


# -- the index tasks by hand, and model pinning -----------------------------------------------


@pytest.fixture(scope="module")
def settings(pg_url, s3_server, tmp_path_factory):
    import uuid

    from moderation.config import Settings

    env = {**s3_env(s3_server, f"orch-{uuid.uuid4().hex[:8]}"), "MODERATION_DATABASE_URL": pg_url,
           "MODERATION_HOME": str(tmp_path_factory.mktemp("home")), "MODERATION_IMAGE_SIZE": "96",
           "MODERATION_WORKERS": "0", "MODERATION_PROGRESS": "false", "MODERATION_DEVICE": "cpu"}
    settings = Settings.from_env(env)
    data = h.make_dataset(["2026-01-01"], n_refs=12, n_background=16)
    from moderation.store import open_store

    store = open_store(settings)
    h.upload(store, data.references)
    h.upload(store, data.background)
    h.upload(store, data.queries["2026-01-01"])
    # a labelled calibration set: the day's queries and their ground truth
    h.upload(store, {k.replace("queries/2026-01-01/", "calibration/queries/"): v
                     for k, v in data.queries["2026-01-01"].items()})
    rows = ["query_id,reference_id"] + [f"{q},{data.truth.get(q, '')}" for q in
                                        (k.rsplit("/", 1)[-1][:-4] for k in data.queries["2026-01-01"])]
    store.put("calibration/ground_truth.csv", ("\n".join(rows) + "\n").encode(), "text/csv")
    return settings


def test_index_tasks_pin_versions_and_refuse_mixing(settings):
    from moderation.registry import Kind

    sample = orch.sample_background(settings, sample_size=10)
    assert len(sample["keys"]) == 10 and sample["available"] == 16
    fitted = orch.fit_background_stats(settings, sample)
    assert fitted["changed"] and fitted["previous"] is None
    assert orch.fit_background_stats(settings, sample)["changed"] is False  # same data, same version

    plan = orch.plan_reference_index(settings, keys_per_shard=5)
    assert len(plan["shards"]) == 3 and plan["n_keys"] == 12
    results = [orch.embed_reference_shard(settings, s, run_id="manual__t1") for s in plan["shards"]]
    assert sum(r["keys"] for r in results) == 12 and sum(r["embedded"] for r in results) == 12
    assert sum(r["cached"] for r in results) == 0
    # The verifier's local features are computed per shard too, and only for new images.
    assert sum(r["local_features"]["computed"] for r in results) == 12
    rerun = orch.embed_reference_shard(settings, plan["shards"][0], run_id="manual__t2")
    assert rerun["cached"] == rerun["embedded"] == results[0]["embedded"]  # only new images are embedded
    assert rerun["local_features"]["computed"] == 0
    assert rerun["local_features"]["cached"] == results[0]["embedded"]
    checked = orch.check_reference_batch(settings, plan, results)
    assert checked["images"] == 12 and checked["duplicates"] == 0

    alien = [dict(results[0], model_version="another-model"), *results[1:]]
    with pytest.raises(VersionMismatchError, match="another-model"):
        orch.check_reference_batch(settings, plan, alien)
    with pytest.raises(VersionMismatchError, match="statistics"):
        orch.build_index_version(settings, dict(plan, stats_version="stale"))

    built = orch.build_index_version(settings, plan)
    assert built["changed"] and built["count"] == 12
    pinned = orch.open_pipeline(settings)
    assert pinned.current_index(pinned.current_model()).factory == "Flat"  # `auto` is recorded resolved
    from moderation.store import open_store

    store = open_store(settings)
    assert len([k for k in store.list("features/") if k.endswith(".npz")]) == 12  # none recomputed
    again = orch.build_index_version(settings, plan)
    assert (again["changed"], again["index_version"]) == (False, built["index_version"])
    calibrated = orch.calibrate_if_labelled(settings, built)
    assert calibrated["calibrated"] and calibrated["metrics"]["n_failed"] == 0
    assert orch.calibrate_if_labelled(settings, again)["calibrated"] is False  # pair already calibrated

    # a newly promoted model without an index: matching keeps serving the old chain
    p = orch.open_pipeline(settings)
    old = p.current_model()
    blob = p.registry.load(Kind.MODEL, old, "model.pt")
    newer = replace(old, version="promoted-model", source="trained", files={})
    p.registry.publish(Kind.MODEL, newer, {"model.pt": blob})
    assert p.current_model().version == "promoted-model"
    assert orch.serving_model(p).version == old.version
    embedded = orch.embed_query_batch(settings, "queries/2026-01-01/")
    assert embedded["model_version"] == old.version
    summary = orch.match_batch(settings, "queries/2026-01-01/", embedded["model_version"])
    assert (summary["model_version"], summary["index_version"]) == (old.version, built["index_version"])
    assert summary["threshold_source"] == f"calibration {calibrated['calibration_version']}"
    # the promoted model has no statistics yet: its index cannot be planned
    from moderation.errors import NotFoundError

    with pytest.raises(NotFoundError, match="no background statistics"):
        orch.plan_reference_index(settings)
    pinned = orch.open_pipeline(settings, old.version)
    assert pinned.current_model().version == old.version


def test_training_plan_from_parameters(settings):
    plan = orch.plan_training(settings, {"epochs": 2, "batch_size": 8, "generated_images": 20,
                                         "images_prefix": "references/", "augmentation": "light",
                                         "learning_rate": 0.01, "promote": False}, run_id="manual__x")
    config = plan["config"]
    assert plan["n_images"] == 12 and plan["steps"] == config["steps"] == 8  # ceil(2 * 32 / 8)
    assert (config["preset"], config["lr"], config["images_prefix"]) == ("light", 0.01, ["references/"])
    assert plan["promote"] is False and config["force_promote"] is False
    assert config["eval_size"] == 0  # 0: the trainer takes the size of the model in force
    assert orch.plan_training(settings, {"image_size": 288, "generated_images": 5})["config"]["eval_size"] == 288
    # forcing a promotion skips the comparison, never the evaluation: refused before any training
    with pytest.raises(ConfigError, match="force_promote needs a labelled validation set"):
        orch.plan_training(settings, {"force_promote": True, "validation_prefix": "validation/"})
    with pytest.raises(ConfigError, match="force_promote"):
        orch.plan_training(settings, {"force_promote": True, "validation_prefix": ""})
    assert orch.plan_training(settings, {"force_promote": True, "promote": False,
                                         "generated_images": 5})["config"]["force_promote"] is True
    capped = orch.plan_training(settings, {"epochs": 100, "max_steps": 3, "images_prefix": "none/",
                                           "generated_images": 5})
    assert capped["steps"] == 3 and capped["config"]["images_prefix"] == []
    from moderation.errors import BatchFailedError

    with pytest.raises(BatchFailedError):
        orch.plan_training(settings, {"images_prefix": "none/", "generated_images": 0})


def test_a_failed_match_try_puts_the_hold_back(settings):
    """A try that fails after placing its 'pending' hold must not hide or strand the day."""
    from moderation import quality
    from moderation.errors import BatchFailedError

    p = orch.open_pipeline(settings)
    served = orch.serving_model(p).version
    day = "queries/2026-01-05/"
    h.upload(p.store, {f"{day}broken{i}.jpg": b"not an image" for i in range(4)})
    with pytest.raises(BatchFailedError):
        orch.match_batch(settings, day, served)
    assert quality.hold_of(p.db, day) is None  # first try of the day: no hold left behind
    quality.place_hold(p.db, day, "awaiting gate")
    quality.release_hold(p.db, day, "operator")
    released = quality.hold_of(p.db, day)
    with pytest.raises(BatchFailedError):
        orch.match_batch(settings, day, served)
    assert quality.hold_of(p.db, day) == released and not quality.is_held(p.db, day)


# -- missing prerequisites: a run that came too early skips, naming the DAG to run --------------


@pytest.fixture
def empty_settings(pg_url, s3_server, s3_bucket, tmp_path):
    from moderation.config import Settings

    return Settings.from_env({**s3_env(s3_server, s3_bucket), "MODERATION_DATABASE_URL": pg_url,
                              "MODERATION_HOME": str(tmp_path), "MODERATION_DEVICE": "cpu"})


def test_index_without_statistics_names_the_statistics_dag(empty_settings):
    from moderation.errors import MissingPrerequisiteError, NotFoundError
    from moderation.registry import Kind
    from moderation.store import open_store

    with pytest.raises(MissingPrerequisiteError, match="no background statistics") as caught:
        orch.plan_reference_index(empty_settings)
    assert caught.value.producer == "background_stats_refresh"
    assert "background_stats_refresh" in str(caught.value)
    assert isinstance(caught.value, NotFoundError)  # callers catching the library's error still do
    # finding out has no side effect: no default model was registered on the way
    assert orch.Registry(open_store(empty_settings)).versions(Kind.MODEL) == []


def test_matching_without_an_index_names_the_dag_that_builds_it(empty_settings):
    from moderation.errors import MissingPrerequisiteError

    with pytest.raises(MissingPrerequisiteError) as caught:
        orch.require_serving_index(empty_settings)
    # nothing at all yet: the statistics come first, their event starts the index DAG
    assert caught.value.producer == "background_stats_refresh"
    assert "reference_index_nightly" in str(caught.value)


def test_nightly_shards_carry_only_changed_references(settings):
    """The second night: shards get only the new and changed keys, and the build reads no image."""
    from moderation.registry import Kind
    from moderation.store import open_store

    p = orch.open_pipeline(settings)
    model = orch.serving_model(p).version
    store = open_store(settings)
    plan = orch.plan_reference_index(settings, keys_per_shard=5, model_version=model)
    assert (plan["n_keys"], plan["n_changed"], len(plan["shards"])) == (12, 0, 1)
    idle = orch.embed_reference_shard(settings, plan["shards"][0], run_id="manual__n1")
    assert (idle["keys"], idle["embedded"]) == (0, 0)
    checked = orch.check_reference_batch(settings, plan, [idle])
    assert checked["images"] == 0
    assert orch.build_index_version(settings, plan, checked)["changed"] is False

    keys = sorted(store.list("references/"))
    store.put("references/R9999.jpg", store.get("background/B0000.jpg"))
    store.put(keys[0], store.get("background/B0001.jpg"))
    store.delete(keys[1])
    plan = orch.plan_reference_index(settings, keys_per_shard=1, model_version=model)
    assert (plan["n_keys"], plan["n_changed"], len(plan["shards"])) == (12, 2, 2)
    shards = [orch.embed_reference_shard(settings, s, run_id="manual__n2") for s in plan["shards"]]
    assert sum(s["keys"] for s in shards) == sum(s["embedded"] for s in shards) == 2
    checked = orch.check_reference_batch(settings, plan, shards)
    assert checked["images"] == 2
    built = orch.build_index_version(settings, plan, checked)
    assert built["changed"] and built["count"] == 12
    assert (built["build"], built["read"]) == ("incremental", 0)  # the shards' shas: nothing read twice
    index = p.registry.manifest(Kind.INDEX, built["index_version"], model_version=model)
    ids = set(p.load_index(index)[0].ids)
    assert "R9999" in ids and keys[1].rsplit("/", 1)[-1][:-4] not in ids


def test_matching_prerequisites_follow_the_serving_chain(settings):
    """Runs last in this file: it takes the index pointer away from the chain the tests above built."""
    from moderation.errors import MissingPrerequisiteError
    from moderation.registry import POINTER, Kind

    p = orch.open_pipeline(settings)
    served = orch.serving_model(p)
    assert served.version != p.current_model().version  # the promoted model has no index: the old one serves
    index = p.registry.current(Kind.INDEX, model_version=served.version)
    assert orch.require_serving_index(settings) == {"model_version": served.version,
                                                    "index_version": index.version}
    # statistics exist but no model has an index in force: the index DAG is the one to run
    p.store.delete(f"indexes/{served.version}/{POINTER}")
    with pytest.raises(MissingPrerequisiteError) as caught:
        orch.require_serving_index(settings)
    assert caught.value.producer == "reference_index_nightly"
    with pytest.raises(MissingPrerequisiteError):  # and nothing gets embedded for nothing
        orch.embed_query_batch(settings, "queries/2026-01-01/")

