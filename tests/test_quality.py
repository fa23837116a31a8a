"""Data-quality gates (great-expectations 1.x) and the review hold-back on a real Postgres."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from moderation import quality
from moderation.quality import QualityGateError, QualityLimits


def _png(w: int, h: int, colour=(10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, "PNG")
    return buf.getvalue()


def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_clean_image_batch_passes():
    objs = {f"q/{i}.png": _png(64 + i, 48, (i, 2 * i, 3)) for i in range(10)}
    frame = quality.profile_images(objs.__getitem__, objs)
    assert list(frame["decoded"]) == [True] * 10
    assert frame["min_side"].tolist() == [48.0] * 10
    result = quality.check_image_batch(frame, "queries", QualityLimits())
    assert result.success, result.summary()
    assert result.info["images"] == 10 and result.info["duplicates"] == 0


def test_bad_image_batch_says_which_expectation_failed_and_by_how_much():
    objs = {f"q/{i}.png": _png(64 + i, 64) for i in range(6)}
    objs["q/tiny.png"] = _png(8, 8)
    objs["q/junk.png"] = b"not an image at all"
    objs["q/copy.png"] = objs["q/0.png"]  # duplicate bytes
    objs["q/gone.png"] = b""
    frame = quality.profile_images(lambda k: objs[k] if k != "q/missing.png" else objs[k],
                                   [*objs, "q/missing.png"])
    assert frame.set_index("key").loc["q/missing.png", "reason"].startswith("unreadable")
    result = quality.check_image_batch(frame, "queries", QualityLimits(max_failure_rate=0.2))
    assert not result.success
    failed = {o.kwargs.get("column") for o in result.failed}
    assert failed == {"decoded", "min_side", "sha256"}
    text = result.summary()
    assert "3 of 11 values unexpected (27.3%, allowed 20.0%), over by 7.3 points" in text
    assert "[min_side >= 32]" in text and "e.g. [8.0]" in text
    assert "expect_column_values_to_be_unique [sha256]" in text
    with pytest.raises(QualityGateError) as err:
        result.raise_for_failure()
    assert "quality gate 'queries_batch' FAILED" in str(err.value)
    # the profile survives the trip through the object store (CSV)
    again = quality.check_image_batch(quality.profile_from_csv(quality.profile_to_csv(frame)), "queries",
                                      QualityLimits(max_failure_rate=0.2))
    assert [o.success for o in again.outcomes] == [o.success for o in result.outcomes]


def test_empty_batch_fails():
    frame = quality.profile_images(lambda k: b"", [])
    assert not quality.check_image_batch(frame, "queries").success


def test_embeddings_gate():
    good = _unit(20, 16)
    assert quality.check_embeddings(good, 16, "refs").success
    bad = good.copy()
    bad[3, 0] = np.nan
    bad[5, :] = np.inf
    bad[7] *= 1.5
    result = quality.check_embeddings(bad, 16, "refs")
    assert not result.success
    failed = {o.kwargs.get("column"): o for o in result.failed}
    assert set(failed) == {"finite", "norm"}
    assert failed["finite"].observed["unexpected_count"] == 2
    assert "1.5" in result.summary()
    wrong_dim = quality.check_embeddings(good, 32, "refs")
    assert [o.kwargs.get("column") for o in wrong_dim.failed] == ["dim"]
    assert not quality.check_embeddings(np.zeros((0, 16), np.float32), 16, "refs").success


def _pair(i, raw=0.9, score=0.5, rank=1, ref="R1"):
    return {"query_id": f"Q{i}", "reference_id": ref, "raw_score": raw, "score": score, "rank": rank}


def test_flagged_pairs_ranges_and_uniqueness():
    ok = [_pair(i) for i in range(5)]
    assert quality.check_flagged_pairs(ok, threshold=0.25, beta=1.0, topk=10, history=[]).success
    bad = [_pair(0, raw=1.4), _pair(1, score=0.1), _pair(2, rank=11), _pair(3), _pair(3)]
    result = quality.check_flagged_pairs(bad, threshold=0.25, beta=1.0, topk=10, history=[])
    cols = {o.kwargs.get("column") or tuple(o.kwargs.get("column_list")) for o in result.failed}
    assert cols == {"raw_score", "score", "rank", ("query_id", "reference_id")}
    assert quality.check_flagged_pairs([], threshold=0.25, beta=1.0, topk=10, history=[5, 5, 5]).success


def test_pairs_flagged_by_pdq_alone_are_held_to_their_hash_distance_not_the_descriptor():
    # A PDQ-only pair keeps the descriptor's score and rank, 0 when it did not rank the reference.
    pdq_only = {**_pair(1, raw=0.0, score=0.0, rank=0), "match_source": "pdq", "pdq_distance": 12}
    below = {**_pair(2, score=0.1, rank=4), "match_source": "pdq", "pdq_distance": 31}
    both = {**_pair(3), "match_source": "both", "pdq_distance": 3}
    ok = [_pair(0), pdq_only, below, both]
    assert quality.check_flagged_pairs(ok, threshold=0.25, beta=1.0, topk=10, history=[]).success
    bad = [{**_pair(0, score=0.0, rank=0), "match_source": "sscd"}, {**pdq_only, "pdq_distance": 300}]
    result = quality.check_flagged_pairs(bad, threshold=0.25, beta=1.0, topk=10, history=[])
    assert {o.kwargs.get("column") for o in result.failed} == {"score", "rank", "pdq_distance"}


def test_spike_bound():
    limits = QualityLimits(spike_factor=3.0, spike_min_count=20, spike_min_history=3, spike_window=4)
    assert not quality.spike_bound([10, 10], limits).applies
    bound = quality.spike_bound([1000, 10, 20, 30, 40], limits)  # only the last 4 count
    assert bound.history == (10, 20, 30, 40) and bound.trailing_mean == 25.0 and bound.max_count == 75
    assert quality.spike_bound([1, 2, 3], limits).max_count == 20  # the floor
    pairs = [_pair(i) for i in range(76)]
    result = quality.check_flagged_pairs(pairs, threshold=0.25, beta=1.0, topk=10,
                                         history=[10, 20, 30, 40], limits=limits)
    assert not result.success
    assert "observed 76, 1 above the maximum 75" in result.summary()
    assert "3.0x" in result.info["spike"]


def test_limits_from_env():
    limits = QualityLimits.from_env({"MODERATION_QUALITY_SPIKE_FACTOR": "5", "MODERATION_QUALITY_MIN_SIDE": "64"})
    assert (limits.spike_factor, limits.min_side) == (5.0, 64)
    from moderation.errors import ConfigError

    with pytest.raises(ConfigError, match="MODERATION_QUALITY_MIN_SIDE"):
        QualityLimits.from_env({"MODERATION_QUALITY_MIN_SIDE": "big"})


# -- hold-back on Postgres -------------------------------------------------------------------


@pytest.fixture(scope="module")
def review_db(pg_url):
    from moderation.db import connect
    from moderation.registry import IndexVersion, ModelVersion, StatsVersion

    db = connect(pg_url)
    db.record_model(ModelVersion("m1", "mobilenet_v2", 4, 96, "square", "test"))
    db.record_stats(StatsVersion("s1", "m1", "whiten", 4, 4, 10))
    db.record_index(IndexVersion("i1", "m1", "s1", 10, 4, "Flat"))
    return db


def _complete_run(db, batch: str, n_pairs: int) -> int:
    from moderation.db import FlaggedPair, MatchRunRecord

    run = MatchRunRecord(batch=batch, model_version="m1", stats_version="s1", index_version="i1",
                         threshold=0.25)
    db.start_run(run)
    pairs = [FlaggedPair(f"Q{i}", "R1", 0.9, 0.5, 1) for i in range(n_pairs)]
    return db.finish_run(run, pairs)


def _visible(db) -> set[int]:
    from sqlalchemy import text

    with db.engine.connect() as conn:
        return set(conn.execute(text("select run_id from reviewable_runs")).scalars())


def test_hold_keeps_pairs_out_of_review_until_released(review_db):
    db = review_db
    batch = "queries/2026-01-05/"
    quality.place_hold(db, batch, "awaiting gate")  # before the pairs exist
    run_id = _complete_run(db, batch, 3)
    assert quality.is_held(db, batch) and run_id not in _visible(db)
    quality.place_hold(db, batch, "spike", status=quality.HOLD_HELD, details={"flagged": 3})
    assert quality.hold_of(db, batch)["details"] == {"flagged": 3}
    assert batch in quality.held_batches(db)
    assert quality.release_hold(db, batch, "alice", note="checked by hand")
    hold = quality.hold_of(db, batch)
    assert (hold["status"], hold["released_by"]) == ("released", "alice")
    assert "checked by hand" in hold["reason"]
    assert run_id in _visible(db) and not quality.is_held(db, batch)
    assert not quality.release_hold(db, "queries/never/", "alice")
    from sqlalchemy import text

    with db.engine.connect() as conn:  # the review queue (0002 + 0004) follows the hold as well
        names = set(conn.execute(text("select viewname from pg_views")).scalars())
        if "review_pending" in names:
            quality.place_hold(db, batch, "again", status=quality.HOLD_HELD)
            held = conn.execute(text("select count(*) from review_pending where run_id = :r"), {"r": run_id}).scalar()
            quality.release_hold(db, batch, "alice")
            free = conn.execute(text("select count(*) from review_pending where run_id = :r"), {"r": run_id}).scalar()
            assert (held, free) == (0, 3)


def test_spike_holds_the_day_and_an_operator_releases_it(review_db, pg_url, tmp_path):
    from moderation import orchestration
    from moderation.config import Settings

    db = review_db
    for day in ("2026-02-01", "2026-02-02", "2026-02-03"):
        _complete_run(db, f"queries/{day}/", 2)
    settings = Settings.from_env({"MODERATION_HOME": str(tmp_path), "MODERATION_DATABASE_URL": pg_url})
    limits = QualityLimits(spike_min_count=10)
    spiky = "queries/2026-02-04/"
    quality.place_hold(db, spiky, "awaiting gate")
    run_id = _complete_run(db, spiky, 25)
    with pytest.raises(QualityGateError) as err:
        orchestration.gate_flagged_batch(settings, spiky, limits=limits)
    assert "observed 25, 15 above the maximum 10" in str(err.value)
    hold = quality.hold_of(db, spiky)
    assert hold["status"] == "held" and "above the maximum" in hold["reason"]
    assert run_id not in _visible(db)
    out = orchestration.gate_flagged_batch(settings, spiky, release=True, released_by="airflow:run-7",
                                           limits=limits)
    assert (out["passed"], out["hold"], out["released_by"]) == (False, "released", "airflow:run-7")
    assert run_id in _visible(db)
    calm = "queries/2026-02-05/"
    quality.place_hold(db, calm, "awaiting gate")
    _complete_run(db, calm, 3)
    out = orchestration.gate_flagged_batch(settings, calm, limits=limits)
    assert out["passed"] and quality.hold_of(db, calm)["released_by"] == "quality-gate"


def test_a_dag_rerun_that_dies_leaves_the_released_day_in_review(review_db, pg_url, tmp_path, monkeypatch):
    """The matching task holds the day back only when its new pairs are published, not before."""
    from moderation import orchestration
    from moderation.config import Settings
    from moderation.db import FlaggedPair, MatchRunRecord

    db = review_db
    batch = "queries/2026-03-01/"
    run_id = _complete_run(db, batch, 3)
    quality.release_hold(db, batch, "quality-gate")
    assert run_id in _visible(db)
    run = MatchRunRecord(batch=batch, model_version="m1", stats_version="s1", index_version="i1",
                         threshold=0.25)

    def dies_half_way(p, source, batch_, **kwargs):
        p.db.start_run(run)
        raise RuntimeError("worker lost")  # SIGKILL-like: nothing marks it failed or published

    monkeypatch.setattr(orchestration, "run_matching", dies_half_way)
    settings = Settings.from_env({"MODERATION_HOME": str(tmp_path), "MODERATION_DATABASE_URL": pg_url})
    with pytest.raises(RuntimeError, match="worker lost"):
        orchestration.match_batch(settings, batch, "m1")
    assert db.run(batch).status == "running"
    assert run_id in _visible(db) and not quality.is_held(db, batch)
    # The attempt that completes publishes its pairs and the pending hold in one transaction.
    db.finish_run(run, [FlaggedPair("Q9", "R1", 0.9, 0.5, 1)], hold="awaiting the flagged-pairs quality gate")
    hold = quality.hold_of(db, batch)
    assert (hold["status"], hold["released_by"]) == ("pending", None)
    assert run_id not in _visible(db)
    assert orchestration.gate_flagged_batch(settings, batch)["hold"] == "released"
    assert run_id in _visible(db)
