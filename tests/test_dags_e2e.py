"""End to end on real Airflow (``dag.test()``), Postgres and an S3 server on loopback.

Statistics -> index -> matching in order; a forced failure of the index
publish is retried without a partial publish; matching the same day again
replaces its run; retraining with a tiny CPU configuration publishes and
promotes a model, and the promotion queues the statistics and index rebuild
before matching uses the new model.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

import airflow_harness as h

pytestmark = [pytest.mark.airflow, pytest.mark.slow]

DAY = "2026-11-28"
FIGURES: dict[str, float] = {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with h.environment(h.session_stack(tmp_path_factory.mktemp("airflow"))) as st:
        yield st


@pytest.fixture(scope="module")
def dags(stack):
    return h.load_dags()


@pytest.fixture(scope="module")
def pipeline(stack):
    from moderation.jobs import Pipeline

    return Pipeline.open(stack.settings())


@pytest.fixture(scope="module")
def data(stack, pipeline):
    ds = h.make_dataset([DAY])
    for part in (ds.references, ds.background, ds.queries[DAY]):
        h.upload(pipeline.store, part)
    return ds


def _fast_retries(dag, *task_ids):
    for task_id in task_ids:
        task = dag.get_task(task_id)
        task.retry_delay = timedelta(seconds=1)
        task.retry_exponential_backoff = 0


def _pairs(pipeline, batch):
    run = pipeline.db.run(batch)
    return run, [(p.id, p.query_id, p.reference_id) for p in pipeline.db.pairs(run.id)]


def test_stats_index_matching_retry_and_rerun(stack, dags, pipeline, data):
    from moderation import quality
    from moderation.registry import Kind

    # 1. statistics
    dr, states, secs = h.run_dag(dags["background_stats_refresh"])
    FIGURES["background_stats_refresh"] = secs
    assert dr.state == "success", states
    model = pipeline.registry.current(Kind.MODEL)
    stats = pipeline.registry.current(Kind.STATS, model_version=model.version)
    assert stats.n_background == len(data.background)
    assert h.asset_events("moderation_stats")[-1] == {"model_version": model.version,
                                                      "stats_version": stats.version}
    assert h.queued_runs("reference_index_nightly") == ["moderation_stats"]  # the event queues the index

    # 2. index, with the pointer PUT refused (503) until the first attempt of `build` fails
    index_dag = dags["reference_index_nightly"]
    _fast_retries(index_dag, "build")
    fault = stack.proxy.fail("PUT", rf"/{h.BUCKET}/indexes/{model.version}/CURRENT$", times=3)
    dr, states, secs = h.run_dag(index_dag, conf={"keys_per_shard": 8, "fill_shard_size": 8})
    FIGURES["reference_index_nightly"] = secs
    assert dr.state == "success", states
    assert len(fault.hits) == 3, "the injected failure never happened"
    assert states["build"] == ("success", 2), states  # failed once, the retry finished the run
    assert sum(1 for k in states if k.startswith("embed_shard[")) == 3  # 20 refs / 8 per shard
    # the first build is full: its index was filled by 3 mapped tasks (20 refs / 8), merged by the build
    assert sorted(k for k in states if k.startswith("fill_shard[")) == [f"fill_shard[{i}]" for i in range(3)]
    assert all(states[f"fill_shard[{i}]"][0] == "success" for i in range(3)), states
    assert not list(pipeline.store.list("staging/"))  # the build removed its staging once published
    assert states["gc"] == ("success", 1), states  # the store sweep ran (nothing is past its grace period)
    index = pipeline.registry.current(Kind.INDEX, model_version=model.version)
    assert (index.count, index.stats_version, index.info["build"]) == (len(data.references), stats.version, "full")
    for name in ("index.faiss", "ids.json", "locations.json"):  # complete and intact (sha256 checked)
        assert pipeline.registry.load(Kind.INDEX, index, name)
    published = pipeline.registry.versions(Kind.INDEX, model_version=model.version)
    assert all(pipeline.store.exists(f"indexes/{model.version}/{v.version}/manifest.json") for v in published)
    assert h.asset_events("moderation_index")[-1]["index_version"] == index.version
    assert "moderation_index" in h.queued_runs("query_matching_daily")  # the new index queues matching
    with pipeline.db.session() as s:
        from sqlalchemy import text

        rows = s.execute(text("select version from index_versions")).scalars().all()
    assert rows == [index.version]  # the failed attempt recorded nothing

    # 3. matching the day
    batch = f"queries/{DAY}/"
    dr, states, secs = h.run_dag(dags["query_matching_daily"], conf={"date": DAY})
    FIGURES["query_matching_daily"] = secs
    assert dr.state == "success", states
    run, pairs = _pairs(pipeline, batch)
    assert run.status == "complete" and run.index_version == index.version
    assert run.n_queries == len(data.queries[DAY])
    assert pairs, "no flagged pairs"
    correct = {(q, r) for _, q, r in pairs if data.truth.get(q) == r}
    assert len(correct) >= len([q for q in data.truth if q.startswith("Q00")]) // 2, pairs
    assert not quality.is_held(pipeline.db, batch)
    assert quality.hold_of(pipeline.db, batch)["released_by"] == "quality-gate"

    # 4. the same day again: the run is replaced, never duplicated
    dr, states, secs = h.run_dag(dags["query_matching_daily"], conf={"date": DAY})
    assert dr.state == "success", states
    run2, pairs2 = _pairs(pipeline, batch)
    assert run2.id == run.id and sorted(pairs2) == sorted(pairs)
    with pipeline.db.session() as s:
        from sqlalchemy import text

        n_runs = s.execute(text("select count(*) from match_runs where batch = :b"), {"b": batch}).scalar()
        dupes = s.execute(text("select count(*) from (select query_id, reference_id from flagged_pairs "
                               "group by run_id, query_id, reference_id having count(*) > 1) d")).scalar()
    assert (n_runs, dupes) == (1, 0)


def test_retro_match_runs_after_publishing_and_flags_past_copies(stack, dags, pipeline, data):
    """A reference added tonight is searched in the days already matched; its copy there is flagged."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import text

    from moderation import orchestration
    from moderation.registry import Kind

    model = pipeline.registry.current(Kind.MODEL)
    batch = f"queries/{DAY}/"
    if pipeline.db.run(batch) is None:
        pytest.skip("needs the chain from test_stats_index_matching_retry_and_rerun")
    # a query of that day (a distractor nobody had indexed) becomes a reference tonight
    pipeline.store.put("references/RNEW.jpg", data.queries[DAY][f"{batch}Q00900.jpg"], "image/jpeg")
    dr, states, _ = h.run_dag(dags["reference_index_nightly"], conf={"keys_per_shard": 8, "fill_shard_size": 8})
    assert dr.state == "success", states
    assert states["retro_match"] == ("success", 1), states
    # an incremental night: the fill maps over nothing, the build updates the index in place
    assert states["fill_shard"][0] == "skipped" and not any(k.startswith("fill_shard[") for k in states), states
    assert states["build"][0] == "success", states
    with create_session() as s:
        tis = {ti.task_id: ti for ti in s.query(TaskInstance).filter(
            TaskInstance.dag_id == "reference_index_nightly", TaskInstance.run_id == dr.run_id)}
    for upstream in ("build", "calibrate"):  # it searches only once the index is published
        assert tis["retro_match"].start_date >= tis[upstream].end_date, upstream
    index = pipeline.registry.current(Kind.INDEX, model_version=model.version)
    assert pipeline.db.run(f"retro/{batch}").index_version == index.version
    with pipeline.db.session() as s:
        pairs = s.execute(text("select fp.query_id, fp.reference_id, r.batch from flagged_pairs fp "
                               "join match_runs r on r.id = fp.run_id where r.retro_of = :b"), {"b": batch}).all()
    assert ("Q00900", "RNEW", f"retro/{batch}") in pairs, pairs
    assert {r for _, r, _ in pairs} == {"RNEW"}
    assert orchestration.has_index(pipeline.registry, model.version)


LATER_DAY = "2026-11-30"  # a later day holding some of DAY's query bytes under other names


def test_matching_dag_honours_disabled_references_rejections_policies_and_hash_banks(
        stack, dags, pipeline, data, tmp_path):
    """Operators act between two days; the matching DAG's next run applies it all.

    DAY's flagged pairs give four (query, reference) pairs: the operator disables the first
    reference (CLI), a moderator rejects the second pair (the review SQL functions), the operator
    gives the third reference the suppress policy (CLI), the fourth is left alone. A partner's PDQ
    hash list (ThreatExchange's `pdq HASH` lines) is imported (CLI) with the hash of an image no
    reference resembles. LATER_DAY holds the same bytes as the four queries, renamed, and that image.
    """
    import csv
    import io
    import json

    from moderation import review
    from moderation.cli import main
    from moderation.jobs import run_folder_of
    from moderation.pdq import compute_pdq
    from local_images import textured

    batch = f"queries/{DAY}/"
    if pipeline.db.run(batch) is None:
        pytest.skip("needs the chain from test_stats_index_matching_retry_and_rerun")
    chosen, queries, refs = [], set(), set()
    for x in pipeline.db.pairs(pipeline.db.run(batch).id):  # best score first
        if x.match_source != "pdq" and x.query_id not in queries and x.reference_id not in refs:
            chosen.append(x)
            queries.add(x.query_id)
            refs.add(x.reference_id)
    assert len(chosen) >= 4, [(x.query_id, x.reference_id) for x in chosen]
    off, rejected, suppressed, plain = chosen[:4]

    assert main(["reference", "disable", off.reference_id, "--why", "takedown request", "--by", "ops"]) == 0
    assert main(["reference", "policy", suppressed.reference_id, "suppress", "--why", "a meme frame",
                 "--by", "ops"]) == 0
    review.claim_pair(pipeline.db, "mo", rejected.id)
    review.decide(pipeline.db, rejected.id, "mo", "rejected", note="same layout, different picture")
    banked = textured(7500)
    bank_file = tmp_path / "partner.txt"
    bank_file.write_text(f"pdq {compute_pdq(banked).hex()}\n")
    assert main(["pdq", "import", str(bank_file), "--bank", "partner"]) == 0

    later = f"queries/{LATER_DAY}/"
    for x in chosen[:4]:
        pipeline.store.put(f"{later}again-{x.query_id}.jpg", data.queries[DAY][f"{batch}{x.query_id}.jpg"],
                           "image/jpeg")
    buf = io.BytesIO()
    banked.save(buf, "JPEG", quality=80)
    pipeline.store.put(f"{later}banked.jpg", buf.getvalue(), "image/jpeg")
    try:
        dr, states, secs = h.run_dag(dags["query_matching_daily"], conf={"date": LATER_DAY})
        FIGURES["query_matching_daily_with_controls"] = secs
        assert dr.state == "success", states
        run = pipeline.db.run(later)
        flagged = {(x.query_id, x.reference_id): x for x in pipeline.db.pairs(run.id)}
        assert not any(r == off.reference_id for _, r in flagged), flagged  # disabled: not searched
        assert (f"again-{rejected.query_id}", rejected.reference_id) not in flagged
        assert (f"again-{suppressed.query_id}", suppressed.reference_id) not in flagged
        kept = flagged[(f"again-{plain.query_id}", plain.reference_id)]  # what no control touches
        assert kept.bank == "default" and kept.query_sha256
        hashed = flagged[("banked", f"hashbank:partner:{compute_pdq(banked).hex()}")]  # no id: the hash is it
        assert (hashed.match_source, hashed.bank) == ("pdq", "hashbank:partner")

        folder = run_folder_of(later)
        listed = {(r["query_id"], r["reference_id"]): r["reason"] for r in
                  csv.DictReader(io.StringIO(pipeline.store.get(f"{folder}/suppressed.csv").decode()))}
        assert listed == {(f"again-{rejected.query_id}", rejected.reference_id): "rejected_before",
                          (f"again-{suppressed.query_id}", suppressed.reference_id): "reference_suppressed"}
        assert off.reference_id not in pipeline.store.get(f"{folder}/candidates.csv").decode()
        matching = json.loads(pipeline.store.get(f"{folder}/matching.json"))
        assert matching["n_removed_references"] == 1 and matching["suppressed"] == {
            "rejected_before": 1, "reference_suppressed": 1}
    finally:  # the later tests match with every reference, as before
        main(["reference", "enable", off.reference_id, "--why", "takedown withdrawn", "--by", "ops"])
        main(["reference", "policy", suppressed.reference_id, "normal", "--why", "done", "--by", "ops"])


def test_query_gate_failure_is_readable_and_not_retried(stack, dags, pipeline, data):
    day = "2026-11-29"
    h.upload(pipeline.store, {f"queries/{day}/Q{i:03d}.jpg": b"not an image" for i in range(3)})
    h.upload(pipeline.store, {f"queries/{day}/Q9{i:02d}.jpg": data.references[f"references/R000{i}.jpg"]
                              for i in range(3)})
    dr, states, _ = h.run_dag(dags["query_matching_daily"], conf={"date": day})
    assert dr.state == "failed"
    assert states["check_queries"] == ("failed", 1), states  # a failed gate is not retried
    assert states["match"][0] == "upstream_failed"
    assert pipeline.db.run(f"queries/{day}/") is None


def test_a_day_without_queries_skips_without_spending_retries(stack, dags, pipeline, data):
    dr, states, _ = h.run_dag(dags["query_matching_daily"], conf={"date": "2026-10-02"})
    assert dr.state == "success", states
    assert states["check_queries"] == ("skipped", 1), states
    assert {states[t][0] for t in ("embed_queries", "match", "gate_flagged")} == {"skipped"}
    assert pipeline.db.run("queries/2026-10-02/") is None


def test_retrain_promotion_rebuilds_before_matching(stack, dags, pipeline, data, tmp_path):
    from moderation import orchestration
    from moderation.registry import Kind

    old = pipeline.registry.current(Kind.MODEL)
    if not orchestration.has_index(pipeline.registry, old.version):
        pytest.skip("needs the chain from test_stats_index_matching_retry_and_rerun")
    h.clear_queue()
    # forcing a promotion still needs a labelled validation set: the model in force carries metrics
    from test_trainer_helpers import make_validation_set

    val = make_validation_set(tmp_path / "validation")
    h.upload(pipeline.store, {f"validation/{f.relative_to(val).as_posix()}": f.read_bytes()
                              for f in val.rglob("*") if f.is_file()})
    conf = {"backbone": "mobilenet_v2", "epochs": 1, "max_steps": 2, "batch_size": 4,
            "generated_images": 8, "crop_size": 64, "projection_init": "orthogonal",
            "images_prefix": "references/", "image_size": 64,
            "validation_prefix": "validation/", "promote": True, "force_promote": True}
    t0 = time.perf_counter()
    dr, states, secs = h.run_dag(dags["sscd_retrain"], conf=conf)
    FIGURES["sscd_retrain"] = secs
    assert dr.state == "success", states
    new = pipeline.registry.current(Kind.MODEL)
    assert new.version != old.version and new.source == "trained"
    assert "uap" in new.metrics and new.image_size == 64
    assert new.info["config"]["steps"] == 2
    assert h.asset_events("moderation_model")[-1]["model_version"] == new.version
    # the promotion queued the statistics refresh (the scheduler would start it now)
    assert h.queued_runs("background_stats_refresh") == ["moderation_model"]

    # until the new model's index exists, matching keeps the old, complete chain
    p = orchestration.open_pipeline(stack.settings())
    assert orchestration.serving_model(p).version == old.version

    dr, states, _ = h.run_dag(dags["background_stats_refresh"], conf={"model_version": new.version})
    assert dr.state == "success", states
    assert h.queued_runs("reference_index_nightly") == ["moderation_stats"]
    dr, states, _ = h.run_dag(dags["reference_index_nightly"], conf={"model_version": new.version})
    assert dr.state == "success", states
    index = pipeline.registry.current(Kind.INDEX, model_version=new.version)
    assert orchestration.serving_model(p).version == new.version

    dr, states, _ = h.run_dag(dags["query_matching_daily"], conf={"date": DAY})
    assert dr.state == "success", states
    run = pipeline.db.run(f"queries/{DAY}/")
    assert (run.model_version, run.index_version) == (new.version, index.version)
    FIGURES["retrain_to_matching_total"] = time.perf_counter() - t0
    print("\nDAG wall times (s):", {k: round(v, 1) for k, v in FIGURES.items()})
