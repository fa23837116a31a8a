"""Query views: the regions of a query that are searched on their own.

A global descriptor of the whole query misses a copy that fills only part
of it (pasted into another photo, framed, heavily cropped around, covered
by stripes). Searching crops of the query as well (CopyNCE's local-crop
ensembling; the ISC 2021 matching-track systems) gives the copy a view in
which it dominates. Candidates of all views are merged per reference by
their best normalised score (:mod:`moderation.view_search`).

Kinds of view (:class:`ViewKind`), named in a comma-separated spec such as
``full,mirror,grid2,grid3,center,trim,proposals``:

- ``full``: the whole image (always searched, whatever the spec says);
- ``mirror``: the whole image flipped left-right;
- ``gridN``: an N x N grid of overlapping crops, each 2/(N+1) of a side,
  at a stride of 1/(N+1) (half-overlapping neighbours);
- ``center``: the central 70 % of each side;
- ``trim``: the image without uniform borders (padding, frames), when it has any;
- ``proposals``: up to three rectangles that look like an image pasted or
  framed inside the query (long straight edges around a region), found with
  OpenCV on a small greyscale copy.

Boxes are fractions of the image, so a view plan does not depend on the
decode resolution. Nothing here raises on image content: a flat or tiny
image gets the fixed views only.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
from PIL import Image, ImageOps

from moderation.errors import ConfigError

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of width and height


class ViewKind(str, Enum):
    FULL = "full"
    MIRROR = "mirror"
    GRID2 = "grid2"
    GRID3 = "grid3"
    CENTER = "center"
    TRIM = "trim"
    PROPOSALS = "proposals"


@dataclass(frozen=True)
class View:
    name: str
    box: Box
    mirror: bool = False


@dataclass(frozen=True)
class ViewConfig:
    kinds: tuple[ViewKind, ...] = (ViewKind.FULL,)
    max_proposals: int = 3

    @classmethod
    def parse(cls, spec: str) -> ViewConfig:
        """``"full,mirror,grid2"`` -> ViewConfig; raises ConfigError naming unknown kinds."""
        names = [s.strip().lower() for s in spec.split(",") if s.strip()]
        known = {k.value: k for k in ViewKind}
        bad = [n for n in names if n not in known]
        if bad:
            raise ConfigError(f"unknown query view(s) {bad} in MODERATION_VIEWS={spec!r}; "
                              f"use a comma-separated list of: {', '.join(known)}")
        kinds = [ViewKind.FULL] + [known[n] for n in names if n != ViewKind.FULL.value]
        return cls(tuple(dict.fromkeys(kinds)))

    @property
    def spec(self) -> str:
        return ",".join(k.value for k in self.kinds)

    @property
    def only_full(self) -> bool:
        return self.kinds == (ViewKind.FULL,)


def grid_boxes(n: int) -> list[Box]:
    size, stride = 2.0 / (n + 1), 1.0 / (n + 1)
    return [(i * stride, j * stride, i * stride + size, j * stride + size)
            for j in range(n) for i in range(n)]


CENTER_BOX: Box = (0.15, 0.15, 0.85, 0.85)


def trim_box(rgb: np.ndarray, tolerance: float = 14.0, min_area: float = 0.15, max_area: float = 0.95) -> Box | None:
    """The box inside uniform borders (the border colour is each side's median), or None.

    None when there is no border worth trimming (the box would keep more
    than ``max_area`` of the image) or when the rest is too small to be a copy.
    """
    h, w = rgb.shape[:2]
    if h < 8 or w < 8:
        return None
    a = rgb.astype(np.int16)

    def uniform(line: np.ndarray, colour: np.ndarray) -> bool:
        return bool(np.percentile(np.abs(line - colour).max(axis=-1), 95) <= tolerance)

    top_c, bottom_c = np.median(a[0], axis=0), np.median(a[-1], axis=0)
    left_c, right_c = np.median(a[:, 0], axis=0), np.median(a[:, -1], axis=0)
    y0 = 0
    while y0 < h - 1 and uniform(a[y0], top_c):
        y0 += 1
    y1 = h
    while y1 > y0 + 1 and uniform(a[y1 - 1], bottom_c):
        y1 -= 1
    x0 = 0
    while x0 < w - 1 and uniform(a[y0:y1, x0], left_c):
        x0 += 1
    x1 = w
    while x1 > x0 + 1 and uniform(a[y0:y1, x1 - 1], right_c):
        x1 -= 1
    area = (x1 - x0) * (y1 - y0) / float(w * h)
    if not min_area <= area <= max_area:
        return None
    return (x0 / w, y0 / h, x1 / w, y1 / h)


def proposal_boxes(rgb: np.ndarray, limit: int = 3, side: int = 256) -> list[Box]:
    """Rectangles bounded by long straight edges: a picture pasted or framed inside the query.

    Edges (Canny) of a small greyscale copy are closed and their outer
    contours' bounding boxes kept when they cover 8-85 % of the image and
    the contour fills most of its box; larger, more rectangular ones first.
    """
    import cv2

    h, w = rgb.shape[:2]
    if min(h, w) < 16:
        return []
    scale = side / max(h, w)
    small = cv2.resize(np.ascontiguousarray(rgb), (max(8, round(w * scale)), max(8, round(h * scale))),
                       interpolation=cv2.INTER_AREA)
    grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    sh, sw = grey.shape
    edges = cv2.Canny(grey, 60, 160)
    edges = cv2.morphologyEx(edges, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    contours, _ = cv2.findContours(edges, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    scored: list[tuple[float, Box]] = []
    for c in contours:
        x, y, bw, bh = cv2.boundingRect(c)
        frac = bw * bh / float(sw * sh)
        if not 0.08 <= frac <= 0.85 or min(bw, bh) < 12:
            continue
        hull_area = cv2.contourArea(cv2.convexHull(c))
        fill = hull_area / float(bw * bh)
        if fill < 0.7:
            continue
        scored.append((fill * frac, (x / sw, y / sh, (x + bw) / sw, (y + bh) / sh)))
    scored.sort(key=lambda t: -t[0])
    out: list[Box] = []
    for _, box in scored:
        if all(_iou(box, other) < 0.6 for other in out):
            out.append(box)
        if len(out) >= limit:
            break
    return out


def _iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def plan_views(image: Image.Image, config: ViewConfig) -> list[View]:
    """The views of one image under ``config``; the first is always the whole image."""
    views = [View("full", (0.0, 0.0, 1.0, 1.0))]
    rgb = None
    for kind in config.kinds:
        if kind == ViewKind.MIRROR:
            views.append(View("mirror", (0.0, 0.0, 1.0, 1.0), mirror=True))
        elif kind in (ViewKind.GRID2, ViewKind.GRID3):
            n = 2 if kind == ViewKind.GRID2 else 3
            views += [View(f"{kind.value}_{i}", b) for i, b in enumerate(grid_boxes(n))]
        elif kind == ViewKind.CENTER:
            views.append(View("center", CENTER_BOX))
        elif kind in (ViewKind.TRIM, ViewKind.PROPOSALS):
            if rgb is None:
                rgb = np.asarray(_thumbnail(image, 384))
            if kind == ViewKind.TRIM:
                if (box := trim_box(rgb)) is not None:
                    views.append(View("trim", box))
            else:
                views += [View(f"proposal_{i}", b) for i, b in
                          enumerate(proposal_boxes(rgb, config.max_proposals))]
    return views


def _thumbnail(image: Image.Image, side: int) -> Image.Image:
    if max(image.size) <= side:
        return image
    scale = side / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.BILINEAR)


def render(image: Image.Image, view: View) -> Image.Image:
    """The pixels of ``view`` (at least 1 x 1)."""
    w, h = image.size
    x0, y0, x1, y1 = view.box
    box = (int(round(x0 * w)), int(round(y0 * h)), max(int(round(x1 * w)), int(round(x0 * w)) + 1),
           max(int(round(y1 * h)), int(round(y0 * h)) + 1))
    out = image if box == (0, 0, w, h) else image.crop(box)
    return ImageOps.mirror(out) if view.mirror else out
