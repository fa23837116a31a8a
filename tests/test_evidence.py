"""Visual evidence: safe keys, bounded images, heatmaps that point at the copied region, pruning."""

from __future__ import annotations

import io
import logging
import random
from dataclasses import replace
from datetime import timedelta

import pytest
import torch
from PIL import Image
from review_support import (fresh_pg_database, local_pipeline, settings_from,
                            torch_single_thread)  # noqa: F401 (autouse)
from sqlalchemy import text
from torch import nn

from moderation import evidence, review
from moderation.config import ResizeMode
from moderation.db import Database
from moderation.store import MAX_KEY_BYTES, validate_key

HOSTILE_IDS = ["../../etc/passwd", "/abs/path", "a/b/c", "q'; DROP TABLE flagged_pairs; --", "x" * 5000,
               "bad\udcff\udcfe", "nul\x00ctl\x1f", "..", ".", "", "ünï😀", "C:\\win\\path", "%2e%2e%2f"]


def test_evidence_keys_are_safe_unique_and_stable():
    seen = set()
    for q in HOSTILE_IDS:
        for r in ("ref", "../ref", "r" * 900):
            ev, hm = evidence.evidence_keys("runs/day-1234abcd", q, r)
            for key in (ev, hm):
                assert validate_key(key) == key and len(key.encode()) <= MAX_KEY_BYTES
                assert key.startswith("runs/day-1234abcd/evidence/") and key.count("/") == 3
                assert ".." not in key.split("/")
            assert (ev, hm) == evidence.evidence_keys("runs/day-1234abcd", q, r)  # stable across reruns
            seen.add(ev)
    assert len(seen) == len(HOSTILE_IDS) * 3  # one per pair


@pytest.mark.parametrize("max_pixels", [64 * 64, 256 * 256, 5000, 200])
@pytest.mark.parametrize("qsize,rsize", [((640, 480), (480, 640)), ((4000, 50), (50, 4000)), ((30, 20), (20, 30)),
                                         ((1000, 1000), (1000, 1000))])
def test_evidence_images_respect_the_pixel_cap(max_pixels, qsize, rsize):
    q, r = Image.new("RGB", qsize, (200, 10, 10)), Image.new("RGB", rsize, (10, 10, 200))
    side = evidence.side_by_side(q, r, max_pixels)
    assert side.width * side.height <= max_pixels
    if qsize[0] * qsize[1] + rsize[0] * rsize[1] <= max_pixels / 4:  # small images: not upscaled
        assert side.height == max(qsize[1], rsize[1])
    heat = evidence.overlay(q, torch.rand(3, 5).numpy(), max_pixels)
    assert heat.width * heat.height <= max_pixels
    if min(heat.size) >= 10:  # aspect kept (degenerate slivers round to 1 px)
        assert heat.width / heat.height == pytest.approx(qsize[0] / qsize[1], rel=0.15)


class _ForwardOnly(nn.Module):
    """Like an imported SSCD TorchScript file: a descriptor, but no local_descriptors method."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.fixture(scope="module")
def models():
    from moderation.descriptor import build_model, export_torchscript, load_torchscript

    sscd = load_torchscript(export_torchscript(build_model("mobilenet_v2", projection_dim=0)))
    plain = torch.jit.script(_ForwardOnly(build_model("mobilenet_v2", projection_dim=0)).eval())
    assert evidence.has_local_descriptors(sscd) and not evidence.has_local_descriptors(plain)
    return sscd, plain


def _pasted_pairs(n: int = 4):
    """(reference, query) pairs where the query's right half is the reference, the left half unrelated."""
    from moderation.samples import synthetic_image

    out = []
    for seed in range(n):
        rng = random.Random(seed)
        ref, other = synthetic_image(rng, (160, 160)), synthetic_image(rng, (320, 160))
        query = other.copy()
        query.paste(ref, (160, 0))
        out.append((ref, query))
    return out


def test_heatmaps_point_at_the_copied_half(models):
    from moderation.images import preprocess

    sscd, plain = models
    for ref, query in _pasted_pairs():
        with torch.jit.optimized_execution(False), torch.inference_mode():
            g = sscd(preprocess(ref, 128, ResizeMode.SQUARE)[None])[0]
            x = preprocess(query, 128, ResizeMode.SQUARE)
            local = evidence.local_similarity(sscd, x, g)  # SSCD appendix E
            occl = evidence.occlusion_similarity(plain, x, g)  # the fallback
        half = local.shape[1] // 2
        assert local[:, half:].mean() > local[:, :half].mean() + 0.03
        assert occl[:, 2:].mean() > occl[:, :2].mean()
        norm = evidence.normalise_map(local)
        assert norm.min() == 0.0 and norm.max() == pytest.approx(1.0)


# -- evidence written by a real matching run --------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from moderation.embedding import FolderSource
    from moderation.jobs import Pipeline, run_matching

    with fresh_pg_database() as url:
        env, samples = local_pipeline(tmp_path_factory.mktemp("evidence") / "home", url,
                                      MODERATION_THRESHOLD="0.2", MODERATION_EVIDENCE_MAX_PIXELS="12000")
        p = Pipeline.open(settings_from(env))
        summary = run_matching(p, FolderSource(samples.queries), "day-ev")
        yield p, summary, samples
        p.db.engine.dispose()


def test_matching_run_stores_bounded_evidence_for_every_pair(run):
    p, summary, _ = run
    pairs = p.db.pairs(summary.run_id)
    assert len(pairs) == summary.n_flagged > 0
    for row in pairs:
        assert row.evidence_key.startswith("runs/") and "/evidence/" in row.evidence_key
        for key in (row.evidence_key, row.heatmap_key):
            img = Image.open(io.BytesIO(p.store.get(key)))
            assert img.format == "JPEG" and img.width * img.height <= 12000
        details = review.pair_details(p.db, row.id)
        assert (details["evidence_key"], details["heatmap_key"]) == (row.evidence_key, row.heatmap_key)
        links = review.evidence_links(p.store, details)
        assert set(links) == {"evidence_url", "heatmap_url"}
        assert all(open(path, "rb").read(2) == b"\xff\xd8" for path in links.values())  # local store: paths


def test_models_without_local_descriptors_get_occlusion_heatmaps(run, models, caplog):
    from moderation.db import pairs_from
    from moderation.embedding import FolderSource
    from moderation.model_versions import LoadedModel

    p, summary, samples = run
    _, plain = models
    loaded = LoadedModel(replace(p.current_model(), version="imported-sscd-like"), plain)
    pairs = [replace(x, evidence_key=None, heatmap_key=None) for x in pairs_from(p.db.pairs(summary.run_id))][:2]
    with caplog.at_level(logging.INFO, logger="moderation.evidence"):
        out = evidence.attach_evidence(p, loaded, pairs, FolderSource(samples.queries), "runs/imported-check")
    assert "no local_descriptors" in caplog.text and "occlusion" in caplog.text
    assert all(o.heatmap_key and p.store.exists(o.heatmap_key) for o in out)


def test_unreadable_images_leave_the_pair_without_evidence(run, tmp_path):
    from moderation.db import pairs_from
    from moderation.embedding import FolderSource

    p, summary, samples = run
    good = replace(pairs_from(p.db.pairs(summary.run_id))[0], evidence_key=None, heatmap_key=None)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8not really a jpeg")
    pairs = [replace(good, query_id="missing", query_key=str(tmp_path / "missing.jpg")),
             replace(good, query_id="corrupt", query_key=str(corrupt)),
             replace(good, query_id="noref", reference_key="references/none.jpg"),
             good]
    out = evidence.attach_evidence(p, p.load(p.current_model()), pairs, FolderSource(samples.queries),
                                   "runs/unreadable-check")
    assert [o.evidence_key is None for o in out] == [True, True, True, False]


# -- retention ----------------------------------------------------------------------------------


def test_prune_removes_only_old_decided_evidence(run):
    p, summary, _ = run
    db: Database = p.db
    rows = sorted(db.pairs(summary.run_id), key=lambda r: -r.score)
    assert len(rows) >= 5
    claims = review.claim(db, "pruner", len(rows))
    by_id = {c["pair_id"]: c for c in claims}
    old, recent, unsure, rejected_now, pending = rows[0], rows[1], rows[2], rows[3], rows[4]
    review.decide(db, recent.id, "pruner", "confirmed")
    review.decide(db, unsure.id, "pruner", "unsure")
    review.decide(db, rejected_now.id, "pruner", "rejected")
    with db.engine.begin() as conn:  # a decision made 100 days ago (as recorded back then)
        conn.execute(text("INSERT INTO review_decisions (pair_id, moderator, decision, claim_id, decided_at) "
                          "VALUES (:p, 'pruner', 'rejected', :c, now() - interval '100 days')"),
                     {"p": old.id, "c": by_id[old.id]["claim_id"]})
    review.release(db, "pruner")
    keys = {r.id: (r.evidence_key, r.heatmap_key) for r in rows}

    out = evidence.prune_evidence(p, older_than_days=30)
    assert (out["pairs"], out["objects_deleted"]) == (1, 2)
    assert not any(p.store.exists(k) for k in keys[old.id])
    after = {r.id: (r.evidence_key, r.heatmap_key) for r in db.pairs(summary.run_id)}
    assert after[old.id] == (None, None)
    assert all(after[i] == keys[i] and p.store.exists(keys[i][0]) for i in keys if i != old.id)

    out = evidence.prune_evidence(p, older_than_days=0)  # everything decided, up to now
    after = {r.id: (r.evidence_key, r.heatmap_key) for r in db.pairs(summary.run_id)}
    assert out["pairs"] == 2 and after[recent.id] == after[rejected_now.id] == (None, None)
    assert after[unsure.id] == keys[unsure.id] and after[pending.id] == keys[pending.id]
    assert evidence.prune_evidence(p, older_than_days=0)["pairs"] == 0  # nothing left to do

    # A row pointing outside the evidence folders is never followed.
    victim = "models/precious/model.pt"
    p.store.put(victim, b"weights")
    with db.engine.begin() as conn:
        # The pair is decided, so the database refuses a new key (migration 0007); a row written
        # before that guard, or restored from a backup, can still hold one: plant it as a restore would.
        conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
        conn.execute(text("UPDATE flagged_pairs SET evidence_key = :k WHERE id = :p"), {"k": victim, "p": recent.id})
    out = evidence.prune_evidence(p, older_than_days=0)
    assert out["objects_skipped"] == 1 and p.store.exists(victim)
    with pytest.raises(ValueError):
        evidence.prune_evidence(p, older_than_days=-1)
    assert timedelta(days=p.settings.evidence_retention_days)  # the default exists
