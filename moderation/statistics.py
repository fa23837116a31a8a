"""Background statistics: centering / PCA-whitening, and the score-normalisation set.

Both are fitted on *background* images (a sample of the reference
distribution that never matches a query), never on the references: fitting
on the references would leak them into their own normalisation.

Whitening uses FAISS ``PCAMatrix`` with eigen power -0.5, followed by L2
normalisation. A background set smaller than the descriptor dimension has a
rank-deficient covariance, so the output dimension is capped at
``n_background - 1`` and a small eigenvalue floor (epsilon, relative to the
mean eigenvalue) keeps near-null directions from being blown up into noise.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from moderation.config import Postprocess
from moderation.errors import ModerationError
from moderation.faiss_import import load_faiss

EPS_RELATIVE = 0.1  # eigenvalue floor as a fraction of the mean eigenvalue


def l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


@dataclass
class Postprocessor:
    """``apply(x) = L2( A @ (x - mean) )``; A is identity for centering, None for NONE."""

    kind: Postprocess
    mean: np.ndarray  # (d_in,)
    matrix: np.ndarray | None  # (d_out, d_in)

    @property
    def in_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def out_dim(self) -> int:
        return self.in_dim if self.matrix is None else int(self.matrix.shape[0])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Post-process descriptors (n, d_in) -> unit-norm (n, d_out) float32."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ModerationError(
                f"descriptors of dimension {x.shape[-1]} do not fit statistics fitted on {self.in_dim}; "
                "were they made by another model version?")
        if self.kind == Postprocess.NONE:
            return l2n(x)
        y = x - self.mean
        if self.matrix is not None:
            y = y @ self.matrix.T
        return l2n(y)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, kind=np.array(self.kind.value), mean=self.mean,
                 matrix=self.matrix if self.matrix is not None else np.zeros((0, 0), np.float32))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Postprocessor:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            matrix = z["matrix"]
            return cls(Postprocess(str(z["kind"])), z["mean"].astype(np.float32),
                       matrix.astype(np.float32) if matrix.size else None)


def fit_postprocessor(background: np.ndarray, kind: Postprocess, out_dim: int = 0) -> Postprocessor:
    """Fit centering or whitening on background descriptors (n, d).

    ``out_dim`` 0 keeps as many dimensions as the data supports
    (``min(d, n - 1)``). Raises ModerationError on too few images.
    """
    x = np.ascontiguousarray(background, dtype=np.float32)
    n, d = x.shape
    if n < 2:
        raise ModerationError(f"need at least 2 background images to fit statistics, got {n}")
    mean = x.mean(axis=0)
    if kind == Postprocess.NONE:
        return Postprocessor(kind, np.zeros(d, np.float32), None)
    if kind == Postprocess.CENTER:
        return Postprocessor(kind, mean, None)
    faiss = load_faiss()
    limit = min(d, n - 1)
    d_out = min(out_dim, limit) if out_dim else limit
    pca = faiss.PCAMatrix(d, d_out, -0.5)
    # FAISS adds epsilon to every eigenvalue before the power; scale it to the data.
    # Its eigenvalues are those of the unnormalised scatter matrix sum((x - mean)(x - mean)^T),
    # n times the covariance's, so the floor is a fraction of their mean, not of the variance.
    centred = x - mean
    scatter_trace = float((centred.astype(np.float64) ** 2).sum())
    pca.epsilon = EPS_RELATIVE * scatter_trace / limit
    pca.train(x)
    a = faiss.vector_to_array(pca.A).reshape(d_out, d).astype(np.float32)
    return Postprocessor(kind, faiss.vector_to_array(pca.mean).astype(np.float32), a)


@dataclass
class BackgroundIndex:
    """Post-processed background descriptors, for score normalisation."""

    vectors: np.ndarray  # (n, d) unit-norm, already post-processed

    def __post_init__(self):
        faiss = load_faiss()
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        self._index = faiss.IndexFlatIP(self.vectors.shape[1])
        self._index.add(self.vectors)

    def neighbour_scores(self, queries: np.ndarray, n: int) -> np.ndarray:
        """Similarities (nq, n) of each query to its ``n`` nearest background images."""
        n = min(n, self.vectors.shape[0])
        scores, _ = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), n)
        return scores

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.save(buf, self.vectors, allow_pickle=False)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> BackgroundIndex:
        return cls(np.load(io.BytesIO(data), allow_pickle=False))


def fit_statistics(background: np.ndarray, kind: Postprocess, out_dim: int = 0
                   ) -> tuple[Postprocessor, BackgroundIndex]:
    """The post-processing fitted on raw background descriptors (n, d) and the SN set it produces.

    The one fitting step of the statistics job and of the evaluation
    protocol: both are given *background* descriptors only (never
    references). Raises ModerationError on too few images.
    """
    post = fit_postprocessor(background, kind, out_dim)
    return post, BackgroundIndex(post.apply(background))


def normalise_scores(scores: np.ndarray, bg_scores: np.ndarray, beta: float = 1.0,
                     n_start: int = 1, n_end: int = 3) -> np.ndarray:
    """SSCD score normalisation: ``s - beta * mean(bg_scores[:, n_start-1:n_end])`` per query row.

    ``scores`` is (nq, k); ``bg_scores`` (nq, >= n_end) sorted descending.
    """
    if not 1 <= n_start <= n_end:
        raise ModerationError(f"score normalisation needs 1 <= first neighbour <= last neighbour, "
                              f"got {n_start}..{n_end}; check MODERATION_SN_NEIGHBORS")
    if bg_scores.shape[1] < n_end:
        raise ModerationError(f"score normalisation needs {n_end} background neighbours, "
                              f"have {bg_scores.shape[1]}; add background images")
    bias = bg_scores[:, n_start - 1:n_end].mean(axis=1, keepdims=True)
    return scores - beta * bias
