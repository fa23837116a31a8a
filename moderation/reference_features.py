"""Reference-side local features: computed at index time, looked up at match time.

The nightly index job calls :func:`ensure_reference_features`: every
reference whose sha256 has no features in the cache for the configured
:class:`~moderation.local_features.FeatureConfig` is read, decoded and
described, in worker processes; the rest cost one listing of the cache
prefix. Matching then reads only the features of the references it
verifies (:class:`ReferenceFeatures`), never the images, unless a
reference's features are missing (an index built before verification
existed, or a corrupt object): then it computes them once and stores them.

Failure policy: a reference that cannot be read or decoded is logged and
has no features (its pairs are not verified); the batch goes on. A store
that is down raises StoreError, as every store access does.
"""

from __future__ import annotations

import logging
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence

from moderation.errors import BadImageError, ModerationError, NotFoundError, StoreError
from moderation.images import ImageRef, decode_image, sha256_hex
from moderation.local_features import FeatureCache, FeatureConfig, LocalFeatures, extract
from moderation.store import read_location

log = logging.getLogger(__name__)


def features_of_bytes(data: bytes, config: FeatureConfig, max_pixels: int, max_bytes: int) -> LocalFeatures:
    """Decode an image (reduced where the format allows) and extract its features; BadImageError if bad."""
    img = decode_image(data, max_pixels, max_bytes, min_size=config.max_side)
    return extract(img, config)


def _work(args) -> tuple[str, bytes | None, str]:
    source, ref, config, max_pixels, max_bytes = args
    try:
        data = source.read(ref.location)
        feats = features_of_bytes(data, config, max_pixels, max_bytes)
        return ref.sha256 or sha256_hex(data), feats.to_bytes(), ""
    except BadImageError as exc:
        return ref.sha256, None, f"{exc.reason}: {exc.detail}"
    except Exception as exc:  # a read error: recorded, not fatal
        return ref.sha256, None, f"{type(exc).__name__}: {exc}"


def _init_worker() -> None:
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def ensure_reference_features(source, refs: Sequence[ImageRef], cache: FeatureCache, *, workers: int = 2,
                              max_pixels: int = 64_000_000, max_bytes: int = 50_000_000,
                              progress: bool = False) -> dict:
    """Compute and store the features of every reference in ``refs`` (with sha256) missing from ``cache``.

    Returns counts: ``total``, ``cached`` (already there), ``computed``, ``failed``.
    """
    from tqdm import tqdm

    # One reference file may appear under two ids: describe each content once.
    unique = {r.sha256: r for r in refs}
    todo = [unique[s] for s in cache.missing(list(unique))]
    computed = failed = 0
    bar = tqdm(total=len(todo), desc="reference features", unit="img", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    jobs = [(source, r, cache.config, max_pixels, max_bytes) for r in todo]

    def handle(sha: str, data: bytes | None, error: str, ref: ImageRef) -> None:
        nonlocal computed, failed
        if data is None:
            failed += 1
            log.warning("no local features for reference %s (%s): %s", ref.image_id, ref.location, error)
        else:
            cache.store.put(cache.key(sha), data)
            computed += 1
        bar.update(1)

    if workers > 0 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                 initializer=_init_worker) as pool:
            for ref, (sha, data, error) in zip(todo, pool.map(_work, jobs, chunksize=8)):
                handle(sha, data, error, ref)
    else:
        for ref, job in zip(todo, jobs):
            handle(*_work(job), ref)
    bar.close()
    out = {"total": len(refs), "cached": len(unique) - len(todo), "computed": computed, "failed": failed,
           "config": cache.config.key()}
    log.info("reference features (%s): %d cached, %d computed, %d failed", cache.config.key(),
             out["cached"], computed, failed)
    return out


# References whose features stay in memory during a run (about 0.14 MB each): popular
# references are read once, and a day of 100k queries never holds the whole set.
MEMO_SIZE = 4096


class ReferenceFeatures:
    """Features of indexed references by id, for the match job (the most recent ``memo_size`` kept).

    ``shas`` maps reference id -> sha256 (the index's ``shas.json``; may be
    empty for an older index), ``locations`` id -> object key or file path.
    """

    def __init__(self, cache: FeatureCache, shas: Mapping[str, str], locations: Mapping[str, str], *,
                 max_pixels: int = 64_000_000, max_bytes: int = 50_000_000, memo_size: int = MEMO_SIZE):
        self.cache, self.shas, self.locations = cache, dict(shas), dict(locations)
        self.max_pixels, self.max_bytes = max_pixels, max_bytes
        self._memo: OrderedDict[str, LocalFeatures | None] = OrderedDict()
        self.memo_size = memo_size
        self.computed = 0

    def get(self, reference_id: str) -> LocalFeatures | None:
        if reference_id in self._memo:
            self._memo.move_to_end(reference_id)
            return self._memo[reference_id]
        feats = self._memo[reference_id] = self._load(reference_id)
        while len(self._memo) > self.memo_size:
            self._memo.popitem(last=False)
        return feats

    def _load(self, rid: str) -> LocalFeatures | None:
        sha = self.shas.get(rid)
        if sha and (feats := self.cache.get(sha)) is not None:
            return feats
        location = self.locations.get(rid)
        if not location:
            return None
        try:
            data = read_location(self.cache.store, location)
            feats = features_of_bytes(data, self.cache.config, self.max_pixels, self.max_bytes)
        except StoreError:
            raise
        except (BadImageError, NotFoundError, OSError, ValueError, ModerationError) as exc:
            log.warning("no local features for reference %s (%s): %s", rid, location, exc)
            return None
        self.cache.put(sha or sha256_hex(data), feats)
        self.computed += 1
        return feats
