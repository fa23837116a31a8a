"""Nightly index builds read only what changed, on Postgres and an S3 server on loopback.

Every object read from the store is counted by a wrapper around the real
store (the one the pipeline uses and the one the image source's reads go
through). A second build with nothing changed reads no image; with one new,
one changed and one deleted reference it reads exactly the two changed
objects once each; the incremental index answers like a full rebuild.
"""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest

from conftest import fast_env, s3_env
from local_images import textured
from store_wrappers import PassThrough

N_REFS = 8


class ReadCounter(PassThrough):
    """The real store, counting the objects and bytes fetched under ``references/``."""

    def __init__(self, inner):
        super().__init__(inner)
        self.reads: Counter[str] = Counter()
        self.bytes = 0

    def get(self, key):
        data = self.inner.get(key)
        if key.startswith("references/"):
            self.reads[key] += 1
            self.bytes += len(data)
        return data

    def reset(self):
        self.reads.clear()
        self.bytes = 0


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    textured(seed, size=(256, 192)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def pipeline(pg_url, s3_server, tmp_path_factory):
    from moderation import embedding
    from moderation.config import Settings
    from moderation.db import connect
    from moderation.embedding import FolderSource
    from moderation.jobs import Pipeline, refresh_stats
    from moderation.store import open_store

    root = tmp_path_factory.mktemp("nightly")
    (root / "background").mkdir()
    for i in range(12):
        textured(8100 + i, shapes=50 + i).save(root / "background" / f"B{i}.jpg", quality=92)
    env = {**fast_env(tmp_path_factory.mktemp("nightly-home")), **s3_env(s3_server, "nightly-e2e"),
           "MODERATION_DATABASE_URL": pg_url, "MODERATION_VIEWS": "full", "MODERATION_MAX_LOCAL_FEATURES": "64"}
    settings = Settings.from_env(env)
    store = ReadCounter(open_store(settings))
    for i in range(N_REFS):
        store.put(f"references/R{i}.jpg", jpeg(8000 + i))
    # The source's reads go through the same counted store (workers are off: one process).
    embedding._STORES[settings.store_url] = store
    p = Pipeline(settings, store, connect(settings.database_url))
    refresh_stats(p, FolderSource(root / "background"))
    yield p
    embedding._STORES.pop(settings.store_url, None)
    p.db.engine.dispose()


def _search_all(p, version, queries):
    index, _ = p.load_index(version)
    scores, ids = index.search(queries, 5)
    return scores, ids


def test_second_build_reads_nothing_and_changes_are_read_once(pipeline):
    from moderation.embedding import StoreSource
    from moderation.jobs import build_reference_index
    from moderation.local_features import FeatureCache
    from moderation.reference_changes import MANIFEST_FILE, read_manifest
    from moderation.registry import Kind
    from moderation.two_stage import TwoStageConfig

    p = pipeline
    store: ReadCounter = p.store
    source = StoreSource(p.settings, "references/")

    first = build_reference_index(p, source)
    assert first.count == N_REFS and MANIFEST_FILE in first.files
    # Each reference read once: hash, vector, PDQ and local features from the same bytes.
    assert store.reads == Counter({f"references/R{i}.jpg": 1 for i in range(N_REFS)})
    assert first.info["local_features"]["computed"] == N_REFS and first.info["pdq"] == {"hashes": N_REFS}
    manifest = read_manifest(p.registry.load(Kind.INDEX, first, MANIFEST_FILE))
    assert all(e.fingerprint and len(e.sha256) == 64 for e in manifest.references.values()) and not manifest.failed

    store.reset()
    again = build_reference_index(p, source)
    assert again.version == first.version
    assert store.bytes == 0 and not store.reads

    # One new, one changed (same key, new bytes), one deleted.
    store.put("references/R_new.jpg", jpeg(8900))
    store.put("references/R1.jpg", jpeg(8901))
    store.delete("references/R2.jpg")
    store.reset()
    nightly = build_reference_index(p, source)
    assert store.reads == Counter({"references/R_new.jpg": 1, "references/R1.jpg": 1})
    assert nightly.info["build"] == "incremental"
    assert nightly.info["changes"] == {"unchanged": N_REFS - 2, "new": 1, "changed": 1, "deleted": 1, "to_read": 2,
                                      "still_failed": 0}
    index, locations = p.load_index(nightly)
    assert "R2" not in index.ids and "R2" not in locations and "R_new" in index.ids and len(index) == N_REFS
    shas = p.index_shas(nightly)
    assert shas["R1"] != p.index_shas(first)["R1"]
    features = FeatureCache(p.store, TwoStageConfig.from_settings(p.settings).features)
    assert not features.missing(list(shas.values()))

    # A full rebuild reads every reference once and answers every query the same way.
    store.reset()
    full = build_reference_index(p, source, full=True)
    assert full.info["build"] == "full" and full.version != nightly.version
    assert store.reads == Counter({k: 1 for k in locations.values()})
    rng = np.random.default_rng(0)
    full_index, _ = p.load_index(full)
    queries = np.concatenate([full_index.index.reconstruct_n(0, len(full_index)),
                              rng.standard_normal((20, full_index.dim)).astype(np.float32)])
    s_inc, ids_inc = _search_all(p, nightly, queries)
    s_full, ids_full = _search_all(p, full, queries)
    assert ids_inc == ids_full
    np.testing.assert_allclose(s_inc, s_full, rtol=0, atol=1e-5)


def test_missing_cache_entry_of_an_unchanged_reference_is_read(pipeline):
    from moderation.embedding import StoreSource
    from moderation.jobs import build_reference_index
    from moderation.local_features import FeatureCache
    from moderation.two_stage import TwoStageConfig

    p = pipeline
    store: ReadCounter = p.store
    source = StoreSource(p.settings, "references/")
    before = build_reference_index(p, source)
    features = FeatureCache(p.store, TwoStageConfig.from_settings(p.settings).features)
    sha = p.index_shas(before)["R3"]
    store.delete(features.key(sha))
    store.reset()
    build_reference_index(p, source)
    assert store.reads == Counter({"references/R3.jpg": 1})
    assert not features.missing([sha])


def test_full_rebuild_setting_reads_everything(pipeline):
    from dataclasses import replace

    from moderation.embedding import StoreSource
    from moderation.jobs import Pipeline, build_reference_index

    p = pipeline
    store: ReadCounter = p.store
    forced = Pipeline(replace(p.settings, index_full_rebuild=True), store, p.db)
    store.reset()
    version = build_reference_index(forced, StoreSource(p.settings, "references/"))
    assert version.info["build"] == "full"
    assert set(store.reads.values()) == {1} and len(store.reads) == version.count


def test_ivf_index_grows_in_place_until_the_growth_factor_then_retrains(pipeline, monkeypatch):
    from dataclasses import replace

    from moderation.embedding import StoreSource
    from moderation.jobs import Pipeline, build_reference_index
    from moderation.vector_cache import VectorCache

    p = pipeline
    store: ReadCounter = p.store
    ivf = Pipeline(replace(p.settings, index_factory="IVF2,Flat", index_retrain_growth=1.2), store, p.db)
    source = StoreSource(p.settings, "references/")
    fetched = []
    real_get = VectorCache.get
    model = p.current_model().version  # the descriptor's cache, not the PDQ hashes' (also a VectorCache)
    monkeypatch.setattr(VectorCache, "get", lambda self, sha: (self.model_version == model and fetched.append(sha))
                        or real_get(self, sha))
    store.reset()
    first = build_reference_index(ivf, source)  # the factory changed: a full build, trained on all
    assert first.info["build"] == "full" and first.info["trained_count"] == first.count
    # Built from the cache a part at a time (VectorCache.stream), not by gathering every vector: no image read.
    assert fetched == [] and store.reads == Counter()
    assert sorted(p.load_index(first)[0].ids) == sorted(p.load_index(p.current_index(p.current_model()))[0].ids)
    store.put("references/R_ivf1.jpg", jpeg(8950))
    store.reset()
    grown = build_reference_index(ivf, source)  # within 1.2 x the trained count: added in place
    assert grown.info["build"] == "incremental" and grown.info["trained_count"] == first.count
    assert grown.count == first.count + 1 and store.reads == Counter({"references/R_ivf1.jpg": 1})
    assert "R_ivf1" in p.load_index(grown)[0].ids
    store.put("references/R_ivf2.jpg", jpeg(8951))
    store.put("references/R_ivf3.jpg", jpeg(8952))
    store.reset()
    retrained = build_reference_index(ivf, source)
    assert retrained.info["build"] == "full" and retrained.info["trained_count"] == first.count + 3
    assert store.reads == Counter({"references/R_ivf2.jpg": 1, "references/R_ivf3.jpg": 1})


class IndexTransfers(PassThrough):
    """The real store, noting how ``index.faiss`` objects move: whole (get/put) or through a file."""

    def __init__(self, inner):
        super().__init__(inner)
        self.moves: list[str] = []

    def get(self, key):
        if key.endswith("/index.faiss"):
            self.moves.append("get whole")
        return self.inner.get(key)

    def put(self, key, data, content_type="application/octet-stream"):
        if key.endswith("/index.faiss"):
            self.moves.append("put whole")
        self.inner.put(key, data, content_type)

    def get_file(self, key, path):
        if key.endswith("/index.faiss"):
            self.moves.append("get file")
        self.inner.get_file(key, path)

    def put_file(self, key, path, content_type="application/octet-stream"):
        if key.endswith("/index.faiss"):
            self.moves.append("put file")
        self.inner.put_file(key, path, content_type)


def test_index_moves_through_files_and_pdq_hashes_stream(pipeline, monkeypatch):
    """Bounded memory at 10M references: the index is never in memory beside its own bytes, and the
    PDQ file is filled from the hash cache a part at a time, not one lookup (and one object) per hash."""
    from moderation.embedding import StoreSource
    from moderation.jobs import Pipeline, build_reference_index
    from moderation.pdq import CACHE_MODEL, PdqIndex, cached_hash, pdq_cache
    from moderation.pdq_matching import PDQ_FILE
    from moderation.registry import Kind
    from moderation.vector_cache import Namespace, VectorCache

    p = pipeline
    watched = IndexTransfers(p.store)
    q = Pipeline(p.settings, watched, p.db)
    one_by_one = []
    real_get = VectorCache.get
    monkeypatch.setattr(VectorCache, "get", lambda self, sha: (self.model_version == CACHE_MODEL
                                                               and one_by_one.append(sha)) or real_get(self, sha))
    source = StoreSource(p.settings, "references/")
    build_reference_index(q, source)  # whatever the earlier tests left: now in force, Flat
    watched.put("references/R_file.jpg", jpeg(8960))
    watched.moves.clear()
    version = build_reference_index(q, source)
    assert version.info["build"] == "incremental"
    assert watched.moves == ["get file", "put file"]
    assert one_by_one == []
    monkeypatch.setattr(VectorCache, "get", real_get)
    # The streamed PDQ file holds what a lookup per reference gives, in the index's reference order.
    pdq = PdqIndex.from_bytes(p.registry.load(Kind.INDEX, version, PDQ_FILE))
    shas = p.index_shas(version)
    cache = pdq_cache(p.store, Namespace.REFERENCES)
    locations = p.load_index(version)[1]
    expected = [(rid, cached_hash(cache, shas[rid])) for rid in sorted(shas, key=locations.__getitem__)]
    assert pdq.ids == [rid for rid, _ in expected] and "R_file" in pdq.ids
    assert [bytes(c) for c in pdq.codes] == [h.bits for _, h in expected]
    assert list(pdq.quality) == [-1 if h.quality is None else h.quality for _, h in expected]


def corrupt_jpeg() -> bytes:
    return jpeg(8990)[:300]  # a JPEG cut short: its header lists, its data does not decode


def test_a_reference_that_fails_is_read_once_until_it_is_replaced(pipeline):
    from moderation.embedding import StoreSource
    from moderation.jobs import build_reference_index
    from moderation.reference_changes import MANIFEST_FILE, read_manifest
    from moderation.registry import Kind

    p = pipeline
    store: ReadCounter = p.store
    source = StoreSource(p.settings, "references/")
    build_reference_index(p, source)
    store.put("references/R_bad.jpg", corrupt_jpeg())
    store.reset()
    first = build_reference_index(p, source)
    assert store.reads == Counter({"references/R_bad.jpg": 1})
    assert "R_bad" not in p.load_index(first)[0].ids
    failed = read_manifest(p.registry.load(Kind.INDEX, first, MANIFEST_FILE)).failed
    assert list(failed) == ["R_bad"] and failed["R_bad"].fingerprint and failed["R_bad"].reason
    assert [f["image_id"] for f in first.info["failures"]["images"]] == ["R_bad"]

    # Unchanged: not read again, nothing to publish.
    store.reset()
    again = build_reference_index(p, source)
    assert again.version == first.version and store.bytes == 0 and not store.reads

    # Another reference arrives: the broken one is still listed and counted as a failure, without a read.
    store.put("references/R_good.jpg", jpeg(8991))
    store.reset()
    nightly = build_reference_index(p, source)
    assert store.reads == Counter({"references/R_good.jpg": 1})
    assert nightly.info["changes"]["still_failed"] == 1 and nightly.info["changes"]["to_read"] == 1
    assert nightly.info["failures"]["count"] == 1 and nightly.info["failures"]["not_read"] == 1
    assert nightly.info["failures"]["images"][0]["reason"] == failed["R_bad"].reason
    assert "R_bad" in read_manifest(p.registry.load(Kind.INDEX, nightly, MANIFEST_FILE)).failed

    # Replaced by a valid image: read once and indexed.
    store.put("references/R_bad.jpg", jpeg(8992))
    store.reset()
    fixed = build_reference_index(p, source)
    assert store.reads == Counter({"references/R_bad.jpg": 1})
    assert "R_bad" in p.load_index(fixed)[0].ids and fixed.info["failures"]["count"] == 0
    assert not read_manifest(p.registry.load(Kind.INDEX, fixed, MANIFEST_FILE)).failed

    # A full rebuild reads a failed reference again too.
    store.put("references/R_bad.jpg", corrupt_jpeg())
    build_reference_index(p, source)
    store.reset()
    full = build_reference_index(p, source, full=True)
    assert store.reads["references/R_bad.jpg"] == 1 and full.info["failures"]["not_read"] == 0
    store.delete("references/R_bad.jpg")


def test_a_failed_fetch_is_not_remembered_as_a_lasting_failure(pipeline):
    from moderation.embedding import StoreSource
    from moderation.images import ImageRef
    from moderation.reference_reader import ReferenceReader

    p = pipeline
    store: ReadCounter = p.store
    store.put("references/R_broken.jpg", corrupt_jpeg())
    fingerprint = {r.location: r.fingerprint for r in StoreSource(p.settings, "references/").listed()}
    reader = ReferenceReader(p, p.load(p.current_model()), StoreSource(p.settings, "references/"))
    # The object vanished after the listing: an error of the fetch, worth another try tomorrow.
    reader.read([ImageRef("R_gone", "references/R_gone.jpg", fingerprint="5:etag"),
                 ImageRef("R_broken", "references/R_broken.jpg", fingerprint=fingerprint["references/R_broken.jpg"])])
    assert sorted(f.image_id for f in reader.failures) == ["R_broken", "R_gone"]
    assert [(f.image_id, f.fingerprint) for f in reader.lasting] == [
        ("R_broken", fingerprint["references/R_broken.jpg"])]
    store.delete("references/R_broken.jpg")


def test_full_rebuild_holds_at_most_the_bound_of_fresh_vectors_and_builds_the_same_index(pipeline, monkeypatch):
    from dataclasses import replace

    from moderation import reference_reader
    from moderation.embedding import StoreSource
    from moderation.jobs import Pipeline, build_reference_index

    p = pipeline
    store: ReadCounter = p.store
    ivf = Pipeline(replace(p.settings, index_factory="IVF2,Flat"), store, p.db)
    source = StoreSource(p.settings, "references/")
    store.put("references/R_same.jpg", jpeg(8000))  # the bytes of R0 under another id: one vector computed
    model = p.current_model().version
    readers, batches, held = [], [], []
    real_init, real_embed = reference_reader.ReferenceReader.__init__, reference_reader.embed

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        readers.append(self)

    def embed(*args, refs, **kwargs):
        reader = readers[-1]
        batches.append(len(refs))
        held.append(len(reader.fresh) + len(reader.cache._vectors))  # the cache keeps none of them either
        return real_embed(*args, refs=refs, **kwargs)

    monkeypatch.setattr(reference_reader.ReferenceReader, "__init__", init)
    monkeypatch.setattr(reference_reader, "embed", embed)

    def full_build_from_cold_cache():
        for key in list(store.list(f"embeddings/{model}/references/")):
            store.delete(key)  # every vector is computed again: the most a full re-read can hold
        store.reset()
        version = build_reference_index(ivf, source, full=True)
        assert set(store.reads.values()) == {1} and len(store.reads) == version.count
        return version, readers[-1]

    whole, unbounded = full_build_from_cold_cache()
    assert not unbounded.spilled and unbounded.peak_fresh == whole.count
    bound = 3
    monkeypatch.setattr(reference_reader, "FRESH_VECTORS_MAX", bound)
    batches.clear()
    held.clear()
    bounded_version, bounded = full_build_from_cold_cache()
    assert bounded.spilled and bounded.peak_fresh <= bound
    assert max(batches) <= bound and sum(batches) == whole.count and max(held) <= bound
    assert len(bounded.fresh) + len(bounded.cache._vectors) <= bound

    a, _ = p.load_index(whole)
    b, _ = p.load_index(bounded_version)
    assert a.ids == b.ids  # the same order: the IVF's training sample and lists are those of the unbounded build
    rng = np.random.default_rng(1)
    queries = np.concatenate([a.index.reconstruct_n(0, len(a)), rng.standard_normal((20, a.dim)).astype(np.float32)])
    s_a, ids_a = _search_all(p, whole, queries)
    s_b, ids_b = _search_all(p, bounded_version, queries)
    same_image = {"R_same": "R0"}  # one vector under two ids: their tie may come in either order

    def canonical(rows):
        return [[same_image.get(i, i) for i in row] for row in rows]

    assert canonical(ids_a) == canonical(ids_b)
    np.testing.assert_allclose(s_a, s_b, rtol=0, atol=1e-5)
    store.delete("references/R_same.jpg")
