"""One final score per candidate pair: the global score fused with the verification evidence.

The combiner is a logistic regression over a few features of a pair
(:data:`FEATURES`), with every weight constrained to be non-negative, so
the final score never decreases when the global score, the inlier count
or the covered area grows: a pair with more evidence is never ranked
below the same pair with less. It is fitted at calibration time on
labelled queries (a pair is positive when its reference is the query's
ground-truth reference), stored with the calibration, and applied by the
match job; the flagging thresholds are then chosen on the fused score.

Without a fitted combiner (no calibration yet) matching falls back to
:data:`DEFAULT_RULE`, the additive rule ``score + 0.01 * min(inliers, 50)``
that keeps the global score's scale.

Fitting is deterministic: projected Nesterov gradient descent from zero,
fixed iteration count, on standardised features; the same data gives the
same combiner to the last bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from moderation.errors import ModerationError

# The default rule adds at most this much to the global score (0.01 per inlier, 50 inliers at most).
RULE_MAX_BONUS = 0.5

FEATURES = ("global_score", "log_inliers", "reference_coverage", "query_coverage", "inlier_ratio")


def pair_features(global_score: float, verification) -> list[float]:
    """The combiner's inputs for one pair (``verification`` None: nothing verified)."""
    if verification is None or verification.inliers <= 0:
        return [float(global_score), 0.0, 0.0, 0.0, 0.0]
    return [float(global_score), math.log1p(verification.inliers),
            math.sqrt(verification.reference_coverage), math.sqrt(verification.query_coverage),
            float(verification.inlier_ratio)]


@dataclass(frozen=True)
class Combiner:
    """A monotone logistic combiner (kind ``logistic``) or the additive rule (kind ``rule``)."""

    kind: str = "rule"
    features: tuple[str, ...] = FEATURES
    mean: tuple[float, ...] = ()
    scale: tuple[float, ...] = ()
    weights: tuple[float, ...] = ()
    bias: float = 0.0
    info: dict = field(default_factory=dict)

    def score(self, x: np.ndarray) -> np.ndarray:
        """Final scores for a (n, len(FEATURES)) feature matrix."""
        x = np.asarray(x, np.float64).reshape(-1, len(FEATURES))
        if self.kind == "rule":
            inliers = np.expm1(x[:, 1])
            return x[:, 0] + RULE_MAX_BONUS * np.minimum(inliers, 50.0) / 50.0
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        return _sigmoid(z @ np.asarray(self.weights) + self.bias)

    def score_pair(self, global_score: float, verification) -> float:
        return float(self.score(np.array([pair_features(global_score, verification)]))[0])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> Combiner:
        """Raises ModerationError on an unknown kind or a feature list this code does not compute."""
        if d.get("kind") not in ("rule", "logistic"):
            raise ModerationError(f"unknown combiner kind {d.get('kind')!r}")
        if tuple(d.get("features", FEATURES)) != FEATURES:
            raise ModerationError(f"combiner features {d.get('features')} differ from this version's "
                                  f"{FEATURES}; recalibrate")
        return cls(kind=d["kind"], features=FEATURES, mean=tuple(d.get("mean", ())),
                   scale=tuple(d.get("scale", ())), weights=tuple(d.get("weights", ())),
                   bias=float(d.get("bias", 0.0)), info=dict(d.get("info", {})))


DEFAULT_RULE = Combiner()


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def fit_combiner(x: np.ndarray, y: Sequence[bool], *, l2: float = 1e-3, iters: int = 3000) -> Combiner:
    """Fit a monotone logistic combiner on pair features ``x`` (n, len(FEATURES)) and labels ``y``.

    Raises ModerationError when the labels are all one class (nothing to fit).
    """
    x = np.asarray(x, np.float64).reshape(-1, len(FEATURES))
    y = np.asarray(y, np.float64)
    if len(x) != len(y):
        raise ModerationError("features and labels differ in length")
    if y.min(initial=1.0) == y.max(initial=0.0):
        raise ModerationError("cannot fit the score combiner: the labelled pairs are all "
                              f"{'positive' if len(y) and y[0] else 'negative'}; calibrate on a set "
                              "with copies and non-copies")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    z = (x - mean) / scale
    n, d = z.shape
    w, b = np.zeros(d), 0.0
    vw, vb = w.copy(), b
    # Step 1/L for the logistic loss: L <= (max row norm^2 + 1)/4 + l2.
    step = 1.0 / (0.25 * (float((z * z).sum(axis=1).max()) + 1.0) + l2)
    t_prev = 1.0
    for _ in range(iters):
        p = _sigmoid(z @ vw + vb)
        gw = z.T @ (p - y) / n + l2 * vw
        gb = float((p - y).mean())
        w_next = np.maximum(vw - step * gw, 0.0)  # the monotonicity constraint
        b_next = vb - step * gb
        t = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t_prev * t_prev))
        vw = w_next + ((t_prev - 1.0) / t) * (w_next - w)
        vb = b_next + ((t_prev - 1.0) / t) * (b_next - b)
        w, b, t_prev = w_next, b_next, t
    p = _sigmoid(z @ w + b)
    eps = 1e-12
    loss = float(-(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)).mean())
    return Combiner(kind="logistic", mean=tuple(mean.tolist()), scale=tuple(scale.tolist()),
                    weights=tuple(w.tolist()), bias=float(b),
                    info={"n_pairs": int(n), "n_positive": int(y.sum()), "log_loss": round(loss, 5),
                          "l2": l2, "iters": iters})
