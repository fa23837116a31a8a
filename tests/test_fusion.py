"""The score combiner: monotone, deterministic, and refusing what it cannot fit."""

from __future__ import annotations

import numpy as np
import pytest

from moderation.errors import ModerationError
from moderation.fusion import DEFAULT_RULE, FEATURES, Combiner, fit_combiner, pair_features
from moderation.verification import Verification


def labelled_pairs(seed=0, n=600):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    score = np.where(y, rng.normal(0.25, 0.12, n), rng.normal(0.0, 0.1, n))
    inliers = np.where(y & (rng.random(n) < 0.8), rng.integers(10, 120, n), rng.integers(0, 9, n))
    cov = np.where(inliers >= 10, rng.uniform(0.2, 1.0, n), 0.0)
    x = np.stack([score, np.log1p(inliers), np.sqrt(cov), np.sqrt(cov * 0.5),
                  np.where(inliers > 0, rng.uniform(0.1, 0.9, n), 0.0)], axis=1)
    # A feature that hurts on this sample (anti-correlated by construction) must still get weight >= 0.
    x[:, 4] = np.where(y, x[:, 4] * 0.2, x[:, 4])
    return x, y


def test_weights_are_non_negative_so_the_score_is_monotone():
    x, y = labelled_pairs()
    c = fit_combiner(x, y)
    assert c.kind == "logistic" and len(c.weights) == len(FEATURES)
    assert all(w >= 0 for w in c.weights)
    assert c.weights[0] > 0 and c.weights[1] > 0
    base = x[:50].copy()
    for j in range(len(FEATURES)):
        more = base.copy()
        more[:, j] += 0.5
        assert np.all(c.score(more) >= c.score(base) - 1e-12), FEATURES[j]


def test_the_fit_separates_copies():
    x, y = labelled_pairs(1)
    s = fit_combiner(x, y).score(x)
    assert s[y].mean() > 0.6 and s[~y].mean() < 0.2


def test_refit_is_deterministic():
    x, y = labelled_pairs(2)
    a, b = fit_combiner(x, y), fit_combiner(x.copy(), list(y))
    assert a.to_dict() == b.to_dict()
    assert Combiner.from_dict(a.to_dict()).score(x).tolist() == a.score(x).tolist()


def test_fitting_needs_both_classes_and_matching_lengths():
    x, _ = labelled_pairs(3, 20)
    with pytest.raises(ModerationError, match="all"):
        fit_combiner(x, [False] * 20)
    with pytest.raises(ModerationError):
        fit_combiner(x, [True, False])


def test_the_default_rule_adds_capped_inliers():
    v = Verification(inliers=80, verified=True)
    assert DEFAULT_RULE.score_pair(0.1, v) == pytest.approx(0.1 + 0.5)
    assert DEFAULT_RULE.score_pair(0.1, Verification(inliers=20)) == pytest.approx(0.3)
    assert DEFAULT_RULE.score_pair(0.1, None) == pytest.approx(0.1)


def test_unverified_pairs_have_zero_evidence():
    assert pair_features(0.3, None) == [0.3, 0.0, 0.0, 0.0, 0.0]
    v = Verification(inliers=15, inlier_ratio=0.5, reference_coverage=0.64, query_coverage=0.25)
    assert pair_features(0.3, v) == pytest.approx([0.3, np.log1p(15), 0.8, 0.5, 0.5])


def test_stored_combiners_are_checked():
    with pytest.raises(ModerationError, match="kind"):
        Combiner.from_dict({"kind": "mlp"})
    with pytest.raises(ModerationError, match="recalibrate"):
        Combiner.from_dict({"kind": "logistic", "features": ["global_score"]})
