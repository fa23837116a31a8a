"""The reference index: FAISS build, search, serialise; factories and their errors."""

from __future__ import annotations

import numpy as np
import pytest

from moderation.errors import ModerationError
from moderation.index import ReferenceIndex, build_index
from moderation.statistics import l2n


def unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    return l2n(np.random.default_rng(seed).normal(size=(n, d)))


def brute_force(x: np.ndarray, q: np.ndarray, k: int):
    sims = q @ x.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


def test_flat_search_matches_brute_force():
    x = unit(200, 16)
    ids = [f"r{i:03d}" for i in range(200)]
    idx = build_index(x, ids)
    assert idx.factory == "Flat" and len(idx) == 200 and idx.dim == 16
    q = unit(7, 16, seed=1)
    scores, got = idx.search(q, 5)
    exp_scores, exp_idx = brute_force(x, q, 5)
    assert scores.shape == (7, 5) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, exp_scores, atol=1e-5)
    assert got == [[ids[j] for j in row] for row in exp_idx]
    assert np.all(np.diff(scores, axis=1) <= 1e-7)  # sorted by decreasing score


def test_search_finds_itself_first():
    x = unit(50, 8)
    ids = [f"id-{i}" for i in range(50)]
    idx = build_index(x, ids)
    scores, got = idx.search(x[[3, 17]], 3)
    assert [row[0] for row in got] == ["id-3", "id-17"]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_k_larger_than_index_and_empty_queries():
    idx = build_index(unit(4, 8), list("abcd"))
    scores, got = idx.search(unit(2, 8, seed=2), 10)
    assert scores.shape == (2, 4) and all(sorted(row) == list("abcd") for row in got)
    scores, got = idx.search(np.zeros((0, 8), np.float32), 3)
    assert scores.shape == (0, 0) and got == []


def test_query_dimension_mismatch():
    idx = build_index(unit(4, 8), list("abcd"))
    with pytest.raises(ModerationError, match="dimension 16, index has 8"):
        idx.search(unit(1, 16), 2)


def test_serialise_round_trip():
    x = unit(120, 16)
    ids = [f"ref/{i}" for i in range(120)]
    idx = build_index(x, ids)
    index_bytes, ids_bytes = idx.serialise()
    assert isinstance(index_bytes, bytes) and isinstance(ids_bytes, bytes)
    back = ReferenceIndex.deserialise(index_bytes, ids_bytes)
    assert back.ids == ids and back.factory == "Flat" and len(back) == 120
    q = unit(5, 16, seed=4)
    s1, i1 = idx.search(q, 4)
    s2, i2 = back.search(q, 4)
    np.testing.assert_array_equal(s1, s2)
    assert i1 == i2


def test_deserialise_rejects_mismatched_ids():
    idx = build_index(unit(10, 8), [str(i) for i in range(10)])
    index_bytes, _ = idx.serialise()
    with pytest.raises(ModerationError, match="corrupt"):
        ReferenceIndex.deserialise(index_bytes, b'{"ids": ["a", "b"], "factory": "Flat"}')


def test_ivf_factory_trains_and_keeps_nprobe():
    import faiss

    x = unit(400, 16)
    ids = [f"r{i}" for i in range(400)]
    ivf = build_index(x, ids, factory="IVF4,Flat", nprobe=16)
    flat = build_index(x, ids)
    assert ivf.factory == "IVF4,Flat"
    inner = faiss.extract_index_ivf(ivf.index)
    assert inner.nlist == 4 and inner.nprobe == 16
    assert isinstance(flat.index, faiss.IndexFlat)
    q = unit(6, 16, seed=9)
    # nprobe >= nlist: IVF is exhaustive and agrees with Flat
    s_ivf, i_ivf = ivf.search(q, 5)
    s_flat, i_flat = flat.search(q, 5)
    assert i_ivf == i_flat
    np.testing.assert_allclose(s_ivf, s_flat, atol=1e-5)
    back = ReferenceIndex.deserialise(*ivf.serialise())
    assert back.factory == "IVF4,Flat"
    assert faiss.extract_index_ivf(back.index).nprobe == 16
    assert back.search(q, 5)[1] == i_ivf


def test_ivf_short_result_lists_drop_missing_ids():
    # nprobe=1 scans one inverted list; asking for more than it holds leaves FAISS -1s,
    # which must be dropped from the ids and scored -inf.
    import faiss

    x = unit(80, 8)
    ids = [f"r{i}" for i in range(80)]
    idx = build_index(x, ids, factory="IVF2,Flat", nprobe=1)
    ivf = faiss.extract_index_ivf(idx.index)
    q = unit(1, 8, seed=5)
    _, probed = ivf.quantizer.search(q, 1)
    members = faiss.rev_swig_ptr(ivf.invlists.get_ids(int(probed[0, 0])),
                                 ivf.invlists.list_size(int(probed[0, 0]))).copy()
    assert 0 < len(members) < 80
    scores, got = idx.search(q, 80)
    assert scores.shape == (1, 80)
    assert sorted(got[0]) == sorted(ids[j] for j in members)
    assert np.isfinite(scores[0, :len(members)]).all()
    assert np.isneginf(scores[0, len(members):]).all()


def test_duplicate_ids_refused():
    with pytest.raises(ModerationError, match="unique"):
        build_index(unit(3, 4), ["a", "b", "a"])


def test_length_mismatch_and_empty():
    with pytest.raises(ModerationError, match="2 ids for 3 vectors"):
        build_index(unit(3, 4), ["a", "b"])
    with pytest.raises(ModerationError, match="no reference vectors"):
        build_index(np.zeros((0, 4), np.float32), [])


def test_bad_factory_is_a_clear_error():
    with pytest.raises(ModerationError, match="invalid FAISS factory string 'NotAnIndex,Foo'"):
        build_index(unit(10, 8), [str(i) for i in range(10)], factory="NotAnIndex,Foo")


def test_ivf_with_too_few_vectors_to_train():
    with pytest.raises(ModerationError, match="cannot train 'IVF256,Flat' on 10 vectors"):
        build_index(unit(10, 8), [str(i) for i in range(10)], factory="IVF256,Flat")


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_remove_then_add_answers_like_a_fresh_build(factory):
    """Removing and adding in place keeps positions and ids aligned: searches equal a build of the same set."""
    x = unit(400, 16)
    ids = [f"r{i}" for i in range(400)]
    index = build_index(x, ids, factory=factory, nprobe=4)  # nprobe = nlist: exhaustive, comparable to exact
    gone = {f"r{i}" for i in range(0, 400, 7)} | {"r399", "r0", "not-there"}
    assert index.remove(gone) == len(gone) - 1
    extra = unit(30, 16, seed=5)
    index.add(extra, [f"n{i}" for i in range(30)])
    index = ReferenceIndex.deserialise(*index.serialise())  # what the next version loads
    keep = [i for i, rid in enumerate(ids) if rid not in gone]
    expect_x = np.concatenate([x[keep], extra])
    expect_ids = [ids[i] for i in keep] + [f"n{i}" for i in range(30)]
    assert index.ids == expect_ids and len(index) == len(expect_ids)
    q = np.concatenate([unit(10, 16, seed=3), x[:5], extra[:3]])
    scores, got = index.search(q, 5)
    want_s, want_i = brute_force(expect_x, q, 5)
    assert got == [[expect_ids[j] for j in row] for row in want_i]
    np.testing.assert_allclose(scores, want_s, atol=1e-5)


def test_remove_keeps_the_skip_list_on_the_same_references():
    x = unit(50, 8)
    index = build_index(x, [f"r{i}" for i in range(50)]).without({"r10", "r20"})
    index.remove({"r5"})
    assert {index.ids[i] for i in index.skip} == {"r10", "r20"}
    assert "r10" not in index.search(x[10:11], 3)[1][0]


def test_remove_from_an_index_that_cannot_is_a_clear_error():
    index = build_index(unit(50, 8), [f"r{i}" for i in range(50)], factory="HNSW8")
    with pytest.raises(ModerationError, match="rebuild it in full"):
        index.remove({"r1"})


def test_retraining_follows_the_growth_factor():
    from moderation.incremental_index import can_update
    from moderation.registry import IndexVersion

    prev = IndexVersion(version="v", model_version="m", stats_version="s", count=100, dim=8, factory="IVF4,Flat",
                        info={"trained_count": 100})
    assert can_update(prev, "s", "IVF4,Flat", 200, 2.0) == (True, "")
    ok, why = can_update(prev, "s", "IVF4,Flat", 201, 2.0)
    assert not ok and "retraining" in why
    assert not can_update(prev, "s2", "IVF4,Flat", 100, 2.0)[0]  # new statistics: every vector changes
    assert not can_update(prev, "s", "Flat", 100, 2.0)[0]
    flat = IndexVersion(version="v", model_version="m", stats_version="s", count=100, dim=8, factory="Flat",
                        info={"trained_count": None})
    assert can_update(flat, "s", "Flat", 10_000, 2.0)[0]  # nothing trained: no retraining ever


def test_content_hash_is_order_free_and_sees_every_field():
    from moderation.incremental_index import content_hash

    rows = [("a", "k/a.jpg", "1" * 64, "default"), ("b", "k/b.jpg", "2" * 64, "default")]
    base = content_hash("s", "Flat", rows, [])
    assert content_hash("s", "Flat", reversed(rows), []) == base
    assert content_hash("s2", "Flat", rows, []) != base
    assert content_hash("s", "IVF4,Flat", rows, []) != base
    assert content_hash("s", "Flat", rows, ["a"]) != base
    assert content_hash("s", "Flat", [rows[0], ("b", "k/b.jpg", "3" * 64, "default")], []) != base
    assert content_hash("s", "Flat", [rows[0], ("b", "k/b.jpg", "2" * 64, "partner")], []) != base
