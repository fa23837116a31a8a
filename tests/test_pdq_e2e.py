"""PDQ as a match signal of its own, through the real match job, on Postgres and an S3 server on loopback.

The descriptor's threshold is set so high that it flags nothing; a JPEG
re-encode of a reference is then flagged by PDQ alone (match_source 'pdq'),
and so is a re-encode of an image nobody has but whose hash came in a hash
bank (a hash-only reference: no reference image, evidence of the query
alone). With MODERATION_PDQ off the same batch flags nothing.
"""

from __future__ import annotations

import json
import os

import pytest
from sqlalchemy import create_engine, text

from conftest import fast_env, s3_env
from local_images import as_jpeg, textured

N_REFS = 8


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("pdq")
    for sub in ("references", "background", "queries"):
        (root / sub).mkdir()
    for i in range(N_REFS):
        textured(7000 + i).save(root / "references" / f"R{i}.jpg", quality=92)
    for i in range(12):
        textured(7100 + i, shapes=50 + i).save(root / "background" / f"B{i}.jpg", quality=92)
    as_jpeg(textured(7003).resize((320, 240)), 70).save(root / "queries" / "copy_of_R3.jpg", quality=75)
    as_jpeg(textured(7500), 70).save(root / "queries" / "copy_of_banked.jpg", quality=75)
    textured(7600).save(root / "queries" / "unrelated.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def pipeline(pg_url, s3_server, images, tmp_path_factory):
    from moderation.config import Settings
    from moderation.embedding import FolderSource
    from moderation.jobs import Pipeline, build_reference_index, refresh_stats

    env = {**fast_env(tmp_path_factory.mktemp("pdq-home")), **s3_env(s3_server, "pdq-e2e"),
           "MODERATION_DATABASE_URL": pg_url, "MODERATION_VERIFY": "false", "MODERATION_VIEWS": "full",
           "MODERATION_THRESHOLD": "1000"}  # the descriptor flags nothing
    p = Pipeline.open(Settings.from_env(env))
    refresh_stats(p, FolderSource(images / "background"))
    index = build_reference_index(p, FolderSource(images / "references"))
    assert "pdq.npz" in index.files and index.info["pdq"] == {"hashes": N_REFS}
    yield p
    p.db.engine.dispose()


def _pairs(pg_url, batch, by_query=True):
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        rows = conn.execute(text(
            "select p.query_id, p.reference_id, p.reference_key, p.match_source, p.pdq_distance, p.evidence_key, "
            "p.heatmap_key from flagged_pairs p join match_runs r on r.id = p.run_id where r.batch = :b "
            "order by p.query_id"), {"b": batch}).mappings().all()
    engine.dispose()
    return {r["query_id"]: dict(r) for r in rows} if by_query else [dict(r) for r in rows]


def test_pdq_flags_what_the_descriptor_misses_and_hash_only_bank_entries(pipeline, images, pg_url, tmp_path):
    from dataclasses import replace

    from moderation import hash_banks
    from moderation.cli import main
    from moderation.embedding import FolderSource
    from moderation.jobs import run_matching
    from moderation.pdq import compute_pdq

    p = pipeline
    # A partner's bank: hashes only, as the PDQ reference tools write them ("HASH,metadata": the metadata is
    # the id); one of them is of an image we never see.
    banked = compute_pdq(textured(7500))
    bank_file = tmp_path / "partner.txt"
    bank_file.write_text(f"{banked.hex()},case-17\n{compute_pdq(textured(7501)).hex()},case-18\n")
    entries = hash_banks.parse_bank(bank_file.read_text())
    hash_banks.import_bank(p.store, "partner", entries, source=bank_file.name)

    summary = run_matching(p, FolderSource(images / "queries"), "day-1")
    pairs = _pairs(pg_url, "day-1")
    assert set(pairs) == {"copy_of_R3", "copy_of_banked"}, pairs
    copy = pairs["copy_of_R3"]
    assert copy["reference_id"] == "R3" and copy["match_source"] == "pdq" and copy["pdq_distance"] <= 31
    assert copy["evidence_key"] and copy["reference_key"]
    bank = pairs["copy_of_banked"]
    assert bank["reference_id"] == "hashbank:partner:case-17" and bank["match_source"] == "pdq"
    assert bank["reference_key"] is None and bank["evidence_key"] and bank["heatmap_key"] is None
    assert p.store.exists(bank["evidence_key"])  # the query alone: there is no reference image
    assert summary.n_flagged == 2
    info = json.loads(p.store.get("runs/" + summary.candidates_key.split("/")[1] + "/pdq.json"))
    assert info["banks"]["partner"] and info["references"] == N_REFS and info["matches"] == 2

    # The review view shows the signal.
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        sources = dict(conn.execute(text("select query_id, match_source from review_pair_context")).all())
    engine.dispose()
    assert sources["copy_of_R3"] == "pdq"

    # Without PDQ the same batch flags nothing (the descriptor's threshold is out of reach).
    off = replace(p, settings=p.settings.with_overrides(pdq=False))
    run_matching(off, FolderSource(images / "queries"), "day-1-no-pdq")
    assert _pairs(pg_url, "day-1-no-pdq") == {}

    # Both signals: with a reachable threshold the descriptor flags the copy too, and the pair says so.
    both = replace(p, settings=p.settings.with_overrides(threshold=-100.0))
    run_matching(both, FolderSource(images / "queries"), "day-1-both")
    by_pair = {(r["query_id"], r["reference_id"]): r for r in _pairs(pg_url, "day-1-both", by_query=False)}
    assert by_pair[("copy_of_R3", "R3")]["match_source"] == "both"
    assert by_pair[("unrelated", "R0")]["match_source"] == "sscd"
    assert by_pair[("copy_of_banked", "hashbank:partner:case-17")]["match_source"] == "pdq"

    # The CLI round trip of the bank: export it, and the references' own hashes.
    out = tmp_path / "export.csv"
    saved = dict(os.environ)
    try:
        os.environ.update({k: str(v) for k, v in _env_of(p).items()})
        assert main(["pdq", "export", "--bank", "partner", str(out)]) == 0
        assert [e.hash.bits for e in hash_banks.parse_bank(out.read_text())] == [e.hash.bits for e in entries]
        assert main(["pdq", "export", "--bank", "references", str(out), "--format", "pdq"]) == 0
        assert sorted(e.entry_id for e in hash_banks.parse_bank(out.read_text())) == [f"R{i}" for i in range(N_REFS)]
        assert main(["pdq", "import", str(bank_file), "--bank", "partner2"]) == 0
        assert "partner2" in hash_banks.list_banks(p.store)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _env_of(p) -> dict[str, str]:
    s = p.settings
    return {"MODERATION_HOME": s.home, "MODERATION_DATABASE_URL": s.database_url, "MODERATION_STORE_URL": s.store_url,
            "MODERATION_S3_ENDPOINT": s.s3_endpoint, "MODERATION_S3_ACCESS_KEY": s.s3_access_key,
            "MODERATION_S3_SECRET_KEY": s.s3_secret_key, "MODERATION_S3_REGION": s.s3_region,
            "MODERATION_IMAGE_SIZE": s.image_size, "MODERATION_WORKERS": "0", "MODERATION_PROGRESS": "false"}
