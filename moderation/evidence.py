"""Visual evidence for flagged pairs: a side-by-side image and a match heatmap.

For each flagged pair the matching run stores, in the object store under
``RUN_FOLDER/evidence/``:

- ``SLUG.jpg``: query (left) and reference (right) at one height;
- ``SLUG.heatmap.jpg``: the query with a heatmap of where it matches the
  reference.

The heatmap follows SSCD (appendix E of the supplementary material): keep
the trunk's activation map on the query at full resolution instead of GeM
pooling, project and L2-normalise each location
(``SSCDModel.local_descriptors``), and take each location's cosine with
the reference's global descriptor. Modules without ``local_descriptors``
(a published SSCD TorchScript file imported as is) get an occlusion map
instead: grey out each cell of a grid on the query and measure how much
the similarity to the reference drops. The map is shown relative (its
minimum blue, its maximum red); it says *where*, the score says *how much*.

Bounds: every stored image has at most ``settings.evidence_max_pixels``
pixels; at most ``settings.evidence_max_pairs`` (default 20,000) pairs of a
run, highest scores first, get evidence; :func:`prune_evidence` removes the
evidence of pairs decided more than ``evidence_retention_days`` ago.

Failure policy: an image that cannot be read or decoded leaves its pair
without evidence (logged) and the run goes on; the object store being
unreachable (``StoreError``) fails the run, as any store write does.
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from moderation.db import FlaggedPair
from moderation.errors import BadImageError, ModerationError, NotFoundError, StoreError
from moderation.images import decode_image, preprocess, sha256_hex
from moderation.store import read_location, validate_key

log = logging.getLogger(__name__)

EVIDENCE_DIR = "evidence"
DEFAULT_MAX_PAIRS = 20_000
OCCLUSION_GRID = 4
IMAGE_CACHE = 64  # decoded images kept while rendering a run's evidence
JPEG_QUALITY = 85
GAP_PX = 4
# Keys prune_evidence may delete: RUN_FOLDER/evidence/FILE and nothing else, so a
# tampered row can never make it delete a model or an index.
_EVIDENCE_KEY = re.compile(r"^runs/[^/]+/evidence/[^/]+\.(jpg|png)$")
_SLUG_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def evidence_keys(run_folder: str, query_id: str, reference_id: str) -> tuple[str, str]:
    """The (side-by-side, heatmap) object keys of a pair: one safe segment whatever the ids hold.

    Ids may hold path separators, '..', SQL metacharacters, thousands of
    characters or undecodable bytes (surrogate escapes): the slug keeps a
    readable prefix of each and a hash of both, so keys are unique per pair,
    stable across reruns, and always valid (:func:`moderation.store.validate_key`).
    """
    digest = sha256_hex(f"{query_id}\x00{reference_id}".encode("utf-8", "surrogatepass"))[:16]
    slug = f"{_slug(query_id)}__{_slug(reference_id)}-{digest}"
    base = f"{run_folder.rstrip('/')}/{EVIDENCE_DIR}/{slug}"
    return validate_key(base + ".jpg"), validate_key(base + ".heatmap.jpg")


def _slug(value: str) -> str:
    s = _SLUG_CHARS.sub("_", value.encode("ascii", "replace").decode("ascii"))
    return s.strip("._")[:48] or "x"


# -- images ------------------------------------------------------------------------------------


def fit_pixels(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(w, h) scaled down (never up) so that w * h <= max_pixels, aspect kept."""
    if max_pixels < 1:
        raise ValueError("max_pixels must be positive")
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    while w * h > max_pixels:  # rounding can leave a few pixels over
        if w >= h:
            w -= 1
        else:
            h -= 1
    return w, h


def side_by_side(query: Image.Image, reference: Image.Image, max_pixels: int) -> Image.Image:
    """Query left, reference right, one common height, a white gap; at most ``max_pixels``."""
    aq, ar = query.width / query.height, reference.width / reference.height
    height = max(query.height, reference.height)
    # width = h*aq + h*ar + gap; solve h * width <= max_pixels for h.
    a = aq + ar
    h_cap = (-GAP_PX + math.sqrt(GAP_PX * GAP_PX + 4 * a * max_pixels)) / (2 * a)
    height = max(1, min(height, int(h_cap)))
    while True:
        wq, wr = max(1, round(height * aq)), max(1, round(height * ar))
        if (wq + wr + GAP_PX) * height <= max_pixels or height == 1:
            break
        height -= 1
    canvas = Image.new("RGB", (wq + wr + GAP_PX, height), (255, 255, 255))
    canvas.paste(query.resize((wq, height), Image.BILINEAR), (0, 0))
    canvas.paste(reference.resize((wr, height), Image.BILINEAR), (wq + GAP_PX, 0))
    if canvas.width * canvas.height > max_pixels:  # max_pixels below the gap's own cost
        canvas = canvas.resize(fit_pixels(canvas.width, canvas.height, max_pixels), Image.BILINEAR)
    return canvas


def draw_geometry(canvas: Image.Image, query: Image.Image, reference: Image.Image, verification) -> Image.Image:
    """Draw a verified pair's evidence on its side-by-side image (in place; returned).

    Green lines join up to ``keep_points`` inlier correspondences (query
    left, reference right); a yellow outline shows where the reference sits
    inside the query (its corners through the fitted model). Points are in
    the verifier's detection-image pixels; a mirrored match is drawn on the
    unmirrored query.
    """
    from PIL import ImageDraw

    if verification is None or verification.inliers <= 0:
        return canvas
    height = canvas.height
    wq = max(1, round(height * query.width / query.height))
    qw, qh = verification.query_size
    rw, rh = verification.reference_size
    if min(qw, qh, rw, rh) <= 0:
        return canvas
    wr = canvas.width - wq - GAP_PX

    def to_query(pts: np.ndarray) -> np.ndarray:
        pts = np.asarray(pts, np.float64).reshape(-1, 2).copy()
        if verification.mirrored:
            pts[:, 0] = qw - pts[:, 0]
        return pts * np.array([wq / qw, height / qh])

    def to_reference(pts: np.ndarray) -> np.ndarray:
        return np.asarray(pts, np.float64).reshape(-1, 2) * np.array([wr / rw, height / rh]) + \
            np.array([wq + GAP_PX, 0.0])

    draw = ImageDraw.Draw(canvas)
    width = max(1, round(height / 160))
    for (x0, y0), (x1, y1) in zip(to_query(verification.query_points), to_reference(verification.reference_points)):
        draw.line([(x0, y0), (x1, y1)], fill=(40, 220, 60), width=width)
        draw.ellipse([x0 - width, y0 - width, x0 + width, y0 + width], outline=(40, 220, 60))
    if verification.homography is not None:
        h = np.asarray(verification.homography, np.float64).reshape(3, 3)
        corners = np.array([[0, 0, 1], [rw, 0, 1], [rw, rh, 1], [0, rh, 1]], np.float64)
        proj = corners @ h.T
        if np.all(np.abs(proj[:, 2]) > 1e-9):
            outline = to_query(proj[:, :2] / proj[:, 2:3])
            draw.line([tuple(p) for p in outline] + [tuple(outline[0])], fill=(255, 220, 0), width=2 * width)
    return canvas


def colormap(values: np.ndarray) -> np.ndarray:
    """A jet-like colour map: (h, w) in [0, 1] -> (h, w, 3) uint8, blue low, red high."""
    x = np.clip(values, 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255).astype(np.uint8)


def overlay(image: Image.Image, heat: np.ndarray, max_pixels: int, alpha: float = 0.45) -> Image.Image:
    """``image`` (scaled to ``max_pixels``) blended with ``heat`` (any (h, w), values in [0, 1])."""
    w, h = fit_pixels(image.width, image.height, max_pixels)
    base = image.resize((w, h), Image.BILINEAR)
    t = torch.from_numpy(np.ascontiguousarray(heat, dtype=np.float32))[None, None]
    up = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    colours = Image.fromarray(colormap(up))
    return Image.blend(base, colours, alpha)


def normalise_map(sim: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] (a flat map becomes all zeros)."""
    lo, hi = float(sim.min()), float(sim.max())
    if not math.isfinite(lo) or not math.isfinite(hi) or hi - lo < 1e-8:
        return np.zeros_like(sim, dtype=np.float32)
    return ((sim - lo) / (hi - lo)).astype(np.float32)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return buf.getvalue()


# -- heatmaps ----------------------------------------------------------------------------------


def has_local_descriptors(module: Any) -> bool:
    try:
        return callable(getattr(module, "local_descriptors"))
    except (AttributeError, RuntimeError):
        return False


def local_similarity(module: Any, query: torch.Tensor, reference_global: torch.Tensor) -> np.ndarray:
    """SSCD's heatmap: cosine of each query location's descriptor with the reference descriptor.

    ``query`` is one preprocessed image (3, H, W); ``reference_global`` a
    (D,) descriptor. Returns the (h, w) map at the trunk's resolution.
    """
    with torch.inference_mode():
        local = module.local_descriptors(query.unsqueeze(0))[0]  # (D, h, w), unit norm per location
        ref = F.normalize(reference_global.float().flatten(), dim=0)
        if local.shape[0] != ref.shape[0]:
            raise ModerationError(f"local descriptors have {local.shape[0]} dims, the global "
                                  f"descriptor {ref.shape[0]}")
        return torch.einsum("dhw,d->hw", local.float(), ref).cpu().numpy()


def occlusion_similarity(module: Any, query: torch.Tensor, reference_global: torch.Tensor,
                         grid: int = OCCLUSION_GRID) -> np.ndarray:
    """Occlusion map: how much the query's similarity to the reference drops with each cell hidden.

    For models without ``local_descriptors``. Cells are filled with zeros
    in normalised space (the ImageNet mean colour). One batched forward of
    ``grid * grid + 1`` images. Returns (grid, grid), larger = matters more.
    """
    _, h, w = query.shape
    batch = [query]
    for i in range(grid):
        for j in range(grid):
            x = query.clone()
            x[:, i * h // grid:(i + 1) * h // grid, j * w // grid:(j + 1) * w // grid] = 0.0
            batch.append(x)
    ref = F.normalize(reference_global.float().flatten(), dim=0)
    with torch.inference_mode():
        out = F.normalize(module(torch.stack(batch)).float(), dim=-1)
    sims = out @ ref
    return (sims[0] - sims[1:]).clamp(min=0).reshape(grid, grid).cpu().numpy()


# -- the run's step ----------------------------------------------------------------------------


@dataclass
class _Renderer:
    module: Any
    size: int
    mode: Any
    device: torch.device
    max_pixels: int
    max_image_pixels: int
    max_file_bytes: int

    def __post_init__(self):
        self.local = has_local_descriptors(self.module)
        self._globals: dict[str, torch.Tensor] = _LRU(4096)  # reference descriptors

    def tensor(self, img: Image.Image) -> torch.Tensor:
        return preprocess(img, self.size, self.mode).to(self.device)

    def global_of(self, key: str, img: Image.Image) -> torch.Tensor:
        if key not in self._globals:
            with torch.inference_mode():
                self._globals[key] = self.module(self.tensor(img).unsqueeze(0))[0].float()
        return self._globals[key]

    def heat(self, query: Image.Image, reference_key: str, reference: Image.Image) -> np.ndarray:
        # TorchScript's profiling executor re-optimises for every new input shape and method
        # (seconds each on a CPU); one image at a time through two methods gains nothing from it.
        with torch.jit.optimized_execution(False):
            ref = self.global_of(reference_key, reference)
            x = self.tensor(query)
            if self.local:
                return local_similarity(self.module, x, ref)
            return occlusion_similarity(self.module, x, ref)


def attach_evidence(p, loaded, pairs: Sequence[FlaggedPair], source, run_folder: str, *,
                    geometry: dict | None = None) -> list[FlaggedPair]:
    """Store evidence images for ``pairs`` and return them with ``evidence_key``/``heatmap_key`` set.

    ``geometry`` maps (query_id, reference_id) to the pair's Verification:
    a verified pair's side-by-side shows its inlier correspondences and the
    reference's outline inside the query (:func:`draw_geometry`).

    ``p`` is the Pipeline (settings, store), ``loaded`` the run's
    LoadedModel, ``source`` the query ImageSource (``pair.query_key`` is a
    location in it); a pair's ``reference_key`` is read from the object
    store, or from disk when it is a path (a folder-built index). A PDQ
    pair against a hash-bank entry (no ``reference_key``) gets the query
    image alone and no heatmap. Pairs whose images cannot be read keep
    None keys. Idempotent: a rerun writes
    the same keys. Raises StoreError if the store is unreachable.
    """
    from moderation.descriptor import resolve_device

    settings = p.settings
    limit = int(getattr(settings, "evidence_max_pairs", DEFAULT_MAX_PAIRS))
    model_settings = loaded.settings_for(settings)
    renderer = _Renderer(loaded.module, model_settings.image_size, model_settings.resize_mode,
                         resolve_device(settings.device.value), int(settings.evidence_max_pixels),
                         settings.max_image_pixels, settings.max_file_bytes)
    if not renderer.local:
        log.info("model %s has no local_descriptors: evidence heatmaps use occlusion "
                 "(%dx%d grid) instead of SSCD's local-descriptor map", loaded.version,
                 OCCLUSION_GRID, OCCLUSION_GRID)
    order = sorted(range(len(pairs)), key=lambda i: -pairs[i].score)
    chosen = set(order[:max(0, limit)])
    if len(pairs) > limit:
        log.warning("%d flagged pairs: evidence only for the %d highest-scoring ones "
                    "(MODERATION_EVIDENCE_MAX_PAIRS)", len(pairs), limit)
    images = _LRU(IMAGE_CACHE)
    out: list[FlaggedPair | None] = list(pairs)
    done = failed = 0
    # Query by query, so each query image is decoded once and only a few stay in memory.
    for i in sorted(chosen, key=lambda k: (pairs[k].query_key or "", -pairs[k].score)):
        pair = pairs[i]
        q = _image(images, "q", pair.query_key, lambda k: source.read(k), renderer)
        ev_key, hm_key = evidence_keys(run_folder, pair.query_id, pair.reference_id)
        if q is not None and not pair.reference_key and pair.match_source == "pdq":
            # A hash-bank reference has no image (its sender shared hashes only): the query alone
            # is what a moderator can look at; there is nothing to pair it with for a heatmap.
            alone = q.resize(fit_pixels(q.width, q.height, renderer.max_pixels), Image.BILINEAR)
            p.store.put(ev_key, _jpeg(alone), "image/jpeg")
            out[i] = replace(pair, evidence_key=ev_key, heatmap_key=None)
            done += 1
            continue
        r = _image(images, "r", pair.reference_key, lambda k: read_location(p.store, k), renderer)
        if q is None or r is None:
            failed += 1
            continue
        canvas = side_by_side(q, r, renderer.max_pixels)
        if geometry:
            canvas = draw_geometry(canvas, q, r, geometry.get((pair.query_id, pair.reference_id)))
        p.store.put(ev_key, _jpeg(canvas), "image/jpeg")
        heat_key = None
        try:
            heat = normalise_map(renderer.heat(q, f"r:{pair.reference_key}", r))
        except (RuntimeError, ValueError, ModerationError) as exc:
            # A model whose forward cannot be taken apart this way: the side-by-side still helps.
            heat = None
            log.warning("no heatmap for pair %r / %r: %s", pair.query_id, pair.reference_id, exc)
        if heat is not None:
            p.store.put(hm_key, _jpeg(overlay(q, heat, renderer.max_pixels)), "image/jpeg")
            heat_key = hm_key
        out[i] = replace(pair, evidence_key=ev_key, heatmap_key=heat_key)
        done += 1
    log.info("evidence for %d of %d flagged pairs under %s/%s/ (%d without: unreadable images)",
             done, len(pairs), run_folder, EVIDENCE_DIR, failed)
    return out  # type: ignore[return-value]


class _LRU(dict):
    """A dict that forgets its oldest entry beyond ``size`` entries (decoded images)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def __setitem__(self, key, value) -> None:
        if key in self:
            del self[key]
        super().__setitem__(key, value)
        while len(self) > self.size:
            del self[next(iter(self))]


def _image(cache: dict, kind: str, location: str | None, read, renderer: _Renderer) -> Image.Image | None:
    if not location:
        return None
    key = (kind, location)
    if key not in cache:
        try:
            img = decode_image(read(location), renderer.max_image_pixels, renderer.max_file_bytes)
            # Keep a little more than the evidence shows and the model sees (a very wide image
            # still has rows enough for a square resize); with the LRU this bounds memory.
            cap = max(renderer.max_pixels, renderer.size * renderer.size) * 4
            if img.width * img.height > cap:
                img = img.resize(fit_pixels(img.width, img.height, cap), Image.BILINEAR)
            cache[key] = img
        except (BadImageError, NotFoundError, OSError, ValueError) as exc:
            log.warning("evidence: cannot read %s image %r: %s", "query" if kind == "q" else "reference",
                        location, exc)
            cache[key] = None
        except StoreError:
            raise  # the store being down fails the run; one bad image does not
        except ModerationError as exc:
            log.warning("evidence: cannot read %r: %s", location, exc)
            cache[key] = None
    return cache[key]


# -- retention ---------------------------------------------------------------------------------


def prune_evidence(p, older_than_days: int | None = None, *, chunk: int = 500,
                   dry_run: bool = False) -> dict[str, Any]:
    """Delete the evidence of pairs decided (confirmed or rejected) more than N days ago.

    N defaults to ``settings.evidence_retention_days``. Pending and
    ``unsure`` pairs keep theirs. Objects are deleted first, then the
    pairs' keys are cleared, per chunk: a crash in between leaves keys to
    missing objects, which the next prune clears (deleting a missing object
    is not an error). Only keys under ``runs/*/evidence/`` are ever
    deleted. Returns counts and the cutoff; a ``dry_run`` changes nothing
    and also returns the ``keys`` it would delete.
    """
    from sqlalchemy import bindparam, update

    from moderation import review
    from moderation.db import FlaggedPairRow

    days = p.settings.evidence_retention_days if older_than_days is None else older_than_days
    if isinstance(days, bool) or not isinstance(days, int) or days < 0:
        raise ValueError("older_than_days must be a non-negative integer")
    cutoff = datetime.now(timezone.utc) - timedelta(days=days)
    rows = [r for r in review.pair_states(p.db, states=("confirmed", "rejected"))
            if (r["evidence_key"] or r["heatmap_key"]) and r["decided_at"] is not None
            and _aware(r["decided_at"]) < cutoff]
    doomed: list[str] = []
    skipped = 0
    for i in range(0, len(rows), chunk):
        part = rows[i:i + chunk]
        keys = []
        for r in part:
            for key in (r["evidence_key"], r["heatmap_key"]):
                if not key:
                    continue
                if not _EVIDENCE_KEY.match(key):
                    log.warning("not deleting %r (pair %s): not an evidence key", key, r["pair_id"])
                    skipped += 1
                    continue
                keys.append(key)
        doomed += keys
        if dry_run:
            continue
        for key in keys:
            p.store.delete(key)
        with p.db.session() as s, s.begin():
            s.execute(update(FlaggedPairRow).where(FlaggedPairRow.id.in_(bindparam("ids", expanding=True)))
                      .values(evidence_key=None, heatmap_key=None), {"ids": [r["pair_id"] for r in part]})
    log.info("%s evidence of %d decided pairs (%d objects) decided before %s",
             "would prune" if dry_run else "pruned", len(rows), len(doomed),
             cutoff.isoformat(timespec="seconds"))
    out = {"pairs": len(rows), "objects_deleted": 0 if dry_run else len(doomed), "objects_skipped": skipped,
           "older_than_days": days, "cutoff": cutoff.isoformat(timespec="seconds")}
    if dry_run:
        out["keys"] = doomed
    return out


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


__all__ = ["attach_evidence", "prune_evidence", "evidence_keys", "side_by_side", "overlay",
           "local_similarity", "occlusion_similarity", "fit_pixels", "has_local_descriptors"]
