"""Two-stage matching end to end through the CLI, on Postgres and an S3 server on loopback.

A reference pasted small into another picture is missed by the global
stage (the whole query's descriptor), and flagged once the second stage
runs: views find it among the candidates, local features verify it, the
evidence shows the correspondences, and the run artifacts keep the global
score and the verification features.
"""

from __future__ import annotations

import csv
import io
import json

import pytest
from sqlalchemy import create_engine, text

from conftest import fast_env, s3_env
from local_images import as_jpeg, paste, textured
from test_e2e_cli import run_cli

N_REFS = 16


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("two-stage")
    for sub in ("references", "background", "queries", "labelled"):
        (root / sub).mkdir()
    for i in range(N_REFS):
        textured(1000 + i).save(root / "references" / f"R{i:03d}.jpg", quality=92)
    for i in range(24):
        textured(2000 + i, shapes=40 + i).save(root / "background" / f"B{i:03d}.jpg", quality=92)
    ref = textured(1003)
    host = textured(3000, size=(640, 480), shapes=150)
    as_jpeg(paste(ref, host, 0.35, (330, 250)), 85).save(root / "queries" / "pasted.jpg", quality=90)
    for i in range(3):
        textured(4000 + i).save(root / "queries" / f"unrelated{i}.jpg", quality=90)
    # A labelled set to calibrate on (other references, other hosts): pastes, crops, non-copies.
    rows = ["query_id,reference_id"]
    for j, r in enumerate((0, 1, 2, 4, 5, 6, 7, 8, 9, 10)):
        ref = textured(1000 + r)
        if j % 2:
            q = paste(ref, textured(5000 + j, size=(600, 450), shapes=140), 0.3 + 0.05 * j, (40 + 10 * j, 30))
        else:
            q = ref.crop((20 + 5 * j, 15, 360, 270))
        as_jpeg(q, 80).save(root / "labelled" / f"L{j:02d}.jpg", quality=90)
        rows.append(f"L{j:02d},R{r:03d}")
    for j in range(10):
        textured(6000 + j).save(root / "labelled" / f"N{j:02d}.jpg", quality=90)
        rows.append(f"N{j:02d},")
    (root / "labelled.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def env(pg_url, s3_server, tmp_path_factory):
    home = tmp_path_factory.mktemp("two-stage-home")
    return {**fast_env(home), **s3_env(s3_server, "two-stage-e2e"), "MODERATION_DATABASE_URL": pg_url,
            "MODERATION_IMAGE_SIZE": "160"}


def flagged(pg_url, batch):
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        rows = conn.execute(text("select p.query_id, p.reference_id, p.score, p.evidence_key from flagged_pairs p "
                                 "join match_runs r on r.id = p.run_id where r.batch = :b"), {"b": batch}).all()
    engine.dispose()
    return rows


def test_a_small_paste_missed_globally_is_flagged_after_verification(env, images, pg_url, tmp_path):
    run_cli(env, "stats", "refresh", "--images", str(images / "background"))
    built = json.loads(run_cli(env, "index", "build", "--images", str(images / "references")).stdout)
    assert built["count"] == N_REFS

    # Global stage alone: the whole query's descriptor, calibrated on the labelled set.
    global_env = {**env, "MODERATION_VIEWS": "full"}
    run_cli(global_env, "calibrate", "--no-verify", "--images", str(images / "labelled"),
            "--ground-truth", str(images / "labelled.csv"))
    global_csv = tmp_path / "global.csv"
    glob = json.loads(run_cli(global_env, "match", "--no-verify", "--images",
                              str(images / "queries"), "--batch", "global-only",
                              "--candidates-out", str(global_csv)).stdout)
    rows = {(r["query_id"], r["reference_id"]): float(r["score"]) for r in csv.DictReader(open(global_csv))}
    assert rows.get(("pasted", "R003"), -1.0) < glob["threshold"]
    assert ("pasted", "R003") not in {(r.query_id, r.reference_id) for r in flagged(pg_url, "global-only")}

    # Default: views + verification, no new command; calibrated the same way.
    cal = json.loads(run_cli(env, "calibrate", "--images", str(images / "labelled"),
                             "--ground-truth", str(images / "labelled.csv")).stdout)
    assert cal["combiner_fit"]["n_positive"] >= 8
    out_csv = tmp_path / "two-stage.csv"
    two = json.loads(run_cli(env, "match", "--images", str(images / "queries"), "--batch", "two-stage",
                             "--candidates-out", str(out_csv)).stdout)
    pairs = flagged(pg_url, "two-stage")
    assert two["threshold"] == pytest.approx(cal["threshold"])
    assert [(r.query_id, r.reference_id) for r in pairs] == [("pasted", "R003")]
    assert pairs[0].score >= two["threshold"] and pairs[0].evidence_key
    header = next(csv.reader(open(out_csv)))
    assert header == ["query_id", "reference_id", "score"]

    # The run artifacts: the verification features per candidate, and the settings used.
    from moderation.config import Settings
    from moderation.store import open_store

    store = open_store(Settings.from_env(env))
    run_folder = two["candidates_key"].rsplit("/", 1)[0]
    ver = list(csv.DictReader(io.StringIO(store.get(f"{run_folder}/verification.csv").decode())))
    hit = next(r for r in ver if (r["query_id"], r["reference_id"]) == ("pasted", "R003"))
    assert hit["verified"] == "1" and int(hit["inliers"]) >= 12 and float(hit["reference_coverage"]) > 0.3
    assert float(hit["global_score"]) < float(hit["score"])
    assert all(r["verified"] in ("", "0") for r in ver if r["query_id"].startswith("unrelated"))
    meta = json.loads(store.get(f"{run_folder}/matching.json"))
    assert meta["matching"]["verify"] is True and "grid2" in meta["matching"]["views"]
    assert store.get(pairs[0].evidence_key)[:2] == b"\xff\xd8"  # a JPEG with the correspondences drawn
    # The reference features were computed at index time, once, in the object store.
    assert len([k for k in store.list("features/") if k.endswith(".npz")]) == N_REFS
