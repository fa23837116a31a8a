"""The vector cache (hardening items 13 and 14), on a real S3 server.

- a corrupt part or manifest is dropped with a warning and its images are embedded again, never a traceback;
- reference and query vectors live in separate namespaces, and a job fetches only the parts holding the
  images it embeds;
- parts of the old layout are not read (a warning says how to move them), and move cleanly.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from review_support import s3_pipeline, torch_single_thread  # noqa: F401 (autouse)
from store_wrappers import PassThrough
from test_embedding import Tiny, picture, settings_for

from conftest import fast_env, s3_env
from moderation.config import Settings
from moderation.embedding import FolderSource, VectorCache, embed
from moderation.images import sha256_hex
from moderation.store import open_store


@pytest.fixture
def store(tmp_path, s3_server, s3_bucket):
    env = {**fast_env(tmp_path / "home"), **s3_env(s3_server, s3_bucket)}
    return open_store(Settings.from_env(env))


class CountingStore(PassThrough):
    """The real store, recording which keys were fetched."""

    def __init__(self, inner):
        super().__init__(inner)
        self.fetched = []

    def get(self, key):
        self.fetched.append(key)
        return self.inner.get(key)


def folder_of(tmp_path, name: str, seeds) -> object:
    d = tmp_path / name
    d.mkdir()
    for s in seeds:
        (d / f"img{s}.png").write_bytes(picture(s))
    return d


def parts(store, prefix="embeddings/mv1/") -> list[str]:
    return [k for k in store.list(prefix) if k.endswith(".npz")]


def corrupt(store, key: str, how: str) -> None:
    data = bytearray(store.get(key))
    if how == "flip":
        data[len(data) // 2] ^= 0x01  # one bit of one byte
    else:
        del data[len(data) // 2:]
    store.put(key, bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_corrupt_part_is_dropped_and_its_images_embedded_again(store, tmp_path, caplog, how):
    s = settings_for(tmp_path)
    images = folder_of(tmp_path, "images", range(6))
    model = Tiny().eval()
    first = embed(model, FolderSource(images), s, cache=VectorCache(store, "mv1"))
    [part] = parts(store)
    corrupt(store, part, how)
    model.seen = 0
    with caplog.at_level(logging.WARNING):
        again = embed(model, FolderSource(images), s, cache=VectorCache(store, "mv1"))
    assert model.seen == 6 and again.cached == 0 and again.failures == []
    np.testing.assert_allclose(again.vectors, first.vectors, rtol=1e-5, atol=1e-6)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"vector cache: part {part} is corrupt (sha256 does not match its manifest)" in warning
    assert "its 6 vectors are embedded again" in warning
    # a good part replaced the bad one: the next run is all cache hits, without a warning
    assert len(parts(store)) == 1
    caplog.clear()
    model.seen = 0
    third = embed(model, FolderSource(images), s, cache=VectorCache(store, "mv1"))
    assert model.seen == 0 and third.cached == 6
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_corrupt_manifest_is_dropped_too(store, tmp_path, caplog):
    s = settings_for(tmp_path)
    images = folder_of(tmp_path, "images", range(4))
    embed(Tiny().eval(), FolderSource(images), s, cache=VectorCache(store, "mv1"))
    [manifest] = [k for k in store.list("embeddings/mv1/") if k.endswith(".json")]
    corrupt(store, manifest, "truncate")
    model = Tiny().eval()
    with caplog.at_level(logging.WARNING):
        again = embed(model, FolderSource(images), s, cache=VectorCache(store, "mv1"))
    assert model.seen == 4 and again.cached == 0
    assert "its manifest is unreadable" in caplog.text
    model.seen = 0
    embed(model, FolderSource(images), s, cache=VectorCache(store, "mv1"))
    assert model.seen == 0  # rewritten whole


def test_reference_and_query_vectors_live_apart(store, tmp_path):
    from moderation.vector_cache import Namespace

    s = settings_for(tmp_path)
    refs = folder_of(tmp_path, "refs", range(3))
    queries = folder_of(tmp_path, "queries", range(10, 12))
    model = Tiny().eval()
    embed(model, FolderSource(refs), s, cache=VectorCache(store, "mv1", Namespace.REFERENCES))
    embed(model, FolderSource(queries), s, cache=VectorCache(store, "mv1", Namespace.QUERIES))
    assert parts(store, "embeddings/mv1/references/") and parts(store, "embeddings/mv1/queries/")
    ref_shas = {sha256_hex(picture(i)) for i in range(3)}
    query_shas = {sha256_hex(picture(i)) for i in range(10, 12)}
    assert VectorCache(store, "mv1", Namespace.REFERENCES).known() == ref_shas
    assert VectorCache(store, "mv1", Namespace.QUERIES).known() == query_shas


def test_a_job_fetches_only_the_parts_holding_its_images(store, tmp_path):
    s = settings_for(tmp_path)
    batches = [folder_of(tmp_path, f"day{d}", range(d * 10, d * 10 + 3)) for d in range(3)]
    model = Tiny().eval()
    for folder in batches:
        embed(model, FolderSource(folder), s, cache=VectorCache(store, "mv1"))
    assert len(parts(store)) == 3
    counting = CountingStore(store)
    model.seen = 0
    again = embed(model, FolderSource(batches[1]), s, cache=VectorCache(counting, "mv1"))
    assert again.cached == 3 and model.seen == 0
    fetched = [k for k in counting.fetched if k.endswith(".npz")]
    assert len(fetched) == 1
    with np.load(io.BytesIO(store.get(fetched[0]))) as part:
        assert set(part["sha256"]) == {sha256_hex(picture(i)) for i in range(10, 13)}


def test_an_old_layout_cache_is_not_read_and_moves_cleanly(store, tmp_path, caplog):
    from moderation.vector_cache import Namespace, migrate_legacy_part

    s = settings_for(tmp_path)
    images = folder_of(tmp_path, "images", range(4))
    shas = [sha256_hex(picture(i)) for i in range(4)]
    vectors = embed(Tiny().eval(), FolderSource(images), s).vectors
    buf = io.BytesIO()
    np.savez(buf, sha256=np.array(shas), vectors=vectors)  # what the old cache wrote
    store.put("embeddings/mv1/0123456789abcdef.npz", buf.getvalue())
    store.put("embeddings/mv1/fedcba9876543210.npz", b"PK\x03\x04 not a zip at all")
    with caplog.at_level(logging.WARNING):
        cache = VectorCache(store, "mv1")
    assert len(cache) == 0 and "2 parts of the old layout" in caplog.text and "moderation gc" in caplog.text

    caches: dict = {}
    moved = migrate_legacy_part(store, "embeddings/mv1/0123456789abcdef.npz", set(shas[:3]), caches)
    assert moved == {"references": 3, "queries": 1}
    assert migrate_legacy_part(store, "embeddings/mv1/fedcba9876543210.npz", set(), caches) == {"corrupt": 1}
    assert [k for k in store.list("embeddings/mv1/") if k.count("/") == 2] == []
    assert migrate_legacy_part(store, "embeddings/mv1/0123456789abcdef.npz", set(), caches) == {}  # rerun
    model = Tiny().eval()
    res = embed(model, FolderSource(images), s, cache=VectorCache(store, "mv1"))
    assert model.seen == 1 and res.cached == 3  # the query vector went to the queries namespace
    assert VectorCache(store, "mv1", Namespace.QUERIES).known() == {shas[3]}
    np.testing.assert_allclose(res.vectors, vectors, rtol=1e-5, atol=1e-6)


def test_matching_writes_query_vectors_only_to_the_queries_namespace(tmp_path, s3_server, s3_bucket):
    from moderation.jobs import run_matching
    from moderation.vector_cache import Namespace

    with s3_pipeline(tmp_path / "home", s3_server, s3_bucket) as (p, _, samples):
        model = p.current_model().version
        before = VectorCache(p.store, model, Namespace.REFERENCES).known()
        summary = run_matching(p, FolderSource(samples.queries), "day-1")
        assert summary.n_queries > 0
        query_shas = {sha256_hex(f.read_bytes()) for f in samples.queries.iterdir()}
        assert VectorCache(p.store, model, Namespace.QUERIES).known() == query_shas
        assert VectorCache(p.store, model, Namespace.REFERENCES).known() == before
        reference_shas = {sha256_hex(f.read_bytes()) for f in samples.references.iterdir()}
        assert reference_shas <= before
