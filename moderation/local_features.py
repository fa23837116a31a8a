"""Local features (keypoints + descriptors) for geometric verification, and their cache.

A :class:`FeatureConfig` fixes everything that changes the features (the
detector, how many keypoints, the side the image is brought to), and its
:meth:`FeatureConfig.key` names the cache folder, so features of two
configurations never mix. Features are extracted on a greyscale copy whose
long side is at most ``max_side`` (never enlarged); keypoint coordinates are
in that copy's pixels, with its size kept beside them, so coverage and
geometry are independent of the upload's resolution.

SIFT descriptors are stored as uint8 (their values are small integers) and
turned into RootSIFT (Arandjelović & Zisserman, 2012: L1-normalise, square
root) when matched; ORB and AKAZE descriptors are binary and stay as they are.

This module imports OpenCV and numpy only (no torch), so verification worker
processes start quickly.

Failure policy: an image too small or too flat for any keypoint gives empty
features (``len(features) == 0``), never an exception; such a pair simply
does not verify.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from enum import Enum

import numpy as np

from moderation.store import ObjectStore


class Detector(str, Enum):
    """Keypoint detector. SIFT is the default: most repeatable under the edits copies undergo."""

    SIFT = "sift"
    ORB = "orb"  # about 5x cheaper, binary descriptors, less robust to blur and scale
    AKAZE = "akaze"  # binary, between the two


@dataclass(frozen=True)
class FeatureConfig:
    detector: Detector = Detector.SIFT
    max_features: int = 1000
    max_side: int = 512

    def key(self) -> str:
        """A short stable name for cache keys and run records, e.g. ``sift-1000-512``."""
        return f"{self.detector.value}-{self.max_features}-{self.max_side}"

    @property
    def binary(self) -> bool:
        return self.detector != Detector.SIFT

    def as_dict(self) -> dict:
        return {**asdict(self), "detector": self.detector.value}


@dataclass(frozen=True)
class LocalFeatures:
    """Keypoints (n, 2) float32 in the detection image's pixels, descriptors (n, d), its size."""

    points: np.ndarray
    descriptors: np.ndarray
    width: int
    height: int

    def __len__(self) -> int:
        return int(self.points.shape[0])

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez_compressed(buf, points=self.points.astype(np.float32), descriptors=self.descriptors,
                            size=np.array([self.width, self.height], np.int32))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> LocalFeatures:
        """Raises ValueError on bytes that are not a features file (never unpickles)."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                w, h = (int(v) for v in z["size"])
                return cls(z["points"].astype(np.float32), z["descriptors"], w, h)
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"not a local-features file: {exc}") from None

    @classmethod
    def empty(cls, width: int = 1, height: int = 1, dim: int = 128, binary: bool = False) -> LocalFeatures:
        return cls(np.zeros((0, 2), np.float32), np.zeros((0, dim), np.uint8), width, height)


def _detector(config: FeatureConfig):
    import cv2

    if config.detector == Detector.SIFT:
        return cv2.SIFT_create(nfeatures=config.max_features)
    if config.detector == Detector.ORB:
        return cv2.ORB_create(nfeatures=config.max_features)
    return cv2.AKAZE_create()


def grey_for_detection(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """uint8 greyscale of an RGB array, shrunk (area filter) so its long side is at most ``max_side``."""
    import cv2

    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    h, w = grey.shape
    scale = max_side / max(h, w)
    if scale < 1.0:
        grey = cv2.resize(grey, (max(1, round(w * scale)), max(1, round(h * scale))),
                          interpolation=cv2.INTER_AREA)
    return grey


def extract(image, config: FeatureConfig = FeatureConfig(), *, mirror: bool = False) -> LocalFeatures:
    """Local features of an RGB image (PIL image or HxWx3 uint8 array).

    ``mirror`` extracts them from the horizontally flipped image (SIFT is
    not mirror-invariant, so a flipped copy needs its own features).
    Returns empty features for an image with no keypoint; never raises on
    image content.
    """
    rgb = np.asarray(image, dtype=np.uint8)
    if rgb.ndim == 2:
        rgb = np.stack([rgb] * 3, axis=-1)
    grey = grey_for_detection(rgb, config.max_side)
    if mirror:
        grey = np.ascontiguousarray(grey[:, ::-1])
    h, w = grey.shape
    dim = 32 if config.detector == Detector.ORB else (61 if config.detector == Detector.AKAZE else 128)
    if min(h, w) < 16:
        return LocalFeatures.empty(w, h, dim)
    keypoints, desc = _detector(config).detectAndCompute(grey, None)
    if desc is None or not keypoints:
        return LocalFeatures.empty(w, h, dim)
    if config.detector == Detector.AKAZE and len(keypoints) > config.max_features:
        order = np.argsort([-k.response for k in keypoints], kind="stable")[:config.max_features]
        keypoints = [keypoints[i] for i in order]
        desc = desc[order]
    points = np.array([k.pt for k in keypoints], np.float32).reshape(-1, 2)
    if config.detector == Detector.SIFT:
        desc = np.clip(np.rint(desc), 0, 255).astype(np.uint8)
    return LocalFeatures(points, np.ascontiguousarray(desc), w, h)


def root_sift(desc: np.ndarray) -> np.ndarray:
    """RootSIFT of uint8 SIFT descriptors: L1-normalise, then square root (float32)."""
    d = desc.astype(np.float32)
    d /= np.maximum(d.sum(axis=1, keepdims=True), 1e-7)
    return np.sqrt(d)


class FeatureCache:
    """Local features by image sha256 for one :class:`FeatureConfig`, one object per image.

    Keys: ``features/CONFIG/SHA[:2]/SHA.npz``. One object per image (not
    parts, as vectors are) because verification needs a few references per
    query at random. Writes are idempotent by content. A corrupt object is
    treated as missing (logged by the caller) and recomputed.
    """

    def __init__(self, store: ObjectStore, config: FeatureConfig):
        self.store = store
        self.config = config
        self.prefix = f"features/{config.key()}/"

    def key(self, sha: str) -> str:
        return f"{self.prefix}{sha[:2]}/{sha}.npz"

    def known(self) -> set[str]:
        """The shas with stored features (one listing of the prefix)."""
        return {k.rsplit("/", 1)[-1][:-4] for k in self.store.list(self.prefix) if k.endswith(".npz")}

    def missing(self, shas: list[str], list_above: int = 5000) -> list[str]:
        """The given shas without stored features, in order.

        A few are checked one by one (a shard of the nightly DAG must not list
        a million keys); many are checked against one listing of the prefix.
        """
        if len(shas) > list_above:
            known = self.known()
            return [s for s in shas if s not in known]
        return [s for s in shas if not self.store.exists(self.key(s))]

    def get(self, sha: str) -> LocalFeatures | None:
        """The stored features, or None if absent or unreadable."""
        from moderation.errors import NotFoundError

        try:
            return LocalFeatures.from_bytes(self.store.get(self.key(sha)))
        except (NotFoundError, ValueError):
            return None

    def put(self, sha: str, features: LocalFeatures) -> None:
        self.store.put(self.key(sha), features.to_bytes())

