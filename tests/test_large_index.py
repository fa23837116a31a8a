"""Large indexes (issue 12, items 3 and 4): the auto factory, nprobe, streamed and sharded builds, mmap loading.

Real FAISS throughout, at small sizes: what is compared is search results,
which a wrong build, a wrong merge or an ignored nprobe changes.
"""

from __future__ import annotations

import numpy as np
import pytest

from moderation.config import Settings
from moderation.errors import ConfigError, ModerationError
from moderation.faiss_import import load_faiss
from moderation.index import ReferenceIndex, build_index
from moderation.index_config import IndexOptions, auto_nlist, auto_nprobe, plan_index
from moderation.index_shards import build_shard, merge_shards, search_together
from moderation.index_stream import _Sample, build_index_streaming, row_keys, train_empty_index
from moderation.statistics import l2n

faiss = load_faiss()


def clustered(n: int, d: int = 32, seed: int = 0, clusters: int = 40) -> np.ndarray:
    """Unit vectors around ``clusters`` centres: neighbourhoods an IVF can find."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    return l2n(centres[rng.integers(clusters, size=n)] + 0.4 * rng.normal(size=(n, d))).astype(np.float32)


def ids_of(n: int, prefix: str = "r") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def chunked(x: np.ndarray, ids: list[str], sizes: list[int]):
    """A chunk source cutting (x, ids) at ``sizes`` (cycled), fresh on each call."""
    def source():
        start, i = 0, 0
        while start < len(x):
            end = start + sizes[i % len(sizes)]
            yield x[start:end], ids[start:end]
            start, i = end, i + 1
    return source


@pytest.fixture
def one_thread():
    # An HNSW coarse quantiser is built in parallel, in an order that varies between runs.
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


# --- the auto factory ------------------------------------------------------------------------------------

def test_auto_is_flat_below_the_threshold_and_ivf_sq8_above():
    opts = IndexOptions(flat_max=1000)
    assert plan_index(999, "auto", opts).factory == "Flat"
    assert plan_index(999, "auto", opts).nprobe is None
    big = plan_index(1000, "auto", opts)
    assert big.factory == "IVF64,SQ8" and big.nprobe == 32 and big.train_size == 1000
    assert plan_index(10_000_000, "auto").factory == "IVF4096_HNSW32,SQ8"
    assert plan_index(1_000_000, "auto").factory == "IVF1024,SQ8"
    assert plan_index(500_000, "AUTO").factory == "Flat"


def test_nlist_and_nprobe_grow_with_size_and_settings_override_nprobe():
    assert [auto_nlist(n) for n in (10, 1_000_000, 10_000_000, 100_000_000)] == [64, 1024, 4096, 16384]
    assert auto_nprobe(64) == 32 and auto_nprobe(1024) == 32 and auto_nprobe(16384) == 256
    assert plan_index(10_000_000, "auto", IndexOptions(nprobe=40)).nprobe == 40
    assert plan_index(5000, "IVF8,Flat", IndexOptions(nprobe=40)).nprobe == 8  # never more than nlist
    assert plan_index(10_000_000, "auto").train_size == 40 * 4096
    assert plan_index(10_000_000, "auto", IndexOptions(train_size=5000)).train_size == 5000


def test_explicit_factory_is_kept_and_bad_settings_are_named():
    assert plan_index(10, "HNSW32").factory == "HNSW32"
    with pytest.raises(ConfigError, match="MODERATION_INDEX_FACTORY is empty"):
        plan_index(10, " ")
    with pytest.raises(ConfigError, match="MODERATION_INDEX_FLAT_MAX"):
        Settings.from_env({"MODERATION_INDEX_FLAT_MAX": "0"})
    with pytest.raises(ConfigError, match="MODERATION_INDEX_NPROBE"):
        Settings.from_env({"MODERATION_INDEX_NPROBE": "-1"})
    s = Settings.from_env({"MODERATION_INDEX_FLAT_MAX": "5000", "MODERATION_INDEX_NPROBE": "7"})
    assert IndexOptions.from_settings(s) == IndexOptions(flat_max=5000, nprobe=7)


def test_build_index_resolves_auto_and_records_the_resolved_factory():
    x = clustered(3000)
    small = build_index(x, ids_of(3000), "auto", options=IndexOptions(flat_max=5000))
    assert small.factory == "Flat" and small.nprobe is None
    big = build_index(x, ids_of(3000), "auto", options=IndexOptions(flat_max=2000))
    assert big.factory == "IVF64,SQ8" and big.nprobe == 32
    assert faiss.extract_index_ivf(big.index).nlist == 64
    meta_roundtrip = ReferenceIndex.deserialise(*big.serialise())
    assert (meta_roundtrip.factory, meta_roundtrip.nprobe) == ("IVF64,SQ8", 32)


def test_build_index_reads_the_settings_when_given_no_options(monkeypatch):
    monkeypatch.setenv("MODERATION_INDEX_FLAT_MAX", "100")
    monkeypatch.setenv("MODERATION_INDEX_NPROBE", "3")
    idx = build_index(clustered(3000), ids_of(3000), "auto")
    assert idx.factory == "IVF64,SQ8" and idx.nprobe == 3


# --- nprobe and the disabled-reference selector on IVF ----------------------------------------------------

def test_search_uses_the_index_nprobe():
    x, q = clustered(4000), clustered(50, seed=1)
    idx = build_index(x, ids_of(4000), "IVF64,Flat", options=IndexOptions(train_size=4000))
    exact = build_index(x, ids_of(4000), "Flat")
    _, want = exact.search(q, 10)
    idx.nprobe = 64  # every list: an IVF over unquantised vectors is then exact
    _, got_all = idx.search(q, 10)
    assert got_all == want
    idx.nprobe = 1
    _, got_one = idx.search(q, 10)
    assert got_one != want  # one list misses neighbours: nprobe reached FAISS
    assert faiss.extract_index_ivf(idx.index).nprobe == 32  # and the index itself was not changed


@pytest.mark.parametrize("factory", ["IVF64,SQ8", "IVF64_HNSW32,SQ8"])
def test_disabled_references_on_ivf_are_dropped_exactly(factory, one_thread):
    x, q = clustered(4000), clustered(30, seed=2)
    ids = ids_of(4000)
    idx = build_index(x, ids, factory, options=IndexOptions(train_size=4000))
    _, wide = idx.search(q, 60)
    drop = {row[i] for row in wide for i in (0, 2, 5)}  # some of each query's own top results
    scores, got = idx.without(drop).search(q, 10)
    want = [[rid for rid in row if rid not in drop][:10] for row in wide]
    assert got == want
    assert all(len(row) == 10 for row in got) and not drop & {rid for row in got for rid in row}


# --- streamed build ---------------------------------------------------------------------------------------

def test_sample_rows_do_not_depend_on_chunking_and_the_sample_stays_bounded():
    whole = row_keys(0, 1000)
    assert np.array_equal(np.concatenate([row_keys(0, 300), row_keys(300, 700)]), whole)
    assert len(np.unique(whole)) == 1000
    x = clustered(1000)
    sample = _Sample(100)
    for start in range(0, 1000, 70):
        sample.offer(start, x[start:start + 70])
        assert len(sample.vectors) <= 100  # never more than the sample, whatever has been read
    want = np.sort(np.argsort(whole)[:100])
    np.testing.assert_array_equal(sample.in_row_order(), x[want])


@pytest.mark.parametrize("factory", ["IVF32,SQ8", "IVF32,PQ8", "Flat", "IVF64_HNSW32,SQ8"])
def test_streamed_build_equals_in_memory_build(factory, one_thread):
    x, q = clustered(5000), clustered(40, seed=3)
    ids = ids_of(5000)
    opts = IndexOptions(train_size=2500, nprobe=4)
    memory = build_index(x, ids, factory, options=opts)
    streamed = build_index_streaming(chunked(x, ids, [700, 1300, 1]), 5000, factory, opts)
    assert streamed.ids == memory.ids and streamed.factory == memory.factory == factory
    s_mem, r_mem = memory.search(q, 10)
    s_str, r_str = streamed.search(q, 10)
    assert r_str == r_mem
    np.testing.assert_array_equal(s_str, s_mem)
    assert streamed.serialise()[0] == memory.serialise()[0]  # the very same index


def test_streamed_build_reads_the_source_in_two_passes_of_chunks():
    x = clustered(6000)
    ids = ids_of(6000)
    seen_arrays: list[int] = []

    def source():
        for start in range(0, 6000, 1000):
            chunk = x[start:start + 1000].copy()  # a fresh array per chunk, as a part read from the store
            seen_arrays.append(id(chunk))
            yield chunk, ids[start:start + 1000]

    idx = build_index_streaming(source, 6000, "IVF16,SQ8", IndexOptions(train_size=640))
    assert len(idx) == 6000 and len(seen_arrays) == 12  # two passes, six chunks each
    ivf = faiss.extract_index_ivf(idx.index)
    assert ivf.cp.niter == 10 and idx.nprobe == 16  # the floor of 32, capped at the 16 lists


def test_streamed_build_refuses_a_source_that_changed_or_repeats_ids():
    x = clustered(3000)
    ids = ids_of(3000)
    with pytest.raises(ModerationError, match="yielded 3000 vectors, 3500 were announced"):
        build_index_streaming(chunked(x, ids, [1000]), 3500, "IVF16,SQ8", IndexOptions())
    dup = ids[:1500] + ids[:1500]
    with pytest.raises(ModerationError, match="unique"):
        build_index_streaming(chunked(x, dup, [1000]), 3000, "Flat", IndexOptions())
    with pytest.raises(ModerationError, match="invalid FAISS factory string 'IVF,,'"):
        build_index_streaming(chunked(x, ids, [1000]), 3000, "IVF,,", IndexOptions())
    with pytest.raises(ModerationError, match="no reference vectors"):
        build_index_streaming(lambda: iter(()), 0, "auto", IndexOptions())


# --- shards -----------------------------------------------------------------------------------------------

def test_merged_ivf_shards_answer_as_one_build(one_thread):
    x, q = clustered(6000), clustered(40, seed=4)
    ids = ids_of(6000)
    opts = IndexOptions(train_size=3000, nprobe=8)
    source = chunked(x, ids, [2000])
    single = build_index_streaming(source, 6000, "IVF32,SQ8", opts)
    template = train_empty_index(source, 6000, "IVF32,SQ8", opts)
    shards = [build_shard(template, [(x[a:a + 2000], ids[a:a + 2000])]) for a in (0, 2000, 4000)]
    assert len(template) == 0 and [len(s) for s in shards] == [2000, 2000, 2000]
    merged = merge_shards(shards)
    assert merged.ids == ids and merged.nprobe == 8 and all(len(s) == 0 for s in shards)
    s1, r1 = single.search(q, 10)
    s2, r2 = merged.search(q, 10)
    assert r2 == r1
    np.testing.assert_array_equal(s2, s1)
    again = ReferenceIndex.deserialise(*merged.serialise())
    assert again.search(q, 10)[1] == r1


def test_flat_shards_searched_together_equal_one_flat_index():
    x, q = clustered(3000), clustered(25, seed=5)
    ids = ids_of(3000)
    single = build_index(x, ids, "Flat")
    shards = [build_index(x[a:a + 1000], ids[a:a + 1000], "Flat") for a in (0, 1000, 2000)]
    together = search_together(shards)
    s1, r1 = single.search(q, 10)
    s2, r2 = together.search(q, 10)
    assert r2 == r1
    np.testing.assert_allclose(s2, s1, atol=1e-6)
    drop = {row[0] for row in r1} | {"r1500", "r2999"}
    assert together.without(drop).search(q, 10)[1] == single.without(drop).search(q, 10)[1]
    with pytest.raises(ModerationError, match="merge them"):
        together.serialise()
    merged = merge_shards(shards)
    assert merged.search(q, 10)[1] == r1
    assert all(len(s) == 0 and s.ids == [] for s in shards)  # the vectors moved, none is held twice


def test_shards_from_different_templates_or_sharing_ids_are_refused():
    x = clustered(4000)
    ids = ids_of(4000)
    t1 = train_empty_index(chunked(x, ids, [4000]), 4000, "IVF16,SQ8", IndexOptions(train_size=1000))
    t2 = train_empty_index(chunked(x[::-1].copy(), ids, [4000]), 4000, "IVF16,SQ8", IndexOptions(train_size=1000))
    a = build_shard(t1, [(x[:2000], ids[:2000])])
    b = build_shard(t2, [(x[2000:], ids[2000:])])
    with pytest.raises(ModerationError, match="one trained template"):
        merge_shards([a, b])
    c = build_shard(t1, [(x[2000:], ids[:2000])])
    with pytest.raises(ModerationError, match="more than one shard"):
        merge_shards([a, c])
    with pytest.raises(ModerationError, match="trained, empty"):
        build_shard(a, [])


def test_mapped_shards_are_not_merged(tmp_path):
    x = clustered(2000)
    ids = ids_of(2000)
    template = train_empty_index(chunked(x, ids, [2000]), 2000, "IVF8,SQ8", IndexOptions(train_size=1000))
    a = build_shard(template, [(x[:1000], ids[:1000])])
    b = build_shard(template, [(x[1000:], ids[1000:])])
    meta = b.save(tmp_path / "b.faiss")
    mapped_b = ReferenceIndex.load(tmp_path / "b.faiss", meta, mmap=True)
    with pytest.raises(ModerationError, match="memory-mapped shard cannot be merged"):
        merge_shards([a, mapped_b])
    assert len(a) == 1000  # refused before anything moved


# --- memory-mapped loading --------------------------------------------------------------------------------

def _resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20


@pytest.mark.parametrize("factory", ["Flat", "IVF16,SQ8"])
def test_mmap_load_searches_the_same_without_reading_the_file(tmp_path, factory):
    rng = np.random.default_rng(6)
    n, d = 60_000, 256  # 60 MB of float32 for Flat
    x = l2n(rng.normal(size=(n, d))).astype(np.float32)
    built = build_index(x, ids_of(n), factory, options=IndexOptions(train_size=2000))
    q = x[:20] + 0.01
    want = built.search(q, 5)
    meta = built.save(tmp_path / "index.faiss")
    size_mib = (tmp_path / "index.faiss").stat().st_size / 2 ** 20
    before = _resident_mib()
    mapped = ReferenceIndex.load(tmp_path / "index.faiss", meta, mmap=True)
    grown = _resident_mib() - before
    assert grown < size_mib / 4, f"mapping grew the resident set by {grown:.0f} MiB of a {size_mib:.0f} MiB file"
    got = mapped.search(q, 5)
    assert got[1] == want[1] and mapped.factory == factory
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)
    with pytest.raises(ModerationError, match="memory-mapped and read-only"):
        mapped.add(x[:1], ["new"])  # FAISS itself would abort the process
    read = ReferenceIndex.load(tmp_path / "index.faiss", meta)
    assert read.search(q, 5)[1] == want[1]
    read.add(x[:1], ["new"])
    assert len(read) == n + 1


def test_load_explains_a_missing_or_foreign_file(tmp_path):
    with pytest.raises(ModerationError, match="does not exist; write it with ReferenceIndex.save"):
        ReferenceIndex.load(tmp_path / "nope.faiss", b"{}", mmap=True)
    (tmp_path / "junk.faiss").write_bytes(b"not an index at all")
    with pytest.raises(ModerationError, match="not a readable FAISS index"):
        ReferenceIndex.load(tmp_path / "junk.faiss", b"{}", mmap=True)
