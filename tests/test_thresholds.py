"""Without a calibration a match run flags at a threshold fitted for its score, or flags nothing and
says so (moderation.thresholds); it never falls back to a fixed number of unknown precision.

Real runs on Postgres and the local-folder store (default model, generated images); the choice
itself on real registry records.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math

import pytest
from review_support import fresh_pg_database, local_pipeline, settings_from, torch_single_thread  # noqa: F401
from sqlalchemy import text

from moderation.config import Settings
from moderation.embedding import FolderSource
from moderation.model_versions import shipped_default
from moderation.registry import Calibration, ModelVersion, StatsVersion
from moderation.thresholds import choose, model_calibrations
from moderation.two_stage import TwoStageConfig

BATCH = "queries/2026-02-01"


def _matching(**overrides) -> dict:
    return TwoStageConfig.from_settings(Settings.from_env({}, **overrides)).as_dict()


GLOBAL, TWO_STAGE = _matching(verify=False, views="full"), _matching()


def _stats(postprocess: str) -> StatsVersion:
    return StatsVersion("s1", "m", postprocess, 512, 512, 100)


def test_no_threshold_applies_without_a_calibration_for_the_score(caplog):
    model = ModelVersion("imported", "resnet50", 512, 320, "square", "torchscript-import")
    with caplog.at_level(logging.WARNING):
        chosen = choose(0.0, TWO_STAGE, model, _stats("whiten"), None)
    assert chosen.value is None and not chosen.flags
    assert chosen.source.startswith("no threshold: no calibration of model imported")
    assert "NOTHING IS FLAGGED" in caplog.text and "moderation calibrate" in caplog.text
    assert choose(0.31, TWO_STAGE, model, _stats("whiten"), None).value == 0.31  # the operator's own choice


def test_a_threshold_that_ships_with_the_model_applies_only_to_its_own_score():
    entry = {"matching": GLOBAL, "postprocess": "whiten", "threshold": 0.42, "high_threshold": 0.6,
             "combiner": {}, "fitted_on": "a labelled set"}
    model = ModelVersion("m", "mobilenet_v2", 512, 224, "square", "trained", info={"calibrations": [entry]})
    chosen = choose(0.0, GLOBAL, model, _stats("whiten"), None)
    assert (chosen.value, chosen.high) == (0.42, 0.6)
    assert chosen.source == "model m manifest (a labelled set)"
    # Another score (two-stage fused), another post-processing: not that threshold's scale.
    assert choose(0.0, TWO_STAGE, model, _stats("whiten"), None).value is None
    assert choose(0.0, GLOBAL, model, _stats("center"), None).value is None
    # A calibration of the deployment's own (model, statistics) pair comes first.
    own = Calibration("c9", "m", "s1", 0.5, 0.9, matching=GLOBAL)
    assert choose(0.0, GLOBAL, model, _stats("whiten"), own).source == "calibration c9"


def test_the_shipped_default_brings_a_global_stage_threshold_fitted_on_other_queries():
    record, _ = shipped_default()
    entries = model_calibrations(record)
    glob = next(c for c in entries if c["stage"] == "global")
    assert glob["postprocess"] == "whiten" and "bench-dev/extra" in glob["fitted_on"]
    assert glob["target_reached"] and 0.0 < glob["threshold"] < 1.0
    chosen = choose(0.0, GLOBAL, record, _stats("whiten"), None)
    assert chosen.value == glob["threshold"] and chosen.source.startswith(f"model {record.version} manifest")
    # Registered before the manifest listed calibrations: the packaged manifest of the same version.
    older = ModelVersion(record.version, record.backbone, record.dim, record.image_size, record.resize_mode,
                         "shipped-default", metrics=record.metrics, threshold=record.threshold,
                         info={k: v for k, v in record.info.items() if k != "calibrations"})
    assert model_calibrations(older) == entries
    other = ModelVersion("other-version", "mobilenet_v2", 512, 224, "square", "shipped-default")
    assert model_calibrations(other) == []


def _run_files(p, batch):
    folder = next(k.rsplit("/", 1)[0] for k in p.store.list("runs/") if k.endswith("/matching.json"))
    return (json.loads(p.store.get(f"{folder}/matching.json")),
            list(csv.DictReader(io.StringIO(p.store.get(f"{folder}/candidates.csv").decode()))))


def test_an_uncalibrated_two_stage_run_flags_nothing_and_records_why(tmp_path, caplog):
    from moderation import orchestration
    from moderation.jobs import Pipeline, run_matching

    with fresh_pg_database() as url:
        # The descriptor's threshold alone: PDQ has a fixed bar of its own and may still flag (test_pdq_e2e).
        env, samples = local_pipeline(tmp_path / "home", url, MODERATION_PDQ="false")
        settings = settings_from(env)
        p = Pipeline.open(settings)
        try:
            with caplog.at_level(logging.WARNING):
                summary = run_matching(p, FolderSource(samples.queries), BATCH)
            assert summary.n_flagged == 0 and summary.threshold is None
            assert summary.threshold_source.startswith("no threshold")
            assert "NOTHING IS FLAGGED" in caplog.text
            with p.db.engine.connect() as conn:
                row = conn.execute(text("SELECT status, n_flagged, threshold FROM match_runs WHERE batch = :b"),
                                   {"b": BATCH}).one()
            assert (row.status, row.n_flagged, row.threshold) == ("complete", 0, math.inf)
            matching, cands = _run_files(p, BATCH)
            assert matching["threshold"] is None and matching["threshold_source"] == summary.threshold_source
            assert len(cands) == summary.n_candidates > 0  # every candidate is kept for a later rerun
            gate = orchestration.gate_flagged_batch(settings, BATCH)
            assert gate["passed"] and gate["flagged"] == 0
            # The operator's explicit threshold flags the same candidates.
            p.settings = settings.with_overrides(threshold=-10.0, evidence=False)
            assert run_matching(p, FolderSource(samples.queries), BATCH).n_flagged == summary.n_candidates
        finally:
            p.db.engine.dispose()


def test_an_uncalibrated_global_stage_run_flags_at_the_shipped_threshold(tmp_path):
    from moderation.jobs import Pipeline, build_reference_index, refresh_stats, run_matching

    with fresh_pg_database() as url:
        env, samples = local_pipeline(tmp_path / "home", url, MODERATION_VERIFY="false", MODERATION_VIEWS="full",
                                      MODERATION_POSTPROCESS="whiten", MODERATION_PDQ="false")
        p = Pipeline.open(settings_from(env))
        try:
            refresh_stats(p, FolderSource(samples.background))  # whitening, as the shipped threshold was fitted
            build_reference_index(p, FolderSource(samples.references))
            summary = run_matching(p, FolderSource(samples.queries), BATCH)
            shipped = next(c for c in model_calibrations(p.current_model()) if c["stage"] == "global")
            assert summary.threshold == pytest.approx(shipped["threshold"])
            assert summary.threshold_source.startswith("model ") and "bench-dev/extra" in summary.threshold_source
            _, cands = _run_files(p, BATCH)
            expected = sum(1 for c in cands if float(c["score"]) >= shipped["threshold"] - 5e-7)
            assert summary.n_flagged == expected
        finally:
            p.db.engine.dispose()
