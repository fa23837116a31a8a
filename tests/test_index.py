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
