"""Two-stage matching pieces: the per-reference merge of views, the fused calibration, settings checks."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from moderation.config import Settings
from moderation.errors import ConfigError
from moderation.index import build_index
from moderation.matching import Candidate, MatchParams, verification_csv
from moderation.statistics import l2n
from moderation.verification import Verification
from moderation.view_search import search_views


def unit(*rows):
    return l2n(np.array(rows, np.float32))


def test_views_merge_per_reference_by_best_score_and_record_the_view():
    refs = unit([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0])
    index = build_index(refs, ["A", "B", "C"])
    # query q: whole image near A, a crop exactly B; query p: only a whole view near C
    vectors = unit([0.9, 0.1, 0, 0.3], [0.05, 1, 0, 0], [0, 0, 1, 0.2])
    owner = np.array([0, 0, 1])
    cands = search_views(vectors, owner, ["full", "grid2_0", "full"], ["q", "p"], index, None, None,
                         MatchParams(k=2))
    q = [c for c in cands if c.query_id == "q"]
    assert [(c.reference_id, c.view, c.rank) for c in q] == [("B", "grid2_0", 1), ("A", "full", 2)]
    assert q[0].score == pytest.approx(float(vectors[1] @ refs[1]))
    assert len({(c.query_id, c.reference_id) for c in cands}) == len(cands)  # merged: one row per pair
    # A crop penalty lets the whole image win unless the crop is clearly better.
    penalised = search_views(vectors, owner, ["full", "grid2_0", "full"], ["q", "p"], index, None, None,
                             MatchParams(k=2), crop_penalty=0.2)
    assert [c.reference_id for c in penalised if c.query_id == "q"][0] == "A"


def test_verification_artifact_keeps_global_score_and_features():
    v = Verification(matches=40, inliers=25, verified=True, inlier_ratio=0.625, query_coverage=0.2,
                     reference_coverage=0.7, mirrored=True)
    rows = verification_csv([Candidate("q\r1", "r", 0.5, 0.93, 1, view="grid3_4", global_score=0.21, verification=v),
                             Candidate("q2", "r", 0.4, 0.1, 1, global_score=0.1)])
    import csv
    import io

    parsed = list(csv.DictReader(io.StringIO(rows, newline="")))
    assert parsed[0]["query_id"] == "q\r1" and parsed[0]["view"] == "grid3_4"
    assert parsed[0]["inliers"] == "25" and parsed[0]["verified"] == "1" and parsed[0]["mirrored"] == "True"
    assert parsed[0]["matches"] == "40" and float(parsed[0]["global_score"]) == pytest.approx(0.21)
    assert parsed[1]["verified"] == "" and parsed[1]["inliers"] == ""


def test_fused_calibration_fits_then_thresholds_the_fused_score():
    from moderation.calibration import calibrate_fused

    rng = np.random.default_rng(0)
    cands, gt = [], {}
    for i in range(120):
        q = f"q{i}"
        copy = i % 3 != 0
        gt[q] = "r0" if copy else None
        for r in range(5):
            true = copy and r == 0
            inl = int(rng.integers(20, 90)) if true and rng.random() < 0.85 else int(rng.integers(0, 6))
            v = Verification(inliers=inl, verified=inl >= 8, inlier_ratio=0.6 if inl >= 8 else 0.1,
                             reference_coverage=0.6 if inl >= 8 else 0.0, query_coverage=0.4 if inl >= 8 else 0.0)
            g = float(rng.normal(0.2 if true else 0.0, 0.1))
            cands.append(Candidate(q, f"r{r}", g, g, r + 1, global_score=g, verification=v))
    fused = calibrate_fused(cands, gt, k=5)
    assert fused.reached and all(w >= 0 for w in fused.combiner.weights)
    assert fused.metrics["uap_sn"] > 0.8 and fused.high_threshold is not None
    assert fused.high_threshold >= fused.threshold
    again = calibrate_fused(list(cands), dict(gt), k=5)
    assert again.combiner.to_dict() == fused.combiner.to_dict() and again.threshold == fused.threshold


def test_two_stage_settings_are_validated(tmp_path):
    s = Settings.from_env({"MODERATION_HOME": str(tmp_path)})
    assert s.verify and s.views.startswith("full")
    with pytest.raises(ConfigError, match="tiles"):
        Settings.from_env({"MODERATION_HOME": str(tmp_path), "MODERATION_VIEWS": "full,tiles"})
    with pytest.raises(ConfigError, match="MODERATION_LOCAL_FEATURES"):
        Settings.from_env({"MODERATION_HOME": str(tmp_path), "MODERATION_LOCAL_FEATURES": "surf"})
    off = Settings.from_env({"MODERATION_HOME": str(tmp_path), "MODERATION_VERIFY": "false"})
    assert off.verify is False


def test_a_calibration_for_other_matching_settings_is_not_used(tmp_path, caplog):
    from moderation.registry import Calibration, ModelVersion, StatsVersion
    from moderation.thresholds import choose
    from moderation.two_stage import TwoStageConfig

    settings = Settings.from_env({"MODERATION_HOME": str(tmp_path)})
    model = ModelVersion("m", "mobilenet_v2", 8, 64, "square", "torchscript-import")
    stats = StatsVersion("s", "m", "whiten", 8, 8, 10)
    wanted = TwoStageConfig.from_settings(settings).as_dict()
    good = Calibration("c1", "m", "s", 0.3, 0.9, combiner={"kind": "rule"}, matching=wanted)
    old = Calibration("c0", "m", "s", 0.4, 0.9)  # a global-stage calibration from before verification
    chosen = choose(0.0, wanted, model, stats, good)
    assert (chosen.value, chosen.source) == (0.3, "calibration c1")
    with caplog.at_level(logging.WARNING):
        chosen = choose(0.0, wanted, model, stats, old)
    assert chosen.value is None and chosen.source.startswith("no threshold")
    assert "other matching settings" in caplog.text and "NOTHING IS FLAGGED" in caplog.text
    global_only = TwoStageConfig.from_settings(settings.with_overrides(verify=False, views="full")).as_dict()
    chosen = choose(0.0, global_only, model, stats, old)
    assert (chosen.value, chosen.source) == (0.4, "calibration c0")


def test_candidates_csv_quotes_a_carriage_return_in_an_id():
    import csv
    import io

    from moderation.matching import candidates_csv

    text = candidates_csv([Candidate(f"q\r{i}", "r", 0.5, 0.5, 1) for i in range(10)])
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert len(rows) == 11 and rows[3][0] == "q\r2"


def test_evidence_shows_correspondences_and_the_reference_outline():
    from local_images import paste, textured
    from moderation.evidence import draw_geometry, side_by_side
    from moderation.local_features import FeatureConfig, extract
    from moderation.verification import verify_pair

    ref, host = textured(21), textured(22, size=(512, 400))
    query = paste(ref, host, 0.5, (200, 150))
    cfg = FeatureConfig()
    v = verify_pair(extract(query, cfg), extract(ref, cfg), mirrored_query=extract(query, cfg, mirror=True))
    assert v.verified
    plain = side_by_side(query, ref, 200_000)
    drawn = draw_geometry(plain.copy(), query, ref, v)
    arr = np.asarray(drawn).astype(int)
    yellow = (arr[..., 0] > 240) & (arr[..., 1] > 200) & (arr[..., 1] < 235) & (arr[..., 2] < 30)
    green = (arr[..., 0] < 60) & (arr[..., 1] > 200) & (arr[..., 2] > 40) & (arr[..., 2] < 80)
    assert green.sum() > 50 and yellow.sum() > 50
    # The outline sits where the reference was pasted: its top-left corner near (200, 150) of the query.
    scale = plain.height / query.height
    ys, xs = np.nonzero(yellow)
    near = (np.abs(xs - 200 * scale) < 8) & (np.abs(ys - 150 * scale) < 8)
    assert near.any()
    unverified = draw_geometry(plain.copy(), query, ref, Verification())
    assert np.array_equal(np.asarray(unverified), np.asarray(plain))


def _tiny_model(x):
    """A stand-in descriptor: colour means over a 4x4 grid, L2-normalised (48-d)."""
    import torch.nn.functional as F

    return F.normalize(F.adaptive_avg_pool2d(x, 4).flatten(1), dim=1)


def test_matching_in_chunks_equals_one_pass_and_dedupes_ids_across_chunks(tmp_path):
    from local_images import paste, textured
    from moderation.embedding import FolderSource
    from moderation.local_features import FeatureConfig, extract
    from moderation.query_analysis import analyse_queries
    from moderation.two_stage import TwoStageConfig, match_queries
    from moderation.views import ViewConfig

    settings = Settings.from_env({"MODERATION_HOME": str(tmp_path / "h"), "MODERATION_WORKERS": "0",
                                  "MODERATION_PROGRESS": "false", "MODERATION_IMAGE_SIZE": "64"})
    refs_dir, q_dir = tmp_path / "refs", tmp_path / "q"
    refs_dir.mkdir()
    (q_dir / "sub").mkdir(parents=True)
    refs = {f"R{i}": textured(300 + i) for i in range(6)}
    for rid, img in refs.items():
        img.save(refs_dir / f"{rid}.png")
    for i in range(5):
        paste(refs[f"R{i}"], textured(400 + i, size=(480, 360)), 0.6, (60, 40)).save(q_dir / f"Q{i}.png")
    textured(500).save(q_dir / "sub" / "Q0.png")  # the same id again, in a sub-folder
    ref_analysis = analyse_queries(_tiny_model, FolderSource(refs_dir), settings, ViewConfig(), None)
    index = build_index(l2n(ref_analysis.full), ref_analysis.ids)
    feats = {rid: extract(img, FeatureConfig()) for rid, img in refs.items()}
    config = TwoStageConfig(views=ViewConfig.parse("full,mirror,grid2"), k=3, verify_topk=3, workers=0)
    runs = [match_queries(_tiny_model, FolderSource(q_dir), settings, config, index, None, None,
                          reference_features=feats.get, chunk=chunk) for chunk in (2, 100)]
    a, b = ([(c.query_id, c.reference_id, c.rank, round(c.score, 9), c.view) for c in r.candidates] for r in runs)
    assert a == b and len(a) == 15
    for r in runs:
        assert [f.reason for f in r.failures] == ["duplicate_id"] and r.ids == [f"Q{i}" for i in range(5)]
        assert r.full.shape == (5, 48) and r.views_per_query == 6
        top = {c.query_id: c for c in r.candidates if c.rank == 1}
        assert sum(top[f"Q{i}"].reference_id == f"R{i}" for i in range(5)) >= 4
        assert all(top[q].verification is not None for q in top)


def test_a_batch_over_the_failure_limit_keeps_its_per_image_reasons(tmp_path):
    import json

    from conftest import fast_env
    from local_images import textured
    from moderation.embedding import FolderSource
    from moderation.errors import BatchFailedError
    from moderation.jobs import Pipeline, build_reference_index, refresh_stats, run_matching

    for sub in ("bg", "refs", "q"):
        (tmp_path / sub).mkdir()
    for i in range(6):
        textured(700 + i, size=(96, 80), shapes=30).save(tmp_path / "bg" / f"B{i}.png")
        textured(800 + i, size=(96, 80), shapes=30).save(tmp_path / "refs" / f"R{i}.png")
    textured(900, size=(96, 80), shapes=30).save(tmp_path / "q" / "good.png")
    for i in range(3):
        (tmp_path / "q" / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    p = Pipeline.open(Settings.from_env(fast_env(tmp_path / "home")))
    refresh_stats(p, FolderSource(tmp_path / "bg"))
    build_reference_index(p, FolderSource(tmp_path / "refs"))
    with pytest.raises(BatchFailedError, match="3 of 4"):
        run_matching(p, FolderSource(tmp_path / "q"), "bad-day")
    run = p.db.run("bad-day")
    assert run.status == "failed" and run.failures["count"] == 3
    assert {f["image_id"] for f in run.failures["images"]} == {"broken0", "broken1", "broken2"}
    stored = [k for k in p.store.list("runs/") if k.endswith("failures.json")]
    assert len(stored) == 1 and json.loads(p.store.get(stored[0]))["count"] == 3


def test_missing_prerequisites_name_the_command_and_the_dag(tmp_path):
    from conftest import fast_env
    from moderation.errors import NotFoundError
    from moderation.jobs import Pipeline, pin

    p = Pipeline.open(Settings.from_env(fast_env(tmp_path / "home")))
    with pytest.raises(NotFoundError) as exc:
        p.current_stats(p.current_model())
    assert "moderation stats refresh" in str(exc.value) and "background_stats_refresh" in str(exc.value)
    with pytest.raises(NotFoundError) as exc:
        pin(p)
    assert "moderation index build" in str(exc.value) and "reference_index_nightly" in str(exc.value)
