"""Background statistics: centering, PCA-whitening (FAISS) and score normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from moderation.config import Postprocess
from moderation.errors import ModerationError
from moderation.statistics import (EPS_RELATIVE, BackgroundIndex, Postprocessor, fit_postprocessor, l2n,
                                   normalise_scores)


def correlated(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Strongly correlated, anisotropic data with an offset mean."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, d)) * np.linspace(3.0, 0.3, d)
    mix = rng.normal(size=(d, d))
    return (z @ mix + 5.0).astype(np.float32)


def _corr_offdiag(y: np.ndarray) -> float:
    c = np.corrcoef(y.astype(np.float64).T)
    return float(np.abs(c - np.diag(np.diag(c))).max())


# -- whitening --------------------------------------------------------------------------------


def test_whitening_output_is_unit_norm_and_full_dimension():
    x = correlated(300, 16)
    pp = fit_postprocessor(x, Postprocess.WHITEN)
    assert pp.kind == Postprocess.WHITEN
    assert (pp.in_dim, pp.out_dim) == (16, 16)
    np.testing.assert_allclose(pp.mean, x.mean(axis=0), rtol=1e-5, atol=1e-4)
    y = pp.apply(x)
    assert y.dtype == np.float32 and y.shape == (300, 16)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    # other vectors too
    z = pp.apply(correlated(5, 16, seed=3))
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)


def test_whitening_decorrelates_training_data():
    x = correlated(400, 12)
    assert _corr_offdiag(x) > 0.5  # the input really is correlated
    pp = fit_postprocessor(x, Postprocess.WHITEN)
    proj = (x.astype(np.float64) - pp.mean) @ pp.matrix.T.astype(np.float64)  # before L2
    cov = proj.T @ proj / len(x)
    off = cov - np.diag(np.diag(cov))
    assert np.abs(off).max() < 1e-3 * np.diag(cov).max()
    # the L2-normalised output stays nearly decorrelated
    assert _corr_offdiag(pp.apply(x)) < 0.2


def test_whitening_eigenvalue_floor_is_relative_to_mean_eigenvalue():
    """Output variance along eigenvector i is proportional to λ_i / (λ_i + ε), ε = 0.1 · mean λ."""
    x = correlated(400, 12)
    pp = fit_postprocessor(x, Postprocess.WHITEN)
    proj = (x.astype(np.float64) - pp.mean) @ pp.matrix.T.astype(np.float64)
    got = np.diag(proj.T @ proj)
    lam = np.sort(np.linalg.eigvalsh(np.cov(x.astype(np.float64).T, bias=True)))[::-1]
    eps = EPS_RELATIVE * lam.mean()
    expected = lam / (lam + eps)
    # scale-free comparison (FAISS's eigenvalues are of the unnormalised scatter matrix)
    np.testing.assert_allclose(got / got[0], expected / expected[0], rtol=2e-3)
    # the smallest direction is damped, not blown up to the same variance as the largest
    assert got[-1] / got[0] < 0.9


def test_whitening_caps_dimension_when_background_is_small():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, 32)).astype(np.float32)  # n < d: rank <= n - 1
    pp = fit_postprocessor(x, Postprocess.WHITEN)
    assert (pp.in_dim, pp.out_dim) == (32, 9)
    assert pp.matrix.shape == (9, 32)
    y = pp.apply(rng.normal(size=(4, 32)).astype(np.float32))
    assert y.shape == (4, 9) and np.isfinite(y).all()
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    assert fit_postprocessor(x, Postprocess.WHITEN, out_dim=4).out_dim == 4
    assert fit_postprocessor(x, Postprocess.WHITEN, out_dim=50).out_dim == 9
    big = correlated(200, 16)
    assert fit_postprocessor(big, Postprocess.WHITEN, out_dim=8).out_dim == 8


def test_too_few_background_images():
    with pytest.raises(ModerationError, match="at least 2 background"):
        fit_postprocessor(np.ones((1, 8), np.float32), Postprocess.WHITEN)


# -- centering and none -----------------------------------------------------------------------


def test_center_mode_by_hand():
    x = np.array([[1.0, 0.0], [3.0, 2.0]], np.float32)  # mean (2, 1)
    pp = fit_postprocessor(x, Postprocess.CENTER)
    assert pp.matrix is None and pp.out_dim == 2
    np.testing.assert_allclose(pp.mean, [2.0, 1.0])
    s = 1 / np.sqrt(2)
    np.testing.assert_allclose(pp.apply(x), [[-s, -s], [s, s]], atol=1e-6)
    np.testing.assert_allclose(pp.apply(np.array([[2.0, 4.0]])), [[0.0, 1.0]], atol=1e-6)


def test_none_mode_only_normalises():
    x = np.array([[3.0, 4.0], [0.0, 2.0]], np.float32)
    pp = fit_postprocessor(x, Postprocess.NONE)
    np.testing.assert_allclose(pp.mean, [0.0, 0.0])
    np.testing.assert_allclose(pp.apply(x), [[0.6, 0.8], [0.0, 1.0]], atol=1e-6)


def test_dimension_mismatch_is_explained():
    pp = fit_postprocessor(correlated(50, 8), Postprocess.CENTER)
    with pytest.raises(ModerationError, match="another model version"):
        pp.apply(np.ones((2, 16), np.float32))


@pytest.mark.parametrize("kind", list(Postprocess))
def test_postprocessor_serialisation_round_trip(kind):
    x = correlated(60, 8)
    pp = fit_postprocessor(x, kind)
    back = Postprocessor.from_bytes(pp.to_bytes())
    assert back.kind == kind and back.out_dim == pp.out_dim
    np.testing.assert_array_equal(back.apply(x), pp.apply(x))


def test_l2n_keeps_zero_vectors_finite():
    y = l2n(np.array([[0.0, 0.0], [0.0, 5.0]]))
    np.testing.assert_array_equal(y, [[0.0, 0.0], [0.0, 1.0]])


# -- score normalisation ----------------------------------------------------------------------


SCORES = np.array([[0.9, 0.5, 0.2], [0.7, 0.6, 0.1]], np.float32)
BG = np.array([[0.9, 0.6, 0.3, 0.1], [0.5, 0.4, 0.3, 0.0]], np.float32)  # sorted descending


def test_sn_default_neighbours_1_to_3():
    # row 0: mean(.9, .6, .3) = .6; row 1: mean(.5, .4, .3) = .4
    out = normalise_scores(SCORES, BG)
    np.testing.assert_allclose(out, [[0.3, -0.1, -0.4], [0.3, 0.2, -0.3]], atol=1e-6)


def test_sn_with_beta_and_neighbour_ranges():
    out = normalise_scores(SCORES, BG, beta=0.5)  # subtract .3 and .2
    np.testing.assert_allclose(out, [[0.6, 0.2, -0.1], [0.5, 0.4, -0.1]], atol=1e-6)
    out = normalise_scores(SCORES, BG, beta=2.0, n_start=2, n_end=3)  # means .45 and .35
    np.testing.assert_allclose(out, [[0.0, -0.4, -0.7], [0.0, -0.1, -0.6]], atol=1e-6)
    out = normalise_scores(SCORES, BG, beta=1.0, n_start=1, n_end=1)  # nearest only
    np.testing.assert_allclose(out, [[0.0, -0.4, -0.7], [0.2, 0.1, -0.4]], atol=1e-6)


def test_sn_keeps_per_query_order():
    out = normalise_scores(SCORES, BG, beta=1.3)
    for row_in, row_out in zip(SCORES, out):
        assert list(np.argsort(-row_in)) == list(np.argsort(-row_out))


def test_sn_needs_enough_background_neighbours():
    with pytest.raises(ModerationError, match="needs 3 background neighbours"):
        normalise_scores(SCORES, BG[:, :2])


def test_sn_rejects_an_empty_neighbour_range():
    # 0 neighbours would average an empty slice: NaN scores that flag nothing
    with pytest.raises(ModerationError):
        normalise_scores(SCORES, BG, n_start=1, n_end=0)


def test_background_index_neighbour_scores_by_hand():
    s = 1 / np.sqrt(2)
    bg = BackgroundIndex(np.array([[1, 0], [0, 1], [s, s]], np.float32))
    q = np.array([[1, 0], [0, 1]], np.float32)
    got = bg.neighbour_scores(q, 2)
    np.testing.assert_allclose(got, [[1.0, s], [1.0, s]], atol=1e-6)
    assert bg.neighbour_scores(q, 10).shape == (2, 3)  # capped at the set size
    back = BackgroundIndex.from_bytes(bg.to_bytes())
    np.testing.assert_array_equal(back.vectors, bg.vectors)
    np.testing.assert_allclose(back.neighbour_scores(q, 3), [[1.0, s, 0.0], [1.0, s, 0.0]], atol=1e-6)
