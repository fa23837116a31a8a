"""The vector cache's streaming reader (issue 12, item 3), on a real S3 server, feeding a streamed index build."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from store_wrappers import PassThrough

from conftest import fast_env, s3_env
from moderation.config import Settings
from moderation.index import build_index
from moderation.index_config import IndexOptions
from moderation.index_stream import build_index_streaming
from moderation.store import open_store
from moderation.vector_cache import Namespace, VectorCache, write_part


@pytest.fixture
def store(tmp_path, s3_server, s3_bucket):
    return open_store(Settings.from_env({**fast_env(tmp_path / "home"), **s3_env(s3_server, s3_bucket)}))


class CountingStore(PassThrough):
    def __init__(self, inner):
        super().__init__(inner)
        self.fetched: list[str] = []

    def get(self, key):
        self.fetched.append(key)
        return self.inner.get(key)


def sha(i: int) -> str:
    return f"{i:064x}"


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, 16)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def three_parts(store) -> dict[str, np.ndarray]:
    vectors = {}
    for p, (start, n) in enumerate([(0, 300), (300, 500), (800, 200)]):
        shas, x = [sha(i) for i in range(start, start + n)], unit(n, p)
        write_part(store, "mv1", Namespace.REFERENCES, shas, x)
        vectors.update(zip(shas, x))
    return vectors


def test_stream_yields_each_part_once_and_only_the_asked_shas(store):
    vectors = three_parts(store)
    counting = CountingStore(store)
    cache = VectorCache(counting, "mv1")
    counting.fetched.clear()
    want = {sha(i) for i in range(250, 350)}  # spans the first two parts only
    chunks = list(cache.stream(want))
    assert sorted(s for shas, _ in chunks for s in shas) == sorted(want)
    assert len(chunks) == 2 and len(counting.fetched) == 2 and len(set(counting.fetched)) == 2
    for shas, x in chunks:
        np.testing.assert_array_equal(x, np.stack([vectors[s] for s in shas]))
    assert cache.get(sha(5)) is not None  # nothing was consumed: the cache still answers
    everything = list(cache.stream())
    assert sum(len(s) for s, _ in everything) == 1000
    assert len({s for shas, _ in everything for s in shas}) == 1000  # sha(0..299) loaded by get: once, not twice


def test_a_corrupt_part_is_dropped_and_its_shas_are_missing_from_the_stream(store, caplog):
    three_parts(store)
    cache = VectorCache(store, "mv1")
    key = sorted(k for k in store.list("embeddings/mv1/references/") if k.endswith(".npz"))[1]
    data = bytearray(store.get(key))
    data[len(data) // 2] ^= 1
    store.put(key, bytes(data))
    with caplog.at_level(logging.WARNING):
        got = [s for shas, _ in cache.stream() for s in shas]
    assert len(got) < 1000 and "is corrupt" in caplog.text
    assert key not in list(store.list("embeddings/mv1/references/"))


def test_streamed_parts_build_the_same_index_as_all_vectors_at_once(store):
    vectors = three_parts(store)
    cache = VectorCache(store, "mv1")
    order = [s for shas, _ in cache.stream() for s in shas]
    opts = IndexOptions(train_size=500, nprobe=4)
    streamed = build_index_streaming(lambda: ((x, shas) for shas, x in cache.stream()), 1000, "IVF8,SQ8", opts)
    whole = build_index(np.stack([vectors[s] for s in order]), order, "IVF8,SQ8", options=opts)
    q = unit(20, 9)
    assert streamed.search(q, 5)[1] == whole.search(q, 5)[1]
